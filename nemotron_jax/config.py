"""`ModelConfig`: the model as data.

A Nemotron-NAS model is a Llama-3 decoder whose layers ("blocks") each choose their own attention
(GQA with some number of KV heads, a single linear map, or nothing) and their own FFN (SwiGLU of
some width, a single linear map, or nothing). The modules in `nemotron_jax.model` simply follow
this description. It reads and writes Hugging Face `config.json` in both layouts, DeciLM
(`block_configs`, `model_type: nemotron-nas`) and plain Llama, through the dict codec in
`convert/hf_config.py` (a leaf below this module).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nemotron_jax.convert import hf_config
from nemotron_jax.convert.hf_config import ffn_mult_for_width as ffn_mult_for_width  # re-exported
from nemotron_jax.convert.hf_config import ffn_width
from nemotron_jax.errors import ConfigError

AttentionKind = Literal["gqa", "linear", "none"]
FFNKind = Literal["swiglu", "linear", "none"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}

@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One block's attention: `gqa` with `num_kv_heads`, a `linear` map, or `none`."""

    kind: AttentionKind = "gqa"
    num_kv_heads: int | None = None

    def __str__(self) -> str:
        return format_subblock(self, "display")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """One block's FFN: `swiglu` of `intermediate_size`, a `linear` map, or `none`.

    `ffn_mult` keeps the DeciLM multiplier a checkpoint was written with, so that it round-trips
    exactly; when absent it is derived from the width on export.
    """

    kind: FFNKind = "swiglu"
    intermediate_size: int | None = None
    ffn_mult: float | None = None

    def __str__(self) -> str:
        return format_subblock(self, "display")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig = AttentionConfig()
    ffn: FFNConfig = FFNConfig()


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A heterogeneous Llama: global fields plus one `BlockConfig` per layer."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    blocks: tuple[BlockConfig, ...]
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128001, 128008, 128009)
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    # ---------------------------------------------------------------- derived facts
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_homogeneous(self) -> bool:
        """True when every block is the same full GQA + SwiGLU block (a plain Llama)."""
        first = self.blocks[0]
        return (first.attention.kind == "gqa" and first.ffn.kind == "swiglu"
                and all(_same_shape(b, first) for b in self.blocks))

    def num_params(self) -> int:
        """Parameter count, embeddings and (untied) LM head included."""
        h, d = self.hidden_size, self.head_dim
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for block in self.blocks:
            att, ffn = block.attention, block.ffn
            if att.kind == "gqa":
                total += h + 2 * h * self.num_attention_heads * d + 2 * h * att.num_kv_heads * d
            elif att.kind == "linear":
                total += h + h * h
            if ffn.kind == "swiglu":
                total += h + 3 * h * ffn.intermediate_size
            elif ffn.kind == "linear":
                total += h + h * h
        return total

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Bytes of K and V cached per token: only GQA blocks cache, each with its own KV heads."""
        if dtype not in _DTYPE_BYTES:
            raise ConfigError(f"unknown cache dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
        heads = sum(b.attention.num_kv_heads for b in self.blocks if b.attention.kind == "gqa")
        return 2 * heads * self.head_dim * _DTYPE_BYTES[dtype]

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim/2] with Llama-3 scaling, computed as HF does (f32)."""
        d = self.head_dim
        inv_freq = 1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
        s = self.rope_scaling
        if s is None:
            return inv_freq.astype(np.float32)
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per block: what it is and what it costs."""
        rows = []
        h, d = self.hidden_size, self.head_dim
        for i, b in enumerate(self.blocks):
            single = dataclasses.replace(self, blocks=(b,), vocab_size=0, tie_word_embeddings=True)
            rows.append({
                "layer": i, "attention": str(b.attention), "ffn": str(b.ffn),
                "params": single.num_params() - h,
                "kv_bytes_per_token_bf16": (2 * b.attention.num_kv_heads * d * 2
                                            if b.attention.kind == "gqa" else 0),
            })
        return rows

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- native dict / YAML form
    def to_dict(self) -> dict[str, Any]:
        """Our own form (presets, saved models): any width, blocks written compactly as strings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "blocks"}
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["rope_scaling"] = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        out["blocks"] = _compact_blocks(self.blocks)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<dict>") -> ModelConfig:
        """Inverse of `to_dict`; blocks may be strings like "3x gqa:8 swiglu:14336" or "none linear"."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown config keys {unknown}; expected some of {sorted(fields)}")
        data = dict(data)
        blocks: list[BlockConfig] = []
        for i, entry in enumerate(data.get("blocks") or []):
            blocks.extend(_parse_block(entry, f"{where}: blocks[{i}]", data.get("hidden_size", 0)))
        data["blocks"] = tuple(blocks)
        if isinstance(data.get("rope_scaling"), Mapping):
            try:
                data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
            except TypeError as e:
                raise ConfigError(f"{where}: rope_scaling: {e}") from None
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "vocab_size" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.blocks:
            raise ConfigError("a model needs at least one block")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for i, b in enumerate(self.blocks):
            att, ffn = b.attention, b.ffn
            if att.kind not in ("gqa", "linear", "none"):
                raise ConfigError(f"block {i}: attention kind must be gqa/linear/none, got {att.kind!r}")
            if att.kind == "gqa":
                kv = att.num_kv_heads
                if not isinstance(kv, int) or kv < 1 or self.num_attention_heads % kv:
                    raise ConfigError(
                        f"block {i}: attention.num_kv_heads={kv!r} must be a positive divisor of "
                        f"num_attention_heads={self.num_attention_heads}")
            elif att.num_kv_heads is not None:
                raise ConfigError(f"block {i}: attention kind {att.kind!r} takes no num_kv_heads")
            if ffn.kind not in ("swiglu", "linear", "none"):
                raise ConfigError(f"block {i}: ffn kind must be swiglu/linear/none, got {ffn.kind!r}")
            if ffn.kind == "swiglu":
                width = ffn.intermediate_size
                if not isinstance(width, int) or width < 1:
                    raise ConfigError(f"block {i}: ffn.intermediate_size must be a positive integer, got {width!r}")
            elif ffn.intermediate_size is not None or ffn.ffn_mult is not None:
                raise ConfigError(f"block {i}: ffn kind {ffn.kind!r} takes no width")
        if self.rope_scaling is not None and self.rope_scaling.high_freq_factor <= self.rope_scaling.low_freq_factor:
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> ModelConfig:
        """Read an HF config: a `config.json` path, a directory holding one, or the dict itself."""
        data, where = hf_config.read(source)
        return cls.from_dict(hf_config.hf_to_compact(data, where), where)

    def to_hf(self, format: Literal["decilm", "llama"] = "decilm") -> dict[str, Any]:
        """The HF `config.json` dict, in DeciLM layout (default) or Llama layout (homogeneous only)."""
        return hf_config.compact_to_hf(dataclasses.asdict(self), format)

# ---------------------------------------------------------------- the block grammar
# One grammar for a subblock, in three spellings of the same words: `compact` (what `to_dict`
# writes and presets use: gqa:8, swiglu:14336 or mult:M when the DeciLM multiplier is known),
# `display` (str(), tables: gqa(kv=8), swiglu(14336)) and `key` (Puzzle's store / Orbax keys, no
# punctuation: gqa8, swiglu14336); linear and none read the same in all. `parse_subblock` reads
# any spelling, so every file ever written stays readable.
Spelling = Literal["compact", "display", "key"]
_SPELLINGS: dict[str, tuple[str, dict[str, str]]] = {  # kind -> (width field, spelling -> template)
    "gqa": ("num_kv_heads", {"compact": "gqa:{}", "display": "gqa(kv={})", "key": "gqa{}"}),
    "swiglu": ("intermediate_size", {"compact": "swiglu:{}", "display": "swiglu({})", "key": "swiglu{}"}),
}
_BARE = ("linear", "none")


def format_subblock(sub: AttentionConfig | FFNConfig, spelling: Spelling = "compact") -> str:
    """One subblock as text in `spelling` (see the grammar above); `parse_subblock` inverts it."""
    if sub.kind not in _SPELLINGS:
        return sub.kind
    if spelling == "compact" and isinstance(sub, FFNConfig) and sub.ffn_mult is not None:
        # repr, not :g (6 significant digits turned Ultra's 31.40625 into 31.4062)
        return f"mult:{repr(float(sub.ffn_mult)).removesuffix('.0')}"
    field, templates = _SPELLINGS[sub.kind]
    return templates[spelling].format(getattr(sub, field))


def parse_subblock(slot: Literal["attention", "ffn"], text: str, hidden: int = 0) -> AttentionConfig | FFNConfig:
    """An `AttentionConfig` (slot `attention`) or `FFNConfig` (`ffn`) from any spelling of
    `format_subblock`; `mult:M` needs the model's `hidden` size. ValueError naming the forms."""
    text = str(text).strip()
    kind = "gqa" if slot == "attention" else "swiglu"
    cls = AttentionConfig if slot == "attention" else FFNConfig
    if text in _BARE:
        return cls(text)
    field, templates = _SPELLINGS[kind]
    forms = [(prefix, suffix) for prefix, _, suffix in (t.partition("{}") for t in templates.values())]
    for prefix, suffix in forms + ([("mult:", "")] if slot == "ffn" else []):
        arg = text[len(prefix):len(text) - len(suffix)]
        if not (arg and text.startswith(prefix) and text.endswith(suffix)):
            continue
        try:
            if prefix == "mult:":
                mult = round(float(arg), 6)
                return FFNConfig("swiglu", ffn_width(mult, hidden), mult)
            return cls(kind, **{field: int(arg)})
        except ValueError:
            continue
    expected = "gqa:K, linear or none" if slot == "attention" else "swiglu:WIDTH, mult:M, linear or none"
    raise ValueError(f"{slot} must be {expected}, got {text!r}")


def _block_str(b: BlockConfig) -> str:
    return f"{format_subblock(b.attention)} {format_subblock(b.ffn)}"


def _compact_blocks(blocks: tuple[BlockConfig, ...]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(blocks):
        j = i
        while j < len(blocks) and blocks[j] == blocks[i]:
            j += 1
        out.append(("" if j - i == 1 else f"{j - i}x ") + _block_str(blocks[i]))
        i = j
    return out


def _parse_block(entry: Any, where: str, hidden: int) -> list[BlockConfig]:
    """'[Nx] ATT FFN' with ATT in gqa:K|linear|none and FFN in swiglu:WIDTH|mult:M|linear|none."""
    if isinstance(entry, Mapping):
        try:
            att, ffn = dict(entry["attention"]), dict(entry["ffn"])
            return [BlockConfig(AttentionConfig(**att), FFNConfig(**ffn))]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: bad block {entry!r} ({e})") from None
    words = str(entry).split()
    repeat = 1
    if words and words[0].endswith("x") and words[0][:-1].isdigit():
        repeat, words = int(words[0][:-1]), words[1:]
    if len(words) != 2:
        raise ConfigError(f"{where}: expected '[Nx] ATTENTION FFN', got {entry!r}")
    try:
        attention, feed = parse_subblock("attention", words[0]), parse_subblock("ffn", words[1], hidden)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return [BlockConfig(attention, feed)] * repeat


def _same_shape(a: BlockConfig, b: BlockConfig) -> bool:
    return (a.attention == b.attention and a.ffn.kind == b.ffn.kind
            and a.ffn.intermediate_size == b.ffn.intermediate_size)

