"""The architecture search: a mixed-integer programme over one choice per layer (SPEC §5).

Grouped knapsack: binary x_ij = "layer i takes option j", an option being one (attention,
FFN) pair of the layer's library; Σ_j x_ij = 1 per layer. Minimise Σ score_ij·x_ij (score = KL
of replace-one-block, summed over the pair's two subblocks, i.e. maximise quality) subject to
    runtime   Σ t_ij·x_ij ≤ L   (latency budget; a speed-up s over the parent is L = T_parent/s − overhead)
    memory    Σ (param_bytes_ij + b·context·kv_bytes_ij)·x_ij ≤ M    (optional)
    params    Σ params_ij·x_ij ≤ P                                   (optional)
    diversity Σ_ij x_ij·y_ij ≤ ⌊α·layers⌋ for every earlier solution y.
Solved with `scipy.optimize.milp` (HiGHS).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from nemotron_jax.config import AttentionConfig, FFNConfig, ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.config import SearchConfig


@dataclasses.dataclass
class Problem:
    """`objective[g][j]` to minimise; `resources[name][g][j]` with `Σ ≤ limits[name]`."""

    objective: list[list[float]]
    resources: dict[str, list[list[float]]]
    limits: dict[str, float]

    def evaluate(self, picks: Sequence[int]) -> dict[str, float]:
        out = {"objective": sum(self.objective[g][j] for g, j in enumerate(picks))}
        for name, table in self.resources.items():
            out[name] = sum(table[g][j] for g, j in enumerate(picks))
        return out

    def feasible(self, picks: Sequence[int], tol: float = 1e-9) -> bool:
        used = self.evaluate(picks)
        return all(used[n] <= lim + tol * max(1.0, abs(lim)) for n, lim in self.limits.items())


def solve(problem: Problem, previous: Sequence[Sequence[int]] = (), alpha: float = 1.0,
          time_limit: float = 60.0) -> list[int] | None:
    """The optimal pick per group (None if infeasible), sharing at most ⌊α·groups⌋ picks with
    each solution in `previous`."""
    sizes = [len(o) for o in problem.objective]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n, groups = int(offsets[-1]), len(sizes)
    c = np.concatenate([np.asarray(o, float) for o in problem.objective])
    rows: list[tuple[np.ndarray, float, float]] = []  # (coefficients, lower, upper)
    for g in range(groups):
        row = np.zeros(n)
        row[offsets[g]:offsets[g + 1]] = 1
        rows.append((row, 1.0, 1.0))
    for name, limit in problem.limits.items():
        rows.append((np.concatenate([np.asarray(t, float) for t in problem.resources[name]]), -np.inf, limit))
    for y in previous:
        row = np.zeros(n)
        row[offsets[:-1] + np.asarray(y)] = 1
        rows.append((row, -np.inf, math.floor(alpha * groups + 1e-9)))
    a, lo, hi = (np.array(col) for col in zip(*rows, strict=True))
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"time_limit": time_limit})
    if res.x is None or res.status not in (0, 1):
        return None
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[g]:offsets[g + 1]])) for g in range(groups)]


def brute_force(problem: Problem, previous: Sequence[Sequence[int]] = (), alpha: float = 1.0
                ) -> tuple[list[int] | None, float]:
    """Enumerate every combination (tests and tiny problems only)."""
    best, best_value = None, math.inf
    limit = math.floor(alpha * len(problem.objective) + 1e-9)
    for picks in itertools.product(*(range(len(o)) for o in problem.objective)):
        if not problem.feasible(picks) or any(sum(a == b for a, b in zip(picks, y, strict=True)) > limit
                                             for y in previous):
            continue
        value = problem.evaluate(picks)["objective"]
        if value < best_value - 1e-12:
            best, best_value = list(picks), value
    return best, best_value


# ---------------------------------------------------------------- Puzzle's problem
@dataclasses.dataclass
class Options:
    """Per layer the (attention, FFN) pairs and their score and costs."""

    pairs: list[list[tuple[AttentionConfig, FFNConfig]]]
    score: list[list[float]]
    runtime: list[list[float]]
    memory: list[list[float]]
    params: list[list[float]]


def build_options(parent: ModelConfig, variants: list[dict[str, list[sb.Variant]]], scores: list[dict[str, Any]],
                  costs: dict[str, Any], cfg: SearchConfig, metric: str, context: int) -> Options:
    """All pairs of every layer with score = Σ subblock scores and costs = Σ subblock costs."""
    out = Options([], [], [], [], [])
    key = f"{cfg.target}_s"
    for i, layer in enumerate(variants):
        pairs = list(itertools.product(layer["attention"], layer["ffn"]))
        out.pairs.append(pairs)
        rows: dict[str, list[float]] = {k: [] for k in ("score", "runtime", "memory", "params")}
        for a, f in pairs:
            ca, cf = costs["variants"][sb.variant_name(a)], costs["variants"][sb.variant_name(f)]
            s = scores[i]["attention"][sb.variant_name(a)][metric] + scores[i]["ffn"][sb.variant_name(f)][metric]
            rows["score"].append(s)
            rows["runtime"].append(ca[key] + cf[key])
            kv = cfg.memory_batch * context * (ca["kv_bytes_per_token"] + cf["kv_bytes_per_token"])
            rows["memory"].append(ca["param_bytes"] + cf["param_bytes"] + kv)
            rows["params"].append(ca["params"] + cf["params"])
        for k, v in rows.items():
            getattr(out, k).append(v)
    return out


def parent_picks(parent: ModelConfig, options: Options) -> list[int]:
    out = []
    for i, pairs in enumerate(options.pairs):
        target = sb.parent_variants(parent, i)
        out.append(next(j for j, (a, f) in enumerate(pairs) if (a, sb.plain_variant(f)) == target))
    return out


def make_problem(parent: ModelConfig, options: Options, costs: dict[str, Any], cfg: SearchConfig,
                 runtime_scale: float = 1.0) -> tuple[Problem, dict[str, float]]:
    """The MIP and the budgets it uses (runtime budget times `runtime_scale`, for calibration)."""
    base = parent_picks(parent, options)
    overhead = costs["overhead"][f"{cfg.target}_s"]
    parent_runtime = overhead + sum(options.runtime[i][j] for i, j in enumerate(base))
    if cfg.latency_ms is not None:
        total = cfg.latency_ms / 1000.0
    else:
        total = parent_runtime / cfg.speedup
    budgets = {"parent_runtime_s": parent_runtime, "overhead_s": overhead, "target_runtime_s": total,
               "runtime": (total - overhead) * runtime_scale}
    limits = {"runtime": budgets["runtime"]}
    if cfg.max_memory_ratio is not None:
        limits["memory"] = budgets["memory"] = cfg.max_memory_ratio * sum(
            options.memory[i][j] for i, j in enumerate(base))
    if cfg.max_params_ratio is not None:
        limits["params"] = budgets["params"] = cfg.max_params_ratio * sum(
            options.params[i][j] for i, j in enumerate(base))
    problem = Problem(options.score, {"runtime": options.runtime, "memory": options.memory,
                                      "params": options.params}, limits)
    return problem, budgets


def search(parent: ModelConfig, options: Options, costs: dict[str, Any], cfg: SearchConfig,
           runtime_scale: float = 1.0) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Up to `cfg.num_solutions` diverse optimal architectures, best first, and the budgets."""
    problem, budgets = make_problem(parent, options, costs, cfg, runtime_scale)
    solutions: list[list[int]] = []
    for _ in range(cfg.num_solutions):
        picks = solve(problem, solutions, cfg.diversity if solutions else 1.0)
        if picks is None:
            break
        solutions.append(picks)
    if not solutions:
        raise ConfigError(f"no architecture meets the constraints {budgets}; relax search.speedup / "
                          "latency_ms / max_memory_ratio / max_params_ratio or widen the library")
    out = []
    for picks in solutions:
        used = problem.evaluate(picks)
        out.append({"picks": picks, "choice": [options.pairs[i][j] for i, j in enumerate(picks)],
                    "score": used["objective"], "predicted_runtime_s": used["runtime"] + budgets["overhead_s"],
                    "predicted_speedup": budgets["parent_runtime_s"] / (used["runtime"] + budgets["overhead_s"]),
                    "memory_bytes": used["memory"], "params": used["params"]})
    return out, budgets
