"""GRPO (and RLOO) as a batch source: each iteration samples G responses per prompt from the
current weights, scores them on host and turns rewards into group advantages; the one loop
(`train.loop.run`) then takes K clipped-ratio updates on that batch with `GRPOStrategy`, the
frozen reference policy for the KL term being its "teacher". Rollout, scoring and update each
report their time and tokens/s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from nemotron_jax import rewards
from nemotron_jax.api import Model
from nemotron_jax.data.batch import PolicyBatch
from nemotron_jax.rl.config import GRPORecipe, RLRecipe
from nemotron_jax.rl.prompts import PromptSchedule, load_heldout_prompts, load_prompts, measure_pass_rates
from nemotron_jax.rl.rollout import (
    advantages_for,
    bucket,
    informative_rows,
    policy_batch,
    reshard_params,
    rollout,
    rollout_metrics,
)
from nemotron_jax.rl.strategies import GRPOStrategy
from nemotron_jax.sharding import Layout
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.sources import StepCounter, host_rows


class RolloutSampler:
    """Prompts (with toggle mix, filtering, curriculum) + sampling: rollouts from given weights."""

    def __init__(self, recipe: RLRecipe, model: Model, tokenizer: Tokenizer, per_iteration: int):
        sampling, prompts_cfg = recipe.sampling, recipe.prompts
        self.graphdef = nnx.graphdef(model.module)
        self.tokenizer, self.sampling, self.seed = tokenizer, sampling, recipe.seed
        self.rollout_layout: Layout | None = (sampling.rollout_mesh.layout() if sampling.rollout_mesh is not None
                                              else model.layout)
        self.reward_fn = rewards.load_reward(sampling.reward) if sampling.reward else None
        # The rollout policy: the trainer's module structure on the rollout layout, its weights
        # swapped in before every rollout; its engine (pools, compiled steps) lives across them.
        self.policy = Model(nnx.merge(self.graphdef, nnx.state(model.module)), self.rollout_layout)
        out = Path(recipe.output_dir)
        prompts = load_prompts(prompts_cfg, recipe.seed, out)
        rates = None
        if prompts_cfg.max_pass_rate is not None or prompts_cfg.curriculum:
            params = nnx.state(model.module)
            rates = measure_pass_rates(prompts, lambda ps: self.sample(
                params, ps, group=prompts_cfg.pass_rate_samples, seed=recipe.seed).accuracy, out / "pass_rates.json")
        self.schedule = PromptSchedule(prompts, per_iteration, recipe.seed, recipe.steps, prompts_cfg, rates)
        if self.schedule.dropped:
            tqdm.write(f"rl: dropped {self.schedule.dropped} prompts solved >= {prompts_cfg.max_pass_rate:.0%} "
                       "of the time by the starting policy")

    def sample(self, params: nnx.State, prompts: list, group: int | None = None, seed: int = 0) -> Any:
        s = self.sampling
        if s.rollout_mesh is not None:
            params = reshard_params(params, self.graphdef, self.rollout_layout)
        nnx.update(self.policy.module, params)
        return rollout(self.policy, self.tokenizer, prompts, group or s.group_size, s.max_new_tokens,
                       temperature=s.temperature, top_p=s.top_p, seed=seed,
                       reward_fn=self.reward_fn, format_weight=s.format_weight,
                       reward_timeout_s=s.reward_timeout_s, max_thinking_tokens=s.max_thinking_tokens)

    def iteration(self, i: int, params: nnx.State) -> Any:
        r = self.sample(params, self.schedule.batch(i), seed=self.seed * 1_000_003 + i)
        for error in r.reward_errors[:3]:
            tqdm.write(f"rl: reward error at iteration {i + 1}, {error}")
        return r


class GRPOSource(StepCounter):
    """Iteration i: rollouts of the schedule's prompts from the current weights -> a `PolicyBatch`
    of the informative groups with their advantages; held-out accuracy every `eval_every`."""

    def __init__(self, recipe: GRPORecipe, model: Model, tokenizer: Tokenizer):
        super().__init__()
        self.recipe, self.cfg = recipe, recipe.grpo
        self.sampler = RolloutSampler(recipe, model, tokenizer, recipe.grpo.prompts_per_iteration)
        self.heldout = load_heldout_prompts(recipe.prompts, recipe.seed)
        shards = model.layout.batch_shards if model.layout is not None else 1
        self.shards = math.lcm(shards, jax.process_count())  # rows split evenly over the mesh and the hosts

    def next_batch(self, step: int, params: nnx.State) -> tuple[PolicyBatch | None, dict[str, float]]:
        i, cfg, recipe = step - 1, self.cfg, self.recipe
        self.done = step
        r = self.sampler.iteration(i, params)
        metrics = rollout_metrics(r)
        if self.heldout and recipe.eval_every and (i == 0 or step % recipe.eval_every == 0):
            h = rollout_metrics(self.sampler.sample(params, self.heldout, group=4, seed=recipe.seed + 99))
            metrics.update({f"heldout_{k}": v for k, v in h.items() if k.startswith(("accuracy", "format_rate"))})
        total = len(r.responses)
        rows = informative_rows(r) if cfg.skip_flat_groups and cfg.kl_coef == 0 else list(range(total))
        metrics["update_fraction"] = len(rows) / total
        if not rows:
            return None, metrics
        # Few shapes, few compilations: one sequence bucket for the longest possible row, and a
        # power-of-two row count of at least a quarter of the rollout, split evenly over the mesh.
        seq_len = bucket(max(len(p) for p in r.prompt_ids) + recipe.sampling.max_new_tokens - 1)
        num_rows = min(total, max(total // 4, 1 << (len(rows) - 1).bit_length()))
        num_rows = -(-num_rows // self.shards) * self.shards
        batch = policy_batch(r, advantages_for(r, cfg.advantage, cfg.normalize_std), cfg.aggregation,
                             seq_len=seq_len, rows=rows, num_rows=num_rows)
        return host_rows(batch), metrics


def grpo_strategy(recipe: GRPORecipe) -> GRPOStrategy:
    g = recipe.grpo
    return GRPOStrategy(g.clip_low, g.clip_high, g.kl_coef, g.aggregation, recipe.loss_chunk_tokens)
