"""Blockwise local distillation (BLD): train every candidate subblock to mimic the parent's.

Decoupled and subblock-level (SPEC §5): an attention candidate of layer i sees the parent's
block input x_i and is trained towards the parent's attention delta (mid_i − x_i); an FFN
candidate sees the parent's mid-block state mid_i and is trained towards the parent's FFN delta
(out_i − mid_i). So every candidate trains independently, on the parent's own activations: one
parent forward per batch, then one jitted step per layer holding all that layer's candidates
(losses summed; gradients clipped per candidate, so they stay independent). The layers of a
homogeneous parent share one compiled step. The loss is
the normalised MSE Σ(ŷ − y)² / (Σ y² + ε) over real tokens. Parent copies and no-ops are not
trained. The optimiser is the training package's (`train.optim.make_optimizer`) after a
per-candidate clip, and checkpoints (weights, optimiser, data position) go through the training
package's `RunCheckpoints`, so the stage resumes exactly.

Legend: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from nemotron_jax.api import Model
from nemotron_jax.config import ModelConfig
from nemotron_jax.data.batch import TokenBatch as Batch
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.config import BLDConfig
from nemotron_jax.puzzle.library import Library
from nemotron_jax.train.checkpoints import RunCheckpoints
from nemotron_jax.train.optim import OptimizerConfig, make_optimizer

Trainables = dict[str, dict[str, jax.Array]]  # "slot/name" -> {"path/in/module": weight}
EPS = 1e-6


def normalized_mse(pred_BxTxD: jax.Array, target_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Σ mask·(ŷ − y)² / (Σ mask·y² + ε), float32."""
    m = mask_BxT.astype(jnp.float32)[..., None]
    diff = (pred_BxTxD.astype(jnp.float32) - target_BxTxD.astype(jnp.float32)) ** 2
    return jnp.sum(diff * m) / (jnp.sum(target_BxTxD.astype(jnp.float32) ** 2 * m) + EPS)


def layer_trainables(library: Library, layer: int, only_trainable: bool = True) -> Trainables:
    """One layer's candidates as a pytree keyed "slot/name" (the same keys in every layer of a
    homogeneous parent, so one compiled step serves all layers)."""
    return {f"{c.kind}/{c.name}": {"/".join(p): jnp.asarray(v) for p, v in c.params.items()}
            for kind in ("attention", "ffn") for c in library.candidates(layer, kind)
            if c.trainable or (not only_trainable and c.params)}


def _unkey(params: dict[str, jax.Array]) -> sb.SubParams:
    return {tuple(k.split("/")): v for k, v in params.items()}


def layer_losses(cfg: ModelConfig, trainables: Trainables, acts: tuple[jax.Array, ...], positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array) -> dict[str, jax.Array]:
    """{slot/name: normalised MSE} for one layer from the parent's (input, mid, output) of it."""
    x_in, mid, out = acts
    mask = segment_ids_BxT > 0
    losses = {}
    for key, params in trainables.items():
        kind, name = key.split("/")
        variant = sb.variant_from_name(kind, name)
        x, y = (x_in, mid - x_in) if kind == "attention" else (mid, out - mid)
        losses[key] = normalized_mse(sb.apply(cfg, variant, _unkey(params), x, positions_BxT, segment_ids_BxT), y,
                                     mask)
    return losses


@partial(jax.jit, static_argnums=0)
def parent_activations(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]
                       ) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Per layer the parent's (block input, mid-block state, block output)."""
    inputs, mids, final = nnx.merge(graphdef, state).capture(batch.inputs, batch.positions, batch.segment_ids)
    return list(zip(inputs, mids, [*inputs[1:], final], strict=True))


def _clip_each(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping per candidate (the top-level keys), so candidates stay independent."""
    def clip(updates: Trainables, params: Any = None) -> Trainables:
        out = {}
        for k, g in updates.items():
            norm = optax.tree.norm(g)
            scale = jnp.minimum(1.0, max_norm / (norm + 1e-12))
            out[k] = jax.tree.map(lambda x, s=scale: x * s, g)
        return out

    return optax.stateless(clip)


def optimizer_config(cfg: BLDConfig) -> tuple[OptimizerConfig, int]:
    """BLD's settings as the shared `OptimizerConfig` and its total steps: at least one warm-up
    step, then cosine to lr·min_lr_ratio; the clip is per candidate (`_clip_each`), not global."""
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    return OptimizerConfig(lr=cfg.lr, schedule="cosine", warmup_steps=warmup, min_lr_ratio=cfg.min_lr_ratio,
                           b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, clip_norm=None
                           ), max(cfg.steps, warmup + 1)


def bld_optimizer(cfg: BLDConfig) -> optax.GradientTransformation:
    """Clip each candidate's gradient, then the training package's AdamW on its schedule."""
    tx, _ = make_optimizer(*optimizer_config(cfg))
    return optax.chain(_clip_each(cfg.clip_norm), tx)


def evaluate(library: Library, parent: Model, batches: list[Batch], trained: dict[int, Trainables] | None = None
             ) -> dict[str, float]:
    """Mean normalised MSE per candidate ("layer/slot/name"; no-ops score 1) on `batches`."""
    graphdef, state = parent.split()
    cfg = library.parent
    per_layer = trained or {i: layer_trainables(library, i, only_trainable=False) for i in range(cfg.num_layers)}
    fn = jax.jit(partial(layer_losses, cfg))
    totals: dict[str, float] = {}
    for batch in batches:
        b = jax.device_put(batch)
        acts = parent_activations(graphdef, state, b)
        for i, t in per_layer.items():
            for k, v in fn(t, acts[i], b.positions, b.segment_ids).items():
                totals[f"{i}/{k}"] = totals.get(f"{i}/{k}", 0.0) + float(v) / len(batches)
    for i, c in library.all():
        if not c.params:
            totals[f"{i}/{c.kind}/{c.name}"] = 1.0
    return totals


def train_bld(library: Library, parent: Model, batches: Iterator[Batch], cfg: BLDConfig, ckpt_dir: str | Path,
              progress: bool = True) -> tuple[Library, list[dict[str, float]]]:
    """Train every trainable candidate for `cfg.steps` batches (resuming from `ckpt_dir`); returns
    the library with trained weights (origin `bld`) and the logged mean losses.

    `batches` is a Grain iterator (its position is checkpointed) or any iterator (a resumed run
    then continues from that iterator's current position)."""
    graphdef, parent_state = parent.split()
    mcfg = library.parent
    layers = {i: t for i in range(mcfg.num_layers) if (t := layer_trainables(library, i))}
    if not layers:
        return library, []
    tx = bld_optimizer(cfg)

    def step(trainables: Trainables, opt_state: Any, acts: tuple[jax.Array, ...], positions: jax.Array,
             segment_ids: jax.Array) -> tuple[Trainables, Any, dict[str, jax.Array]]:
        def total(t: Trainables) -> tuple[jax.Array, dict[str, jax.Array]]:
            losses = layer_losses(mcfg, t, acts, positions, segment_ids)
            return sum(losses.values()), losses

        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(trainables)
        updates, opt_state = tx.update(grads, opt_state, trainables)
        return optax.apply_updates(trainables, updates), opt_state, losses

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = {"layers": {str(i): {"trainables": t, "opt_state": tx.init(t)} for i, t in layers.items()}}
    history: list[dict[str, float]] = []
    checkpoints = RunCheckpoints(ckpt_dir, keep=1, use_async=False)
    try:
        start = checkpoints.latest_step() or 0
        if start:
            state, data_state, _ = checkpoints.restore(start, state)
            if hasattr(batches, "set_state") and data_state:
                batches.set_state(data_state)
            tqdm.write(f"bld: resuming from step {start} in {ckpt_dir}", file=sys.stderr)
        bar = tqdm(total=cfg.steps, initial=start, desc="bld", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        for s in range(start + 1, cfg.steps + 1):
            b = jax.device_put(next(batches))
            acts = parent_activations(graphdef, parent_state, b)
            step_losses = []
            for key, entry in state["layers"].items():
                t, o, losses = jitted(entry["trainables"], entry["opt_state"], acts[int(key)], b.positions,
                                      b.segment_ids)
                state["layers"][key] = {"trainables": t, "opt_state": o}
                step_losses.extend(losses.values())
            if s % 10 == 0 or s == cfg.steps:
                history.append({"step": s, "mean_loss": float(np.mean(jax.device_get(step_losses)))})
                bar.set_postfix(mean_nmse=f"{history[-1]['mean_loss']:.4f}")
            if s % cfg.checkpoint_every == 0 or s == cfg.steps:
                data_state = batches.get_state() if hasattr(batches, "get_state") else {}
                checkpoints.save(s, state, data_state, {"step": s, "kind": "bld"})
            bar.update(1)
        bar.close()
        checkpoints.wait()
    finally:
        checkpoints.close()
    trained = {int(k): v["trainables"] for k, v in state["layers"].items()}
    return with_trainables(library, trained, "bld"), history


def with_trainables(library: Library, trained: dict[int, Trainables], origin: str) -> Library:
    """A copy of `library` whose trainable candidates hold the weights in `trained`."""
    layers = []
    for i, layer in enumerate(library.layers):
        new = {}
        for kind, cands in layer.items():
            new[kind] = {}
            for name, c in cands.items():
                t = trained.get(i, {}).get(f"{kind}/{name}")
                if t is not None:
                    c = type(c)(c.variant, {p: np.asarray(v) for p, v in _unkey(t).items()}, origin, c.bld_loss)
                new[kind][name] = c
        layers.append(new)
    return type(library)(library.parent, layers)
