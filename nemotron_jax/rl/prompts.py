"""Prompt selection for RL: Grain source, toggle mix, pass-rate filtering, Gaussian curriculum.

Which prompts iteration `i` uses is a pure function of (seed, i, pass rates), so a resumed run
draws exactly the prompts the uninterrupted run would have, with nothing but `i` to checkpoint.

- Toggle mix: prompt j is reasoning-on with probability `thinking_ratio`, fixed per prompt by seed.
- Pass-rate filtering (SPEC §4): prompts a reference model already solves >= `max_pass_rate` of
  the time are dropped (they teach nothing); rates are measured with our sampler, G samples each.
- Curriculum: each batch samples prompts with weights from a Gaussian over pass rate whose centre
  moves linearly from easy (high pass rate) to hard (low) across the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np
from tqdm.auto import tqdm

from nemotron_jax.data import synthetic
from nemotron_jax.data.sources import eval_records, open_source
from nemotron_jax.eval import benchmarks
from nemotron_jax.fileio import atomic_write_text
from nemotron_jax.rl.config import PromptConfig
from nemotron_jax.rl.rollout import Prompt


def load_prompts(cfg: PromptConfig, seed: int, synthetic_dir: Path) -> list[Prompt]:
    """All usable prompts, each with its fixed reasoning mode."""
    path = synthetic.materialize(cfg.path, synthetic_dir / "rl_prompts.jsonl", 2000, seed=seed + 1)
    source = open_source(path, check=_checker(cfg))
    n = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    on = np.random.default_rng([seed, 7]).random(n) < cfg.thinking_ratio
    return [_prompt(cfg, source[i], bool(on[i])) for i in range(n)]


def _prompt(cfg: PromptConfig, record: dict, thinking: bool) -> Prompt:
    if not cfg.benchmark:
        return Prompt(str(record["question"]), str(record["answer"]), thinking)
    bench = benchmarks.get(cfg.benchmark)
    question = "\n\n".join(m["content"] for m in bench.messages(record))
    return Prompt(question, bench.reference(record), thinking, record=record, benchmark=cfg.benchmark)


def _checker(cfg: PromptConfig) -> Callable[[dict], None]:
    return benchmarks.get(cfg.benchmark).check if cfg.benchmark else _check_record


def load_heldout_prompts(cfg: PromptConfig, seed: int) -> list[Prompt]:
    """Held-out prompts, each asked in both modes: `eval_path`, or `eval_examples` problems of the
    synthetic task's test split (never generated for training)."""
    if cfg.eval_path:
        records = eval_records(cfg.eval_path, cfg.eval_examples or None, check=_checker(cfg))
    elif cfg.eval_examples:
        if synthetic.kind_of(cfg.path) is None:
            raise ValueError(f"prompts.eval_examples needs a synthetic prompts.path, got {cfg.path!r}; "
                             "set prompts.eval_path instead")
        try:
            records = eval_records(cfg.path, cfg.eval_examples, seed + 10_007)
        except ValueError as err:
            raise ValueError(f"prompts.eval_examples: {err}; set prompts.eval_path instead") from None
    else:
        return []
    return [_prompt(cfg, r, thinking) for thinking in (True, False) for r in records]


def _check_record(record: dict) -> None:
    for key in ("question", "answer"):
        if not isinstance(record.get(key), (str, int, float)):
            raise ValueError(f"missing field {key!r} (RL prompts need question and answer)")


def measure_pass_rates(prompts: Sequence[Prompt], solve: Callable[[Sequence[Prompt]], np.ndarray],
                       cache: Path, batch: int = 32) -> np.ndarray:
    """Pass rate of every prompt under `solve` (-> [n, samples] 0/1), cached in `cache` (JSON)."""
    if cache.exists():
        rates = np.asarray(json.loads(cache.read_text())["pass_rates"], np.float32)
        if len(rates) == len(prompts):
            return rates
    rates = []
    for i in tqdm(range(0, len(prompts), batch), desc="pass rates", unit="batch"):
        rates.extend(np.asarray(solve(prompts[i:i + batch]), np.float32).mean(axis=-1).tolist())
    atomic_write_text(cache, json.dumps({"pass_rates": rates}))
    return np.asarray(rates, np.float32)


class PromptSchedule:
    """`batch(i)`: the P prompts of iteration i (deterministic), drawn through a Grain shuffle."""

    def __init__(self, prompts: Sequence[Prompt], per_batch: int, seed: int, iterations: int,
                 cfg: PromptConfig, pass_rates: np.ndarray | None = None):
        keep = np.arange(len(prompts))
        if cfg.max_pass_rate is not None and pass_rates is not None:
            keep = keep[pass_rates < cfg.max_pass_rate]
        if len(keep) == 0:
            raise ValueError(f"no prompts left after dropping those with pass rate >= {cfg.max_pass_rate}")
        self.prompts = [prompts[i] for i in keep]
        self.rates = None if pass_rates is None else pass_rates[keep]
        self.per_batch, self.seed, self.iterations, self.cfg = per_batch, seed, max(iterations, 1), cfg
        self.dropped = len(prompts) - len(keep)
        self._order = grain.MapDataset.range(len(self.prompts)).shuffle(seed=seed).repeat()

    def centre(self, i: int) -> float:
        frac = min(i / max(self.iterations - 1, 1), 1.0)
        return self.cfg.curriculum_start + (self.cfg.curriculum_end - self.cfg.curriculum_start) * frac

    def batch(self, i: int) -> list[Prompt]:
        if self.cfg.curriculum and self.rates is not None:
            weights = np.exp(-0.5 * ((self.rates - self.centre(i)) / self.cfg.curriculum_width) ** 2) + 1e-6
            rng = np.random.default_rng([self.seed, i])
            picks = rng.choice(len(self.prompts), size=self.per_batch, replace=len(self.prompts) < self.per_batch,
                               p=weights / weights.sum())
            return [self.prompts[j] for j in picks]
        start = i * self.per_batch
        return [self.prompts[self._order[k]] for k in range(start, start + self.per_batch)]
