"""`ModelConfig`: the model as data.

A Nemotron-NAS model is a Llama-3 decoder whose layers ("blocks") each choose their own attention
(GQA with some number of KV heads, a single linear map, or nothing) and their own FFN (SwiGLU of
some width, a single linear map, or nothing). The modules in `nemotron_jax.model` simply follow
this description. It reads and writes Hugging Face `config.json` in both layouts: DeciLM
(`block_configs`, `model_type: nemotron-nas`) and plain Llama.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nemotron_jax.errors import ConfigError

AttentionKind = Literal["gqa", "linear", "none"]
FFNKind = Literal["swiglu", "linear", "none"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}

# HF bookkeeping keys that carry nothing for the forward pass; everything else must be understood.
_IGNORED_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "auto_map", "transformers_version", "use_cache",
    "initializer_range", "pretraining_tp", "attention_dropout", "torch_dtype", "dtype",
    "pad_token_id", "output_attentions", "output_hidden_states", "return_dict", "quantization_config",
    "block_return_logits",
})
_KNOWN_ATTENTION_KEYS = frozenset({
    "n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "num_sink_tokens",
    "window_length", "unshifted_sink", "use_prefill_window_in_sink_attention",
})
_KNOWN_FFN_KEYS = frozenset({"ffn_mult", "no_op", "replace_with_linear", "sparsify"})
# Attention options released models never use; refusing them beats silently computing something else.
_UNSUPPORTED_ATTENTION = {"sparsify": None, "num_sink_tokens": None, "window_length": None,
                          "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """SwiGLU width from a DeciLM `ffn_mult`, rounded up to a multiple of 256 (SPEC §2)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def ffn_mult_for_width(width: int, hidden_size: int) -> float:
    """The 6-decimal `ffn_mult` that reproduces `width`, or ConfigError if none does."""
    mult = round(3 * width / (2 * hidden_size), 6)
    for candidate in (mult, round(mult + 1e-6, 6)):
        if ffn_width(candidate, hidden_size) == width:
            return candidate
    raise ConfigError(
        f"FFN width {width} cannot be written as a DeciLM ffn_mult for hidden_size {hidden_size} "
        "(widths must be multiples of 256); save in Llama layout instead")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One block's attention: `gqa` with `num_kv_heads`, a `linear` map, or `none`."""

    kind: AttentionKind = "gqa"
    num_kv_heads: int | None = None

    def __str__(self) -> str:
        return f"gqa(kv={self.num_kv_heads})" if self.kind == "gqa" else self.kind


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
        return f"swiglu({self.intermediate_size})" if self.kind == "swiglu" else self.kind


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
        if isinstance(source, Mapping):
            return _from_hf_dict(dict(source), "<dict>")
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return _from_hf_dict(data, str(path))

    def to_hf(self, format: Literal["decilm", "llama"] = "decilm") -> dict[str, Any]:
        """The HF `config.json` dict, in DeciLM layout (default) or Llama layout (homogeneous only)."""
        common: dict[str, Any] = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_layers,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                "factor": self.rope_scaling.factor, "high_freq_factor": self.rope_scaling.high_freq_factor,
                "low_freq_factor": self.rope_scaling.low_freq_factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
                "rope_type": "llama3"},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "torch_dtype": self.torch_dtype,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            common["head_dim"] = self.head_dim
        if format == "llama":
            if not self.is_homogeneous:
                raise ConfigError("only a homogeneous model (every block the same GQA + SwiGLU) "
                                  "can be written in Llama layout; use format='decilm'")
            first = self.blocks[0]
            return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                    "num_key_value_heads": first.attention.num_kv_heads,
                    "intermediate_size": first.ffn.intermediate_size}
        if format != "decilm":
            raise ConfigError(f"unknown HF format {format!r}; expected 'decilm' or 'llama'")
        return {
            "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                         "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
            **common, "intermediate_size": None, "num_key_value_heads": None,
            "block_configs": [self._block_to_hf(b) for b in self.blocks],
        }

    def _block_to_hf(self, block: BlockConfig) -> dict[str, Any]:
        att, ffn = block.attention, block.ffn
        attention = {
            "n_heads_in_group": (self.num_attention_heads // att.num_kv_heads if att.kind == "gqa" else None),
            "no_op": att.kind == "none", "replace_with_linear": att.kind == "linear",
            **_UNSUPPORTED_ATTENTION,
        }
        mult = None
        if ffn.kind == "swiglu":
            mult = ffn.ffn_mult if ffn.ffn_mult is not None else ffn_mult_for_width(
                ffn.intermediate_size, self.hidden_size)
        return {"attention": attention,
                "ffn": {"ffn_mult": mult, "no_op": ffn.kind == "none",
                        "replace_with_linear": ffn.kind == "linear", "sparsify": None}}


def _block_str(b: BlockConfig) -> str:
    att = {"gqa": f"gqa:{b.attention.num_kv_heads}"}.get(b.attention.kind, b.attention.kind)
    if b.ffn.kind != "swiglu":
        ffn = b.ffn.kind
    else:
        # repr, not :g (6 significant digits turned Ultra's 31.40625 into 31.4062)
        mult = repr(float(b.ffn.ffn_mult)).removesuffix(".0") if b.ffn.ffn_mult is not None else None
        ffn = f"mult:{mult}" if mult is not None else f"swiglu:{b.ffn.intermediate_size}"
    return f"{att} {ffn}"


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
    (att_kind, _, att_arg), (ffn_kind, _, ffn_arg) = (w.partition(":") for w in words)
    try:
        if att_kind == "gqa":
            attention = AttentionConfig("gqa", int(att_arg))
        elif att_kind in ("linear", "none") and not att_arg:
            attention = AttentionConfig(att_kind)
        else:
            raise ValueError(f"attention must be gqa:K, linear or none, got {words[0]!r}")
        if ffn_kind == "swiglu":
            feed = FFNConfig("swiglu", int(ffn_arg))
        elif ffn_kind == "mult":
            mult = round(float(ffn_arg), 6)
            feed = FFNConfig("swiglu", ffn_width(mult, hidden), mult)
        elif ffn_kind in ("linear", "none") and not ffn_arg:
            feed = FFNConfig(ffn_kind)
        else:
            raise ValueError(f"ffn must be swiglu:WIDTH, mult:M, linear or none, got {words[1]!r}")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return [BlockConfig(attention, feed)] * repeat


def _same_shape(a: BlockConfig, b: BlockConfig) -> bool:
    return (a.attention == b.attention and a.ffn.kind == b.ffn.kind
            and a.ffn.intermediate_size == b.ffn.intermediate_size)


def _from_hf_dict(data: dict[str, Any], where: str) -> ModelConfig:
    def need(key: str) -> Any:
        if key not in data:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return data[key]

    known = _IGNORED_HF_KEYS | {
        "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
        "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "attention_bias", "mlp_bias", "head_dim", "block_configs",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act must be 'silu', got {data['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            raise ConfigError(f"{where}: {key}=true is not supported (Llama-Nemotron has no biases)")

    hidden = _int(data, "hidden_size", where, need)
    heads = _int(data, "num_attention_heads", where, need)
    rope_theta, scaling = _rope(data, where)
    eos = data.get("eos_token_id", [])
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    layers = _int(data, "num_hidden_layers", where, need)

    if "block_configs" in data and data["block_configs"] is not None:
        raw_blocks = data["block_configs"]
        if not isinstance(raw_blocks, list) or len(raw_blocks) != layers:
            raise ConfigError(f"{where}: block_configs must be a list of num_hidden_layers={layers} entries")
        blocks = tuple(_block_from_hf(b, i, heads, hidden, where) for i, b in enumerate(raw_blocks))
    else:
        kv = data.get("num_key_value_heads") or heads
        width = _int(data, "intermediate_size", where, need)
        blocks = (BlockConfig(AttentionConfig("gqa", kv), FFNConfig("swiglu", width)),) * layers

    try:
        return ModelConfig(
            vocab_size=_int(data, "vocab_size", where, need), hidden_size=hidden,
            num_attention_heads=heads, blocks=blocks, head_dim=data.get("head_dim"),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)), rope_theta=rope_theta,
            rope_scaling=scaling, max_position_embeddings=int(data.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id"), eos_token_ids=eos_ids,
            torch_dtype=str(data.get("torch_dtype") or data.get("dtype") or "bfloat16"),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _int(data: dict[str, Any], key: str, where: str, need: Any) -> int:
    value = need(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _rope(data: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Both spellings: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`."""
    params = data.get("rope_parameters")
    if params is not None:
        theta = float(params.get("rope_theta", data.get("rope_theta", 500000.0)))
        scaling = params
    else:
        theta = float(data.get("rope_theta", 500000.0))
        scaling = data.get("rope_scaling")
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (only 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling is missing {e}") from None


def _block_from_hf(raw: Any, i: int, heads: int, hidden: int, where: str) -> BlockConfig:
    if not isinstance(raw, dict) or set(raw) - {"attention", "ffn"}:
        raise ConfigError(f"{where}: block_configs[{i}] must be an object with 'attention' and 'ffn'")
    att, ffn = raw.get("attention", {}), raw.get("ffn", {})
    for name, part, allowed in (("attention", att, _KNOWN_ATTENTION_KEYS), ("ffn", ffn, _KNOWN_FFN_KEYS)):
        unknown = sorted(set(part) - allowed)
        if unknown:
            raise ConfigError(f"{where}: block {i}: unknown {name} keys {unknown}")
        if part.get("no_op") and part.get("replace_with_linear"):
            raise ConfigError(f"{where}: block {i}: {name}.no_op and {name}.replace_with_linear are mutually exclusive")
    for key, default in _UNSUPPORTED_ATTENTION.items():
        if att.get(key, default) != default:
            raise ConfigError(f"{where}: block {i}: attention.{key}={att[key]!r} is not supported "
                              f"(released Llama-Nemotron models use {default!r})")
    if ffn.get("sparsify") is not None:
        raise ConfigError(f"{where}: block {i}: ffn.sparsify={ffn['sparsify']!r} is not supported")

    if att.get("no_op") or att.get("replace_with_linear"):
        if att.get("n_heads_in_group") is not None:
            raise ConfigError(f"{where}: block {i}: attention.n_heads_in_group must be null "
                              "for a no-op/linear attention")
        attention = AttentionConfig("none" if att.get("no_op") else "linear")
    else:
        group = att.get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or heads % group:
            raise ConfigError(f"{where}: block {i}: attention.n_heads_in_group={group!r} must be a positive "
                              f"divisor of num_attention_heads={heads}")
        attention = AttentionConfig("gqa", heads // group)

    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        if ffn.get("ffn_mult") is not None:
            raise ConfigError(f"{where}: block {i}: ffn.ffn_mult must be null for a no-op/linear FFN")
        feed = FFNConfig("none" if ffn.get("no_op") else "linear")
    else:
        mult = ffn.get("ffn_mult")
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise ConfigError(f"{where}: block {i}: ffn.ffn_mult={mult!r} must be a positive number")
        mult = round(float(mult), 6)
        feed = FFNConfig("swiglu", ffn_width(mult, hidden), mult)
    return BlockConfig(attention, feed)
