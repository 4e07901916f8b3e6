"""The Hugging Face `config.json` codec: HF dicts ⇄ our `ModelConfig` field dicts.

Both HF layouts are read: DeciLM (`block_configs`, `model_type: nemotron-nas`, FFN widths as
`ffn_mult`) and plain Llama (one `num_key_value_heads` / `intermediate_size` for every layer), in
the transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) spellings.

It works on plain dicts and imports nothing from `nemotron_jax.config`, so that `config.py` can
call it (a downward import to a leaf) without a cycle. Our side is the `ModelConfig.from_dict`
form with one mapping per layer, `{"attention": {"kind", "num_kv_heads"}, "ffn": {"kind",
"intermediate_size", "ffn_mult"}}`: the dataclass fields themselves, so no block grammar is
involved. Errors name the file (or `<dict>`), the block and the field; the model-level validation
(head counts, widths) stays with `ModelConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemotron_jax.errors import ConfigError

# HF bookkeeping keys that carry nothing for the forward pass; everything else must be understood.
_IGNORED_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "auto_map", "transformers_version", "use_cache",
    "initializer_range", "pretraining_tp", "attention_dropout", "torch_dtype", "dtype",
    "pad_token_id", "output_attentions", "output_hidden_states", "return_dict", "quantization_config",
    "block_return_logits",
})
_KNOWN_HF_KEYS = _IGNORED_HF_KEYS | {
    "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "attention_bias", "mlp_bias", "head_dim", "block_configs",
}
_KNOWN_ATTENTION_KEYS = frozenset({
    "n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "num_sink_tokens",
    "window_length", "unshifted_sink", "use_prefill_window_in_sink_attention",
})
_KNOWN_FFN_KEYS = frozenset({"ffn_mult", "no_op", "replace_with_linear", "sparsify"})
# Attention options released models never use; refusing them beats silently computing something else.
_UNSUPPORTED_ATTENTION = {"sparsify": None, "num_sink_tokens": None, "window_length": None,
                          "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}
# The published DeciLM code lives in NVIDIA's model repos, not beside our weights: an export points
# there with transformers' "repo--module.Class" form, so `trust_remote_code=True` fetches it from the
# Hub (vLLM reads the same config class, then runs its own native DeciLMForCausalLM).
DECILM_CODE_REPO = "nvidia/Llama-3_3-Nemotron-Super-49B-v1"
_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
             "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
# LlamaConfig fields the published DeciLM configs spell out (their defaults), written for fidelity.
_DECILM_DEFAULTS = {"attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True}


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


def read(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the HF config dict, where it came from) for a `config.json` path, an HF directory or a dict."""
    if isinstance(source, Mapping):
        return dict(source), "<dict>"
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
    return data, str(path)


# ---------------------------------------------------------------- HF -> ours
def hf_to_compact(data: Mapping[str, Any], where: str = "<dict>") -> dict[str, Any]:
    """The `ModelConfig.from_dict` fields of an HF config (blocks as one mapping per layer)."""
    data = dict(data)
    unknown = sorted(set(data) - _KNOWN_HF_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act must be 'silu', got {data['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            raise ConfigError(f"{where}: {key}=true is not supported (Llama-Nemotron has no biases)")

    hidden = _int(data, "hidden_size", where)
    heads = _int(data, "num_attention_heads", where)
    rope_theta, scaling = _rope(data, where)
    eos = data.get("eos_token_id", [])
    eos_ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
    layers = _int(data, "num_hidden_layers", where)

    if data.get("block_configs") is not None:
        raw_blocks = data["block_configs"]
        if not isinstance(raw_blocks, list) or len(raw_blocks) != layers:
            raise ConfigError(f"{where}: block_configs must be a list of num_hidden_layers={layers} entries")
        blocks = [_block_from_hf(b, i, heads, hidden, where) for i, b in enumerate(raw_blocks)]
    else:
        kv = data.get("num_key_value_heads") or heads
        width = _int(data, "intermediate_size", where)
        blocks = [{"attention": {"kind": "gqa", "num_kv_heads": kv},
                   "ffn": {"kind": "swiglu", "intermediate_size": width}} for _ in range(layers)]

    return {
        "vocab_size": _int(data, "vocab_size", where), "hidden_size": hidden,
        "num_attention_heads": heads, "blocks": blocks, "head_dim": data.get("head_dim"),
        "rms_norm_eps": float(data.get("rms_norm_eps", 1e-5)), "rope_theta": rope_theta,
        "rope_scaling": scaling, "max_position_embeddings": int(data.get("max_position_embeddings", 131072)),
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", False)),
        "bos_token_id": data.get("bos_token_id"), "eos_token_ids": eos_ids,
        "torch_dtype": str(data.get("torch_dtype") or data.get("dtype") or "bfloat16"),
    }


def _int(data: Mapping[str, Any], key: str, where: str) -> int:
    if key not in data:
        raise ConfigError(f"{where}: missing required key {key!r}")
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _rope(data: Mapping[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
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
        return theta, {
            "factor": float(scaling["factor"]), "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192))}
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling is missing {e}") from None


def _block_from_hf(raw: Any, i: int, heads: int, hidden: int, where: str) -> dict[str, dict[str, Any]]:
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
        attention = {"kind": "none" if att.get("no_op") else "linear"}
    else:
        group = att.get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or heads % group:
            raise ConfigError(f"{where}: block {i}: attention.n_heads_in_group={group!r} must be a positive "
                              f"divisor of num_attention_heads={heads}")
        attention = {"kind": "gqa", "num_kv_heads": heads // group}

    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        if ffn.get("ffn_mult") is not None:
            raise ConfigError(f"{where}: block {i}: ffn.ffn_mult must be null for a no-op/linear FFN")
        feed = {"kind": "none" if ffn.get("no_op") else "linear"}
    else:
        mult = ffn.get("ffn_mult")
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise ConfigError(f"{where}: block {i}: ffn.ffn_mult={mult!r} must be a positive number")
        mult = round(float(mult), 6)
        feed = {"kind": "swiglu", "intermediate_size": ffn_width(mult, hidden), "ffn_mult": mult}
    return {"attention": attention, "ffn": feed}


# ---------------------------------------------------------------- ours -> HF
def compact_to_hf(cfg: Mapping[str, Any], format: str = "decilm", code_repo: str = DECILM_CODE_REPO,
                  ) -> dict[str, Any]:
    """The HF `config.json` dict, DeciLM layout (default) or Llama layout (homogeneous models only).

    `cfg` is a validated `ModelConfig`'s field dict (`dataclasses.asdict`): blocks as mappings,
    `head_dim` resolved. The DeciLM `auto_map` names the modeling code in `code_repo` on the Hub.
    """
    hidden, heads, blocks = cfg["hidden_size"], cfg["num_attention_heads"], list(cfg["blocks"])
    rope, eos = cfg["rope_scaling"], list(cfg["eos_token_ids"])
    common: dict[str, Any] = {
        "vocab_size": cfg["vocab_size"], "hidden_size": hidden,
        "num_attention_heads": heads, "num_hidden_layers": len(blocks),
        "hidden_act": "silu", "rms_norm_eps": cfg["rms_norm_eps"], "rope_theta": cfg["rope_theta"],
        "rope_scaling": None if rope is None else {
            "factor": rope["factor"], "high_freq_factor": rope["high_freq_factor"],
            "low_freq_factor": rope["low_freq_factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "rope_type": "llama3"},
        "max_position_embeddings": cfg["max_position_embeddings"],
        "tie_word_embeddings": cfg["tie_word_embeddings"], "attention_bias": False, "mlp_bias": False,
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": cfg["torch_dtype"],
    }
    if cfg.get("head_dim") is not None and cfg["head_dim"] != hidden // heads:
        common["head_dim"] = cfg["head_dim"]
    if format == "llama":
        shapes = {(b["attention"]["kind"], b["attention"].get("num_kv_heads"),
                   b["ffn"]["kind"], b["ffn"].get("intermediate_size")) for b in blocks}
        if len(shapes) != 1 or next(iter(shapes))[0::2] != ("gqa", "swiglu"):
            raise ConfigError("only a homogeneous model (every block the same GQA + SwiGLU) "
                              "can be written in Llama layout; use format='decilm'")
        _, kv, _, width = shapes.pop()
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "num_key_value_heads": kv, "intermediate_size": width}
    if format != "decilm":
        raise ConfigError(f"unknown HF format {format!r}; expected 'decilm' or 'llama'")
    if not isinstance(code_repo, str) or code_repo.count("/") != 1 or "--" in code_repo:
        raise ConfigError(f"code_repo must be a Hub repo id 'owner/name' (without '--'), got {code_repo!r}")
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {auto: f"{code_repo}--{ref}" for auto, ref in _AUTO_MAP.items()},
        **common, **_DECILM_DEFAULTS, "intermediate_size": None, "num_key_value_heads": None,
        "block_configs": [_block_to_hf(b, heads, hidden) for b in blocks],
    }


def ecosystem_warnings(hf: Mapping[str, Any]) -> list[str]:
    """What in an HF config.json some loader cannot run, one sentence each (empty: loads everywhere).

    vLLM's native `DeciLMForCausalLM` (model_executor/models/nemotron_nas.py) builds every block
    that is not a no-op as GQA attention / SwiGLU from `n_heads_in_group` / `ffn_mult`: it has no
    linear replacement blocks. transformers' remote DeciLM code runs them.
    """
    linear = [i for i, b in enumerate(hf.get("block_configs") or [])
              if b["attention"].get("replace_with_linear") or b["ffn"].get("replace_with_linear")]
    if not linear:
        return []
    return [f"blocks {linear} are linear replacements: transformers (trust_remote_code=True) loads this "
            "checkpoint, vLLM's DeciLMForCausalLM does not (it has no linear attention/FFN blocks)"]


def _block_to_hf(block: Mapping[str, Any], heads: int, hidden: int) -> dict[str, Any]:
    att, ffn = block["attention"], block["ffn"]
    attention = {
        "n_heads_in_group": heads // att["num_kv_heads"] if att["kind"] == "gqa" else None,
        "no_op": att["kind"] == "none", "replace_with_linear": att["kind"] == "linear",
        **_UNSUPPORTED_ATTENTION,
    }
    mult = None
    if ffn["kind"] == "swiglu":
        mult = ffn.get("ffn_mult")
        if mult is None:
            mult = ffn_mult_for_width(ffn["intermediate_size"], hidden)
    return {"attention": attention,
            "ffn": {"ffn_mult": mult, "no_op": ffn["kind"] == "none",
                    "replace_with_linear": ffn["kind"] == "linear", "sparsify": None}}
