"""DPO / RPO recipes: offline from preference pairs in JSONL, or online with a reward function.

Offline, iteration i trains on pairs [i*P, (i+1)*P) of a seeded Grain shuffle of the file.
Online, iteration i samples G responses per prompt from the current weights, scores them, and
pairs each group's best with its worst (reward gap kept for RPO). The reference policy is the
frozen starting model, run inside the same jitted step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np
from flax import nnx

from nemotron_jax.data.sources import open_source
from nemotron_jax.model.model import Model
from nemotron_jax.rl.config import DPOConfig, PromptConfig, SamplingConfig
from nemotron_jax.rl.grpo import RolloutSource
from nemotron_jax.rl.loop import run_policy_loop
from nemotron_jax.rl.preference import check_pair, encode_pair, online_pairs, pair_batch
from nemotron_jax.rl.rollout import rollout_metrics
from nemotron_jax.rl.strategies import PreferenceStrategy
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.loop import TrainResult


def run_dpo(recipe: Any, model: Model, tokenizer: Tokenizer, cfg: DPOConfig, sampling: SamplingConfig,
            prompts: PromptConfig) -> TrainResult:
    strategy = PreferenceStrategy(cfg.beta, cfg.loss, cfg.eta, recipe.loss_chunk_tokens)
    if cfg.online:
        source = RolloutSource(recipe, model, tokenizer, sampling, prompts, cfg.pairs_per_iteration)

        def produce(i: int, params: nnx.State) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
            r = source.iteration(i, params)
            pairs = online_pairs(r)
            metrics = {**rollout_metrics(r), "pairs": float(len(pairs))}
            if not pairs:
                return None, metrics  # every group tied: nothing to prefer this time
            return pair_batch([encode_pair(tokenizer, p) for p in pairs], cfg.seq_len), metrics
    else:
        records = _pairs(cfg.pairs_path, Path(recipe.output_dir), recipe.seed)
        order = grain.MapDataset.range(len(records)).shuffle(seed=recipe.seed).repeat()
        per = cfg.pairs_per_iteration

        def produce(i: int, params: nnx.State) -> tuple[dict[str, np.ndarray], dict[str, float]]:
            chosen = [records[order[k]] for k in range(i * per, (i + 1) * per)]
            return pair_batch([encode_pair(tokenizer, r) for r in chosen], cfg.seq_len), {}

    return run_policy_loop(recipe, model, strategy, produce, cfg.updates_per_iteration, desc=cfg.loss)


def _pairs(path: str, out: Path, seed: int) -> list[dict[str, Any]]:
    if path.startswith("synthetic:"):
        from nemotron_jax.data import synthetic

        path = str(synthetic.ensure(path.split(":", 1)[1], out / "pairs.jsonl", 1000, seed=seed + 2))
    source = open_source(path, check=check_pair)
    return [source[i] for i in range(len(source))]
