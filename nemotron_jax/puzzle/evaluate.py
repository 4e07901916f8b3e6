"""Held-out quality of a model on the learned task: LM loss, next-token accuracy, KL to the parent.

Averages run over the weighted target tokens of packed eval batches. `likelihood` is the
per-token geometric-mean probability of the targets, exp(−LM loss), which is what "keeps x % of
the parent's likelihood" compares.

Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemotron_jax.api import Model
from nemotron_jax.data.batch import TokenBatch as Batch


@partial(jax.jit, static_argnums=0)
def _logp(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    logits, _ = nnx.merge(graphdef, state)(batch.inputs, batch.positions, batch.segment_ids)
    return jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def _sums(logq_BxTxV: jax.Array, logp_BxTxV: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    w = batch.weights.astype(jnp.float32)
    ce = -jnp.take_along_axis(logq_BxTxV, batch.targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logq_BxTxV, axis=-1) == batch.targets).astype(jnp.float32)
    kl = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - logq_BxTxV), axis=-1)
    return {"lm_loss": jnp.sum(ce * w), "accuracy": jnp.sum(correct * w), "kl": jnp.sum(kl * w), "weight": jnp.sum(w)}


def evaluate(model: Model, batches: list[Batch], parent: Model | None = None) -> dict[str, float]:
    """{lm_loss, accuracy, likelihood, kl (to `parent`; 0 without one)} over `batches`."""
    graphdef, state = model.split()
    pg, ps = parent.split() if parent is not None else (None, None)
    totals: dict[str, float] = {}
    for batch in batches:
        b = jax.device_put(batch)
        logq = _logp(graphdef, state, b)
        logp = _logp(pg, ps, b) if parent is not None else logq
        for k, v in _sums(logq, logp, b).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    w = max(totals.pop("weight", 0.0), 1.0)
    out = {k: v / w for k, v in totals.items()}
    out["likelihood"] = float(np.exp(-out["lm_loss"]))
    return out
