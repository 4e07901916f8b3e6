"""The grpo and dpo recipe kinds end to end at toy size: metrics, the saved model, exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.recipes import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
# Batches are 8 rows: the 8 simulated devices split them (rows must divide the data-parallel size).
SMALL = ["start.sft_steps=4", "start.sft_batch_size=8", "start.sft_seq_len=128", "log_every=1",
         "sampling.group_size=4", "sampling.max_new_tokens=12", "progress=false"]


@pytest.mark.slow
def test_grpo_recipe_runs_logs_and_resumes(tmp_path):
    over = [*SMALL, f"output_dir={tmp_path}", "grpo.prompts_per_iteration=2", "grpo.kl_coef=0.01",
            "checkpoint_every=1", "eval_every=2", "prompts.eval_examples=2"]
    run_recipe(load_recipe(ROOT / "configs/recipes/grpo-tiny.yaml", [*over, "steps=2"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "accuracy", "format_rate", "kl", "clip_fraction", "entropy", "response_length",
                "rollout_tokens_per_s", "update_tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["logprob_mismatch"] < 1e-2  # the first update sees the rollout's own weights
    # Held-out problems (the task's test split, both modes) at the first iteration and every eval_every.
    assert all(k in rows[0] and k in rows[1] for k in ("heldout_accuracy_on", "heldout_accuracy_off",
                                                        "heldout_format_rate_on", "heldout_format_rate_off"))
    first = nj.load(tmp_path / "model")
    # Resuming with more iterations continues from the last checkpoint, not from scratch.
    (tmp_path / "model").rename(tmp_path / "model-2")
    result = run_recipe(load_recipe(ROOT / "configs/recipes/grpo-tiny.yaml", [*over, "steps=3"]))
    assert result.start_step == 2
    assert first.config == nj.load(tmp_path / "model").config


@pytest.mark.slow
def test_dpo_recipe_offline_pairs(tmp_path):
    run_recipe(load_recipe(ROOT / "configs/recipes/dpo-tiny.yaml",
                           [*SMALL, f"output_dir={tmp_path}", "steps=2", "dpo.pairs_per_iteration=4"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert "preference_accuracy" in rows[0] and "margin" in rows[0]
    assert (tmp_path / "model").is_dir()
