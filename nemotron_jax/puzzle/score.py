"""Replace-one-block scoring: how much the parent's output changes when one subblock is swapped.

For a candidate of layer i the child is the parent with only that subblock replaced; its
quality is KL(parent ‖ child) of the next-token distributions (SPEC §5: the best of the metrics
tried in the paper), and its LM loss, on held-out data. Nothing before layer i changes, so the
parent runs once per batch and its per-layer activations are cached (`Transformer.capture`); a
candidate then runs as the parent's block i with that one subblock swapped (the model's own
`Block`, via `subblocks.block_for`: an attention candidate its `attend` and the parent's FFN
`feed`, an FFN candidate only `feed` of the cached mid-block state), then layers i+1.. from
there (`Transformer.logits_from`). An architecture's quality is the sum of its subblocks' scores.

Legend: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from nemotron_jax.api import Model
from nemotron_jax.config import BlockConfig, ModelConfig
from nemotron_jax.data.batch import TokenBatch as Batch
from nemotron_jax.model.params import flat_params
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.bld import parent_activations
from nemotron_jax.puzzle.library import Library

Scores = list[dict[str, dict[str, dict[str, float]]]]  # [layer][slot][name] -> {kl, lm_loss}


def kl_and_ce(logits_BxTxV: jax.Array, parent_logp_BxTxV: jax.Array, targets_BxT: jax.Array,
              weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Σ w·KL(parent‖child), Σ w·CE(child), Σ w) over tokens, float32."""
    logq = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(parent_logp_BxTxV) * (parent_logp_BxTxV - logq), axis=-1)
    ce = -jnp.take_along_axis(logq, targets_BxT[..., None], axis=-1)[..., 0]
    w = weights_BxT.astype(jnp.float32)
    return jnp.sum(kl * w), jnp.sum(ce * w), jnp.sum(w)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _half(cfg: ModelConfig, block: BlockConfig, half: str, params: dict[str, sb.SubParams], x: jax.Array,
          positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """One residual half ("attend" or "feed") of the model's own `Block` holding `params`."""
    module = sb.block_for(cfg, block, params)
    return module.attend(x, positions, segment_ids)[0] if half == "attend" else module.feed(x)


@partial(jax.jit, static_argnums=(0, 2))
def _tail(graphdef: nnx.GraphDef, state: nnx.State, start: int, x: jax.Array, batch: dict[str, jax.Array],
          parent_logp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = nnx.merge(graphdef, state).logits_from(start, x, batch.positions, batch.segment_ids)
    return kl_and_ce(logits, parent_logp, batch.targets, batch.weights)


@partial(jax.jit, static_argnums=(0, 3))
def _parent_logp(graphdef: nnx.GraphDef, state: nnx.State, final: jax.Array, layers: int) -> jax.Array:
    return jax.nn.log_softmax(nnx.merge(graphdef, state).logits_from(layers, final, None), axis=-1)


class ParentCache:
    """The parent's per-layer activations and log-probabilities on held-out batches, computed once."""

    def __init__(self, parent: Model, batches: list[Batch]):
        self.graphdef, self.state = parent.split()
        self.config = parent.config
        self.batches = [jax.device_put(b) for b in batches]
        self.acts, self.logp = [], []
        for b in self.batches:
            acts = parent_activations(self.graphdef, self.state, b)
            self.acts.append(acts)
            self.logp.append(_parent_logp(self.graphdef, self.state, acts[-1][2], self.config.num_layers))
        flat = flat_params(parent.module)
        self.parent_params = {(i, kind): sb.block_params(flat, i, kind)
                              for i in range(self.config.num_layers) for kind in ("attention", "ffn")}

    def tail_from(self, start: int, states: list[jax.Array]) -> dict[str, float]:
        """KL and LM loss when the state entering layer `start` is `states[b]` for batch b."""
        kl = ce = w = 0.0
        for b, x, logp in zip(self.batches, states, self.logp, strict=True):
            k, c, n = _tail(self.graphdef, self.state, start, x, b, logp)
            kl, ce, w = kl + float(k), ce + float(c), w + float(n)
        w = max(w, 1.0)
        return {"kl": kl / w, "lm_loss": ce / w}

    def replace_one(self, layer: int, variant: sb.Variant, params: sb.SubParams) -> dict[str, float]:
        """Scores of the parent with subblock `variant` (weights `params`) at `layer`."""
        cfg, kind = self.config, sb.kind_of(variant)
        att, ffn = sb.parent_variants(cfg, layer)
        block = BlockConfig(sb.plain_variant(variant), ffn) if kind == "attention" else BlockConfig(
            att, sb.plain_variant(variant))
        weights = {"attention": self.parent_params[(layer, "attention")], "ffn": self.parent_params[(layer, "ffn")],
                   kind: params}
        outs = []
        for b, acts in zip(self.batches, self.acts, strict=True):
            x_in, mid, _ = acts[layer]
            if kind == "attention":
                mid = _half(cfg, block, "attend", weights, x_in, b.positions, b.segment_ids)
            outs.append(_half(cfg, block, "feed", weights, mid, b.positions, b.segment_ids))
        return self.tail_from(layer + 1, outs)

    def parent_scores(self) -> dict[str, float]:
        return self.tail_from(self.config.num_layers, [acts[-1][2] for acts in self.acts])


def score_library(parent: Model, library: Library, batches: list[Batch], progress: bool = False
                  ) -> tuple[Scores, dict[str, float]]:
    """(scores[layer][slot][name] = {kl, lm_loss}, the parent's own {kl: 0, lm_loss})."""
    cache = ParentCache(parent, batches)
    base = cache.parent_scores()
    scores: Scores = [{"attention": {}, "ffn": {}} for _ in library.layers]
    todo = library.all()
    for i, c in tqdm(todo, desc="score", disable=not progress, leave=False):
        if c.origin == "parent":
            scores[i][c.kind][c.name] = {"kl": 0.0, "lm_loss": base["lm_loss"]}
        else:
            params = {p: jnp.asarray(v) for p, v in c.params.items()}
            scores[i][c.kind][c.name] = cache.replace_one(i, c.variant, params)
    return scores, base


def scores_table(scores: Scores, metric: str = "kl") -> list[dict[str, Any]]:
    """Rows (layer, slot, variant, metric) for a summary table."""
    return [{"layer": i, "slot": kind, "variant": name, metric: round(v[metric], 5)}
            for i, layer in enumerate(scores) for kind in ("attention", "ffn") for name, v in layer[kind].items()]
