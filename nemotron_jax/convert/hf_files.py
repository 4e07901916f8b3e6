"""The files beside an HF checkpoint's weights that make it usable where users load Nemotron.

`config.json` and the safetensors come from `convert.hf.write_hf`; this adds
`generation_config.json` (always) and the tokenizer files (when a tokenizer is given), written by
`extra_writer` into write_hf's staging directory, so the export appears whole or not at all.

The generation config carries the bos/eos ids (transformers' `generate` and vLLM stop on every
eos id listed, and the Llama-3 ids differ from the config's first eos) and the report's sampling
for reasoning on (temperature 0.6, top-p 0.95). A file cannot depend on the system prompt, so one
mode's setting must be the default: vLLM applies these defaults to every request, and without them
it samples at temperature 1.0, which suits neither mode; 0.6 / 0.95 is what the model card asks
for reasoning on and is mild for reasoning off, where a user who wants greedy passes
temperature=0 per request. `sampling=None` writes the ids alone.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from nemotron_jax.config import ModelConfig
from nemotron_jax.convert.hf_config import ecosystem_warnings
from nemotron_jax.errors import ConfigError

REASONING_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer(Protocol):
    """What an export needs of a tokenizer (`nemotron_jax.Tokenizer` is one)."""

    name: str
    bos_id: int
    eos_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int: ...

    def hf_files(self) -> dict[str, str]: ...


def export_writer(cfg: ModelConfig, format: str, tokenizer: HFTokenizer | None = None,
                  sampling: Mapping[str, Any] | None = REASONING_SAMPLING) -> Callable[[Path], None]:
    """The `extra` callable for `write_hf`: checks the tokenizer against `cfg`, warns about loaders
    that cannot run this layout (`hf_config.ecosystem_warnings`), writes the files when called."""
    files = None
    if tokenizer is not None:
        check_tokenizer(cfg, tokenizer.vocab_size, tokenizer.bos_id, tuple(tokenizer.eos_ids), tokenizer.name)
        files = tokenizer.hf_files()
    for message in ecosystem_warnings(cfg.to_hf(format)):
        warnings.warn(message, stacklevel=3)
    return extra_writer(export_files(cfg, files, sampling))


def generation_config(cfg: ModelConfig, sampling: Mapping[str, Any] | None = REASONING_SAMPLING) -> dict[str, Any]:
    """The `generation_config.json` dict of `cfg`: its bos/eos ids plus `sampling`."""
    out: dict[str, Any] = {}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    eos = list(cfg.eos_token_ids)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return {**out, **dict(sampling or {})}


def export_files(cfg: ModelConfig, tokenizer_files: Mapping[str, str] | None = None,
                 sampling: Mapping[str, Any] | None = REASONING_SAMPLING) -> dict[str, str]:
    """File name -> text of everything an export carries besides config.json and the weights.

    `tokenizer_files` is `Tokenizer.hf_files()`; its special-token ids must agree with `cfg`
    (checked by the caller, which holds the tokenizer)."""
    files = {"generation_config.json": json.dumps(generation_config(cfg, sampling), indent=2) + "\n"}
    if tokenizer_files is not None:
        missing = [n for n in TOKENIZER_FILES if n not in tokenizer_files]
        if missing:
            raise ConfigError(f"tokenizer files {missing} are missing (expected {list(TOKENIZER_FILES)})")
        files.update(tokenizer_files)
    for name in files:
        if not name or Path(name).name != name or name in ("config.json", "model.safetensors.index.json") \
                or name.endswith(".safetensors"):
            raise ConfigError(f"{name!r} cannot be written beside the weights (a plain file name, not a weight file)")
    return files


def extra_writer(files: Mapping[str, str]) -> Callable[[Path], None]:
    """What write_hf calls with its staging directory: writes `files` there (renamed with it)."""
    files = dict(files)

    def write(directory: Path) -> None:
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")

    return write


def check_tokenizer(cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_ids: tuple[int, ...],
                    where: str) -> None:
    """Refuse a tokenizer that does not fit the model: ids past the embedding, or other bos/eos ids."""
    if vocab_size > cfg.vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {vocab_size} tokens, more than the model's "
                          f"vocab_size {cfg.vocab_size}")
    if cfg.bos_token_id is not None and bos_id != cfg.bos_token_id:
        raise ConfigError(f"{where}: the tokenizer's bos id {bos_id} is not the model's bos_token_id "
                          f"{cfg.bos_token_id}")
    unknown = sorted(set(cfg.eos_token_ids) - set(eos_ids))
    if unknown:
        raise ConfigError(f"{where}: the model's eos ids {unknown} are not eos tokens of the tokenizer "
                          f"(its eos ids: {list(eos_ids)})")
