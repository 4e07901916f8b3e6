"""The optimiser: AdamW with clipping, warm-up + cosine / linear / constant schedules.

Master weights stay in the parameter dtype (float32 by default) and so do the Adam moments;
matmuls run in `Policy.compute_dtype` (e.g. bfloat16) because the modules cast weights at use,
so gradients arrive in float32 against float32 weights. Gradient accumulation is a scan over
microbatches inside the train step (`train.step`), so one step is always one update.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax

from nemotron_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. `warmup_steps` wins over `warmup_ratio` when set; `min_lr_ratio` is the
    fraction of `lr` the cosine / linear decay ends at. SPEC §4: SFT uses ~10 % warm-up and
    cosine; BLD uses (0.9, 0.95), weight decay 0.1, clip 1.0."""

    lr: float = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def validate(self) -> None:
        """Refuse settings that would silently train wrong (a negative lr ascends the loss)."""
        checks = [("lr", self.lr > 0, "> 0"), ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
                  ("b2", 0 <= self.b2 < 1, "in [0, 1)"), ("eps", self.eps > 0, "> 0"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
                  ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, ">= 0"),
                  ("clip_norm", self.clip_norm is None or self.clip_norm > 0, "> 0 (or null for no clipping)")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"optimizer.{name} must be {expected}, got {getattr(self, name)}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates applied."""
    total_steps = max(int(total_steps), 1)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    warmup = min(max(warmup, 0), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        raise ValueError(f"optimizer.schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _decay_mask(params):
    """Decay matrices only: norms (1-D gains) keep their scale."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule): global-norm clipping, then AdamW on the schedule."""
    cfg.validate()
    schedule = make_schedule(cfg, total_steps)
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule
