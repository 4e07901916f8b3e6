"""The one loop gives every recipe kind the same guarantees: non-finite skip-and-stop with the last
good checkpoint intact, exact resume, a recorded config that a resumed run must match, and clear
errors for bad input."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.errors import ConfigError, DataError
from nemotron_jax.model.params import flat_params
from nemotron_jax.recipes import load_recipe, run_recipe
from nemotron_jax.train import TrainingError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
QUIET = ["progress=false", "log_every=1", "model.scan_layers=false"]
# Toy versions of each kind (8-row batches: the 8 simulated devices split them).
KINDS = {
    "sft": ("sft-tiny.yaml", ["data.synthetic_examples=32", "data.eval_examples=0", "data.seq_len=128",
                              "data.batch_size=8"]),
    "kd": ("kd-tiny.yaml", ["teacher.pretrain_steps=0", "data.synthetic_examples=64", "data.eval_examples=0",
                            "data.seq_len=64"]),
    "grpo": ("grpo-tiny.yaml", ["start.sft_steps=0", "grpo.prompts_per_iteration=2", "sampling.group_size=4",
                                "sampling.max_new_tokens=8", "prompts.eval_examples=0", "grpo.skip_flat_groups=false"]),
    "dpo": ("dpo-tiny.yaml", ["start.sft_steps=0", "dpo.pairs_per_iteration=4", "dpo.seq_len=64"]),
}


def _recipe(kind: str, out: Path, *extra: str):
    file, over = KINDS[kind]
    return load_recipe(RECIPES / file, [f"output_dir={out}", *QUIET, *over, *extra])


def _params(path: Path) -> dict:
    return {k: np.asarray(v) for k, v in flat_params(nj.load(path).module).items()}


class Poisoned:
    """A kind's real batch source whose batches carry a NaN loss weight from step `start` on."""

    def __init__(self, source, start: int):
        self.source, self.start = source, start

    def next_batch(self, step, params):
        batch, metrics = self.source.next_batch(step, params)
        if step >= self.start:
            weights = np.array(batch.weights)
            weights[0, 0] = np.nan
            batch = batch.replace(weights=weights)
        return batch, metrics

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)


def _run_poisoned(kind: str, recipe):
    """The recipe's own model, strategy, source and reference, through the one loop."""
    from nemotron_jax.rl import dpo, grpo
    from nemotron_jax.rl.recipes import frozen_copy, starting_policy
    from nemotron_jax.train.loop import run

    model, tokenizer = starting_policy(recipe), nj.Tokenizer.from_file(recipe.data.tokenizer)
    if kind == "grpo":
        strategy, source = grpo.grpo_strategy(recipe), grpo.GRPOSource(recipe, model, tokenizer)
    else:
        strategy, source = dpo.preference_strategy(recipe), dpo.pair_source(recipe, model, tokenizer)
    reference = frozen_copy(model) if strategy.needs_teacher else None
    return run(recipe, model, strategy, Poisoned(source, start=2), teacher=reference)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "grpo", "dpo"])
def test_every_kind_skips_nonfinite_updates_and_stops_with_the_last_good_checkpoint(tmp_path, kind):
    """From step 2 on every update is non-finite (kd: lr 1e30 blows the weights up after the first
    update, as in tests/test_train.py for sft; grpo/dpo: a NaN loss weight in their real batches):
    each is skipped, and the run stops after max_nonfinite_steps with the last good checkpoint."""
    extra = ("optimizer.lr=1e30", "optimizer.clip_norm=null", "optimizer.warmup_steps=0") if kind == "kd" else ()
    recipe = _recipe(kind, tmp_path, "steps=12", "checkpoint_every=1", "max_nonfinite_steps=3", *extra)
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps .* last good checkpoint, step \d+, "
                                            r"is intact"):
        run_recipe(recipe) if kind == "kd" else _run_poisoned(kind, recipe)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in rows[-3:]] == [1, 1, 1] and rows[0]["nonfinite"] == 0
    import orbax.checkpoint as ocp

    from nemotron_jax.train.checkpoints import RunCheckpoints

    ckpt = RunCheckpoints(tmp_path / "checkpoints")
    restored = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]["params"]))
    ckpt.close()
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "grpo", "dpo"])
def test_every_kind_resumes_exactly(tmp_path, kind):
    """Three steps in one go equal two steps, a restart, and a third (sft: the SIGKILL test). A
    constant learning rate, so that the schedule does not depend on the number of steps."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fixed = ("checkpoint_every=1", "optimizer.schedule=constant", "optimizer.warmup_ratio=0")
    run_recipe(_recipe(kind, straight, "steps=3", *fixed))
    run_recipe(_recipe(kind, resumed, "steps=2", *fixed))
    result = run_recipe(_recipe(kind, resumed, "steps=3", *fixed))
    assert result.start_step == 2
    a, b = _params(straight / "model"), _params(resumed / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_missing_data_path_is_an_error_naming_it(tmp_path, capsys):
    recipe = _recipe("sft", tmp_path / "run", "data.path=/no/such/file.jsonl", "steps=1")
    with pytest.raises(DataError, match=r"/no/such/file\.jsonl: no such data file"):
        run_recipe(recipe)
    from nemotron_jax.cli import main

    assert main(["train", str(RECIPES / "sft-tiny.yaml"), f"output_dir={tmp_path}/cli",
                 "data.path=/no/such/file.jsonl"]) == 2
    assert "/no/such/file.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "checkpoints").exists()
    with pytest.raises(DataError, match=r"data\.path is empty"):
        run_recipe(_recipe("sft", tmp_path / "empty", "data.path="))
    with pytest.raises(DataError, match="unknown synthetic data kind 'nope'"):
        run_recipe(_recipe("sft", tmp_path / "nope", "data.path=synthetic:nope"))


def test_optimizer_settings_that_would_train_wrong_are_refused():
    for bad, message in (("optimizer.lr=-1e-3", r"optimizer\.lr must be > 0, got -0\.001"),
                         ("optimizer.warmup_ratio=1.5", r"optimizer\.warmup_ratio must be in \[0, 1\]"),
                         ("optimizer.b2=1.0", r"optimizer\.b2 must be in \[0, 1\)"),
                         ("optimizer.clip_norm=0", r"optimizer\.clip_norm must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_recipe(RECIPES / "sft-tiny.yaml", [bad])
    with pytest.raises(ConfigError, match=r"grpo\.clip_low"):
        load_recipe(RECIPES / "grpo-tiny.yaml", ["grpo.clip_low=-0.1"])


@pytest.mark.slow
def test_a_run_resumes_only_with_its_own_settings_unless_forced(tmp_path):
    run_recipe(_recipe("sft", tmp_path, "steps=2", "checkpoint_every=1"))
    first = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.003 -> 0\.001.*resume=force"):
        run_recipe(_recipe("sft", tmp_path, "steps=3", "optimizer.lr=1e-3"))
    assert (tmp_path / "config.yaml").read_text() == first  # nothing overwritten
    run_recipe(_recipe("sft", tmp_path, "steps=3", "checkpoint_every=1"))  # more steps: the same run, continued
    with pytest.raises(ConfigError, match="already holds a run"):
        run_recipe(_recipe("sft", tmp_path, "steps=4", "resume=never"))
    result = run_recipe(_recipe("sft", tmp_path, "steps=4", "optimizer.lr=1e-3", "resume=force"))
    assert result.start_step == 3
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"]["optimizer.lr"] == [0.003, 0.001]
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text()
