"""Conversion to and from Hugging Face: `hf_config` (config.json ⇄ our config dicts, a leaf that
`config.py` imports) and `hf` (safetensors ⇄ our parameter tree, which needs `config.py`).

Deliberately empty: importing `nemotron_jax.convert.hf_config` runs this file first, so importing
`hf` here would pull `config.py` back in while it is still loading (a cycle). Import the
submodules themselves.
"""
