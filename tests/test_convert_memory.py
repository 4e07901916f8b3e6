"""Conversion streams: peak memory is bounded by a few tensors, not the model, both directions.

Each conversion runs in a fresh child process that reports its own peak RSS (`ru_maxrss`); the
same conversion of a tiny model gives the baseline (Python, JAX, Orbax). A conversion that held
the whole model (as `load(...).save(...)` does) would exceed the bound by the model's size.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nemotron_jax as nj
from nemotron_jax.config import ModelConfig

MiB = 1024**2
# ~80M params, 326 MB float32: every block kind; the largest tensor (embedding) is 32 MB
BIG = {"vocab_size": 8192, "hidden_size": 1024, "num_attention_heads": 8, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1,
       "eos_token_ids": [2], "torch_dtype": "float32",
       "blocks": ["gqa:8 swiglu:4096", "linear swiglu:4096", "gqa:2 linear", "none swiglu:4096", "gqa:4 none",
                  "gqa:1 swiglu:4096"]}
CHILD = """
import resource, sys
from nemotron_jax.convert.hf import hf_to_saved, saved_to_hf
src, dst, direction = sys.argv[1:4]
if direction == "to_ours":
    hf_to_saved(src, dst, "float32", group_bytes=16 * 1024**2)
else:
    saved_to_hf(src, dst, "float32", shard_bytes=int(sys.argv[4]))
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _convert(src: Path, dst: Path, direction: str, shard_bytes: int = 4 * 1024**3) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), direction, str(shard_bytes)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_conversion_memory_is_bounded_and_round_trip_is_byte_identical(tmp_path: Path):
    tiny, big = tmp_path / "tiny", tmp_path / "big"
    nj.init("tiny-hetero", seed=0).save_hf(tiny / "hf")
    nj.init(ModelConfig.from_dict(BIG), seed=0).save_hf(big / "hf")
    ckpt = (big / "hf" / "model.safetensors").stat().st_size
    assert ckpt > 300 * MiB
    base_in = _convert(tiny / "hf", tiny / "ours", "to_ours")
    base_out = _convert(tiny / "ours", tiny / "hf_back", "to_hf")
    peak_in = _convert(big / "hf", big / "ours", "to_ours")
    peak_out = _convert(big / "ours", big / "hf_back", "to_hf")
    # a few 32 MB tensors in flight, never the 326 MB model (holding it once would add > ckpt)
    bound = 0.5 * ckpt
    assert peak_in - base_in < bound, f"HF -> ours held {(peak_in - base_in) / MiB:.0f} MiB over the baseline"
    assert peak_out - base_out < bound, f"ours -> HF held {(peak_out - base_out) / MiB:.0f} MiB over the baseline"
    assert filecmp.cmp(big / "hf" / "model.safetensors", big / "hf_back" / "model.safetensors", shallow=False)
    assert json.loads((big / "hf_back" / "config.json").read_text()) == json.loads(
        (big / "hf" / "config.json").read_text())


def test_streamed_sharded_write_reads_back_exactly(tmp_path: Path):
    """ours -> HF in several shard files streamed from Orbax: an index, and the same weights."""
    model = nj.init("tiny-hetero", seed=1)
    model.save(tmp_path / "ours")
    _convert(tmp_path / "ours", tmp_path / "hf", "to_hf", shard_bytes=400_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = nj.load(tmp_path / "hf")
    import numpy as np

    tokens = np.arange(24).reshape(2, 12) % 500
    np.testing.assert_array_equal(back.logits(tokens), model.logits(tokens))


def test_cli_convert_refuses_bad_input_and_writes_nothing(tmp_path: Path):
    nj.init("tiny-hetero", seed=0).save_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "nemotron_jax", "convert", str(tmp_path / "hf"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_convert_over_a_mesh_round_trips_byte_identical(tmp_path: Path):
    """`--mesh`: each tensor is read into / restored from its shards over 8 devices."""
    nj.init("tiny-hetero", seed=2).save_hf(tmp_path / "hf")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    for src, dst, mesh in (("hf", "ours", "fsdp=-1"), ("ours", "back", "fsdp=4,tensor=2")):
        r = subprocess.run([sys.executable, "-m", "nemotron_jax", "convert", str(tmp_path / src), str(tmp_path / dst),
                            "--mesh", mesh], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert filecmp.cmp(tmp_path / "hf" / "model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)
