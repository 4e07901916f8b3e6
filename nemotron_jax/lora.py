"""LoRA on a model: add adapters, view the base without them, merge them, and PEFT adapter files.

    add_adapters(module, LoRAConfig(rank=8, alpha=16, targets=("q", "v")), seed)   # in place
    base_view(module)          the same base arrays without adapters (the RL reference: no copy)
    merge(module)              W + (alpha/r)·A·B for every adapted weight, adapters gone
    save_peft(module, dir)     adapter_config.json + adapter_model.safetensors, PEFT's names
    load_adapters(module, dir) ours or a PEFT LoRA made with PyTorch, onto `module`

HF module names come from `convert.hf.tensor_specs` (the one map from our tree to HF tensors).
Our adapter on a weight flattened to [in, out] is A [in, r], B [r, out]; PEFT's Linear is
[out, in], so `lora_A.weight` = Aᵀ [r, in] and `lora_B.weight` = Bᵀ [out, r], with the same
flattening of heads as the base weight's conversion (q [D, N·H] rows (n, h); o columns (n, h)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from nemotron_jax.config import ModelConfig
from nemotron_jax.convert.hf import tensor_specs
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.fileio import atomic_dir
from nemotron_jax.model.lora import LoRA, LoRAParam
from nemotron_jax.model.transformer import Transformer
from nemotron_jax.sharding import Layout

PEFT_PREFIX = "base_model.model."
# Target spellings (ours and HF's) -> (subblock, our weight name) they adapt.
TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "q": (("attention", "q"),), "k": (("attention", "k"),), "v": (("attention", "v"),), "o": (("attention", "o"),),
    "gate": (("ffn", "gate"),), "up": (("ffn", "up"),), "down": (("ffn", "down"),),
    "linear": (("attention", "kernel"), ("ffn", "kernel")),
    "linear_attn": (("attention", "kernel"),), "linear_mlp": (("ffn", "kernel"),),
}
TARGETS.update({f"{k}_proj": v for k, v in list(TARGETS.items()) if len(k) <= 4 and k != "linear"})
IN_AXES = {"o": 2}  # o [N, H, D]: two input axes; every other projection has one


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """A recipe's `lora:` section. rank 0: off (full fine-tuning). `targets`: projections to adapt
    (`q k v o gate up down`, `linear` for both linear replacement blocks, or HF names `q_proj`...)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "linear")

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0: off), got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or (self.rank and not self.targets):
            raise ConfigError(f"lora.targets: unknown {unknown or 'empty list'}; choose from {sorted(TARGETS)}")


def _owners(module: Transformer) -> list[tuple[int, str, nnx.Module]]:
    """(layer, subblock name, module) for every attention / FFN subblock that has weights."""
    out = []
    for i, block in enumerate(module.layers):
        for part in ("attention", "ffn"):
            sub = getattr(block, part)
            if sub is not None and hasattr(sub, "lora"):
                out.append((i, part, sub))
    return out


def _make(sub: nnx.Module, name: str, rank: int, alpha: float, dropout: float, salt: int, key: jax.Array,
          layout: Layout | None) -> LoRA:
    var = getattr(sub, name)
    shape, axes, n_in = var.shape, var.logical_axes, IN_AXES.get(name, 1)
    in_dim, out_dim = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    lora = LoRA(in_dim, out_dim, rank, alpha, dropout, salt, axes[0] if n_in == 1 else None,
                axes[-1] if len(shape) - n_in == 1 else None, key=key)
    if layout is not None:
        for p in (lora.a, lora.b):
            p.set_value(jax.device_put(p.get_value(), layout.sharding(p.logical_axes, p.shape)))
    return lora


def has_adapters(module: Transformer) -> bool:
    return any(sub.lora is not None for _, _, sub in _owners(module))


def add_adapters(module: Transformer, cfg: LoRAConfig, seed: int = 0, layout: Layout | None = None) -> int:
    """Give every targeted projection an adapter (B = 0: the model's outputs are unchanged);
    returns how many adapter weights were added."""
    cfg.validate()
    if cfg.rank <= 0:
        return 0
    if has_adapters(module):
        raise ValueError("the model already has adapters (merge or remove them first)")
    wanted = {pair for t in cfg.targets for pair in TARGETS[t]}
    key, count = jax.random.key(seed), 0
    for _, part, sub in _owners(module):
        made = {}
        for name in ("q", "k", "v", "o", "gate", "up", "down", "kernel"):
            if (part, name) in wanted and hasattr(sub, name):
                made[name] = _make(sub, name, cfg.rank, cfg.alpha, cfg.dropout, count,
                                   jax.random.fold_in(key, count), layout)
                count += 1
        if made:
            sub.lora = nnx.Dict(made)
    return count


def adapter_count(module: Transformer) -> int:
    """Trainable adapter parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, LoRAParam)))


def _clone(module: Transformer) -> Transformer:
    """A new module object over the same arrays (nothing copied)."""
    return nnx.merge(*nnx.split(module))


def base_view(module: Transformer) -> Transformer:
    """The base model without its adapters, over the same weight arrays (no copy): the reference
    policy of a LoRA RL run."""
    view = _clone(module)
    for _, _, sub in _owners(view):
        sub.lora = None
    return view


def merge(module: Transformer) -> Transformer:
    """A plain model (no adapters) whose adapted weights are W + (alpha/r)·A·B, in the base's
    dtype (a quantized base is dequantized); the other weights are shared, not copied."""
    out = base_view(module)
    originals = {(i, part): sub for i, part, sub in _owners(module)}
    for i, part, sub in _owners(out):
        adapters = originals[(i, part)].lora
        if adapters is None:
            continue
        for name, lora in adapters.items():
            var = getattr(sub, name)
            w = var.get_value()
            dtype = w.dtype
            w32 = (w.dequantize(jnp.float32) if hasattr(w, "dequantize") else w.astype(jnp.float32))
            setattr(sub, name, nnx.Param((w32 + lora.delta().reshape(w32.shape)).astype(dtype),
                                         **var.get_metadata()))
    return out


# ---------------------------------------------------------------- PEFT files


def _hf_modules(cfg: ModelConfig) -> dict[tuple, str]:
    """Our weight path -> HF module name (tensor name without `.weight`), from the conversion's map."""
    return {s.path: s.hf_name.removesuffix(".weight") for s in tensor_specs(cfg)}


def _targets(names: list[str], all_names: list[str]) -> list[str]:
    """PEFT target_modules: leaf names when every module of that leaf is adapted, else full names."""
    out = []
    for leaf in sorted({n.rsplit(".", 1)[-1] for n in names}):
        have = [n for n in names if n.endswith("." + leaf)]
        every = [n for n in all_names if n.endswith("." + leaf)]
        out += [leaf] if len(have) == len(every) else have
    return out


def save_peft(module: Transformer, path: str | Path, base_model: str | None = None) -> None:
    """Write the adapters as a PEFT LoRA adapter directory (atomic), loadable with
    `peft.PeftModel.from_pretrained(hf_model, path)` onto the model's HF export."""
    names = _hf_modules(module.config)
    tensors: dict[str, np.ndarray] = {}
    ranks, scales, dropouts = set(), set(), set()
    for i, part, sub in _owners(module):
        for name, lora in (sub.lora or {}).items():
            hf = PEFT_PREFIX + names[("layers", i, part, name)]
            a, b = np.asarray(jax.device_get(lora.a[...]), np.float32), np.asarray(jax.device_get(lora.b[...]),
                                                                                 np.float32)
            tensors[f"{hf}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{hf}.lora_B.weight"] = np.ascontiguousarray(b.T)
            ranks.add(a.shape[1])
            scales.add(lora.scale)
            dropouts.add(lora.dropout)
    if not tensors:
        raise ValueError("the model has no adapters to save")
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"adapters of several ranks / scales {sorted(ranks)} {sorted(scales)} are not supported")
    (rank,), (scale,) = ranks, scales
    modules = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
        "lora_dropout": max(dropouts), "target_modules": _targets(modules, sorted(set(names.values()))),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_dir(path) as tmp:
        if jax.process_index() == 0:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapters(module: Transformer, path: str | Path, layout: Layout | None = None) -> int:
    """Attach the LoRA adapter in `path` (PEFT layout: ours or one saved by PyTorch's peft) to
    `module` in place; every tensor must name a projection of this model. Returns the count."""
    path = Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path}: not an adapter directory (needs adapter_config.json and "
                              "adapter_model.safetensors)")
    cfg: dict[str, Any] = json.loads(config_file.read_text())
    if cfg.get("peft_type", "LORA").upper() != "LORA" or cfg.get("use_dora"):
        raise CheckpointError(f"{path}: only plain LoRA adapters are supported, got {cfg.get('peft_type')} "
                              f"(use_dora={cfg.get('use_dora')})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{path}: rank_pattern / alpha_pattern / fan_in_fan_out are not supported")
    if has_adapters(module):
        raise ValueError("the model already has adapters (merge them first)")
    by_name = {hf: p for p, hf in _hf_modules(module.config).items()}
    with safe_open(weights, "numpy") as f:
        raw = {k.replace(".default.", "."): f.get_tensor(k) for k in f.keys()}
    subs = {(i, part): sub for i, part, sub in _owners(module)}
    made: dict[tuple, dict[str, LoRA]] = {}
    for key in sorted(k for k in raw if k.endswith(".lora_A.weight")):
        hf = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        if hf not in by_name or hf + ".lora_B.weight" not in {k.removeprefix(PEFT_PREFIX) for k in raw}:
            raise CheckpointError(f"{path}: adapter tensor {key} names no projection of this model "
                                  "(or lacks its lora_B)")
        _, i, part, name = by_name[hf]
        a_RxI, b_OxR = raw[key], raw[PEFT_PREFIX + hf + ".lora_B.weight"]
        rank = a_RxI.shape[0]
        alpha = float(cfg.get("lora_alpha", rank))
        alpha = alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha  # rsLoRA scale alpha/sqrt(r)
        lora = _make(subs[(i, part)], name, rank, alpha, float(cfg.get("lora_dropout", 0.0)),
                     sum(len(v) for v in made.values()), jax.random.key(0), layout)
        if lora.a.shape != a_RxI.T.shape or lora.b.shape != b_OxR.T.shape:
            raise CheckpointError(f"{path}: {hf} adapter shapes {a_RxI.shape}, {b_OxR.shape} do not fit the "
                                  f"weight (expected A {lora.a.shape[::-1]}, B {lora.b.shape[::-1]})")
        for p, value in ((lora.a, a_RxI.T), (lora.b, b_OxR.T)):
            p.set_value(jax.device_put(jnp.asarray(value, jnp.float32), p.get_value().sharding))
        made.setdefault((i, part), {})[name] = lora
    if not made:
        raise CheckpointError(f"{path}: holds no lora_A/lora_B tensors")
    for (i, part), adapters in made.items():
        subs[(i, part)].lora = nnx.Dict(adapters)
    return sum(len(v) for v in made.values())
