"""DPO / RPO pair sources: offline from preference pairs in JSONL, or online from rollouts.

Offline, iteration i trains on pairs [i*P, (i+1)*P) of a seeded Grain shuffle of the file.
Online, iteration i samples G responses per prompt from the current weights, scores them, and
pairs each group's best with its worst (reward gap kept for RPO). The reference policy is the
frozen starting model, run inside the same jitted step (`train.loop.run`'s teacher).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grain
import jax
from flax import nnx

from nemotron_jax.api import Model
from nemotron_jax.data import synthetic
from nemotron_jax.data.batch import PairBatch
from nemotron_jax.data.sources import open_source
from nemotron_jax.errors import ConfigError
from nemotron_jax.rl.config import DPORecipe
from nemotron_jax.rl.grpo import RolloutSampler
from nemotron_jax.rl.preference import check_pair, encode_pair, online_pairs, pair_batch
from nemotron_jax.rl.rollout import rollout_metrics
from nemotron_jax.rl.strategies import PreferenceStrategy
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.sources import StepCounter, host_rows


def _row_multiple(model: Model) -> int:
    """Rows of a batch must split evenly over the mesh's batch shards and over the hosts."""
    return math.lcm(model.layout.batch_shards if model.layout is not None else 1, jax.process_count())


class OfflinePairSource(StepCounter):
    def __init__(self, recipe: DPORecipe, model: Model, tokenizer: Tokenizer):
        super().__init__()
        cfg = recipe.dpo
        out = Path(recipe.output_dir) / "pairs.jsonl"
        path = synthetic.materialize(cfg.pairs_path, out, 1000, seed=recipe.seed + 2)
        source = open_source(path, check=check_pair)
        self.records = [source[i] for i in range(len(source))]
        self.order = grain.MapDataset.range(len(self.records)).shuffle(seed=recipe.seed).repeat()
        self.tokenizer, self.per, self.seq_len = tokenizer, cfg.pairs_per_iteration, cfg.seq_len
        if (2 * self.per) % _row_multiple(model):
            raise ConfigError(f"dpo.pairs_per_iteration={self.per} gives {2 * self.per} rows, which do not split over "
                              f"{_row_multiple(model)} batch shards and hosts; use a multiple of "
                              f"{_row_multiple(model) // math.gcd(_row_multiple(model), 2)}")

    def next_batch(self, step: int, params: nnx.State) -> tuple[PairBatch, dict[str, float]]:
        self.done = step
        chosen = [self.records[self.order[k]] for k in range((step - 1) * self.per, step * self.per)]
        return host_rows(pair_batch([encode_pair(self.tokenizer, r) for r in chosen], self.seq_len)), {}


class OnlinePairSource(StepCounter):
    def __init__(self, recipe: DPORecipe, model: Model, tokenizer: Tokenizer):
        super().__init__()
        self.sampler = RolloutSampler(recipe, model, tokenizer, recipe.dpo.pairs_per_iteration)
        self.tokenizer, self.seq_len = tokenizer, recipe.dpo.seq_len
        self.pairs_multiple = _row_multiple(model) // math.gcd(_row_multiple(model), 2)

    def next_batch(self, step: int, params: nnx.State) -> tuple[PairBatch | None, dict[str, Any]]:
        self.done = step
        r = self.sampler.iteration(step - 1, params)
        found = online_pairs(r)
        pairs = found[:len(found) - len(found) % self.pairs_multiple]  # rows = 2 per pair split over mesh/hosts
        metrics = {**rollout_metrics(r), "pairs": float(len(pairs)), "pairs_dropped": float(len(found) - len(pairs))}
        if not pairs:
            return None, metrics  # every group tied: nothing to prefer this time
        return host_rows(pair_batch([encode_pair(self.tokenizer, p) for p in pairs], self.seq_len)), metrics


def pair_source(recipe: DPORecipe, model: Model, tokenizer: Tokenizer) -> OfflinePairSource | OnlinePairSource:
    kind = OnlinePairSource if recipe.dpo.online else OfflinePairSource
    return kind(recipe, model, tokenizer)


def preference_strategy(recipe: DPORecipe) -> PreferenceStrategy:
    d = recipe.dpo
    return PreferenceStrategy(d.beta, d.loss, d.eta, recipe.loss_chunk_tokens)
