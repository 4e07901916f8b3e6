"""FFN Fusion (SPEC §1, §5): a run of consecutive attention-free FFN blocks becomes one wide FFN.

Sequentially the run computes x_{j+1} = x_j + FFN_j(norm_j(x_j)). Fusion evaluates the FFNs in
parallel on the run's input instead, f(x) = x + Σ_j FFN_j(norm_j(x)), which is one ordinary
SwiGLU block: gate/up concatenated along the width, down along its input, and each FFN's own
RMSNorm gain g_j folded into its gate/up rows (norm_j(x) = g_j ⊙ x̂, so x̂ (diag(g_j) W) is
exact), under a shared unit-gain norm. The fused block is exact for the parallel formulation;
the change from sequential to parallel is what costs quality (and what KD then recovers). In the
HF DeciLM format the fused block is just a wide `ffn_mult`: the fused width Σ F_j must then be a
multiple of 256 (true whenever every F_j is).

Legend: D hidden, F width.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nemotron_jax.api import Model
from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from nemotron_jax.model.params import assemble, flat_params


def find_runs(cfg: ModelConfig, min_run: int = 2) -> list[tuple[int, int]]:
    """[start, stop) of every maximal run of >= `min_run` blocks with no attention and a SwiGLU."""
    runs, start = [], None
    for i, b in enumerate((*cfg.blocks, None)):
        fusable = b is not None and b.attention.kind == "none" and b.ffn.kind == "swiglu"
        if fusable and start is None:
            start = i
        elif not fusable and start is not None:
            if i - start >= min_run:
                runs.append((start, i))
            start = None
    return runs


def fuse_weights(norms: list[np.ndarray], gates: list[np.ndarray], ups: list[np.ndarray],
                 downs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One SwiGLU's {norm, gate [D, ΣF], up [D, ΣF], down [ΣF, D]} computing Σ_j FFN_j(norm_j(x))."""
    return {"norm": np.ones_like(np.asarray(norms[0])),
            "gate": np.concatenate([np.asarray(g)[:, None] * np.asarray(w) for g, w in zip(norms, gates, strict=True)],
                                   axis=1),
            "up": np.concatenate([np.asarray(g)[:, None] * np.asarray(w) for g, w in zip(norms, ups, strict=True)],
                                 axis=1),
            "down": np.concatenate([np.asarray(w) for w in downs], axis=0)}


def fused_config(cfg: ModelConfig, runs: list[tuple[int, int]]) -> ModelConfig:
    """The config with each run replaced by one attention-free block of the summed width."""
    blocks: list[BlockConfig] = []
    starts = {s: e for s, e in runs}
    i = 0
    while i < cfg.num_layers:
        if i in starts:
            width = sum(cfg.blocks[j].ffn.intermediate_size for j in range(i, starts[i]))
            blocks.append(BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", width)))
            i = starts[i]
        else:
            blocks.append(cfg.blocks[i])
            i += 1
    return cfg.replace(blocks=tuple(blocks))


def fuse(model: Model, runs: list[tuple[int, int]] | None = None, min_run: int = 2) -> Model:
    """The model with each run (default: every run of `find_runs`) fused into one wide FFN block."""
    cfg = model.config
    runs = find_runs(cfg, min_run) if runs is None else sorted(runs)
    for s, e in runs:
        bad = [j for j in range(s, e) if cfg.blocks[j].attention.kind != "none" or cfg.blocks[j].ffn.kind != "swiglu"]
        if e - s < 1 or bad:
            raise ValueError(f"run [{s}, {e}) is not a run of attention-free SwiGLU blocks (blocks {bad})")
    if not runs:
        return model
    flat = {k: np.asarray(v) for k, v in flat_params(model.module).items()}
    out = {k: v for k, v in flat.items() if k[0] != "layers"}
    starts = {s: e for s, e in runs}
    src, dst = 0, 0
    while src < cfg.num_layers:
        if src in starts:
            layers = range(src, starts[src])
            fused = fuse_weights(*([flat[("layers", j, "ffn", *p)] for j in layers]
                                   for p in (("norm", "weight"), ("gate",), ("up",), ("down",))))
            out[("layers", dst, "ffn", "norm", "weight")] = fused["norm"]
            for name in ("gate", "up", "down"):
                out[("layers", dst, "ffn", name)] = fused[name]
            src = starts[src]
        else:
            for k, v in flat.items():
                if k[0] == "layers" and k[1] == src:
                    out[("layers", dst, *k[2:])] = v
            src += 1
        dst += 1
    new_cfg = fused_config(cfg, runs)
    dtype = jnp.dtype(model.policy.param_dtype)
    return Model(assemble(new_cfg, model.policy, {k: jnp.asarray(v, dtype) for k, v in out.items()}), model.layout)
