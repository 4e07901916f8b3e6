"""Training: recipe validation, the train step (non-finite skipping, accumulation, sharding),
learning (SFT, KD), stopping on repeated non-finite steps, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.data import ExampleFormat, make_example
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.data.synthetic import gsm8k_records, write_jsonl
from nemotron_jax.errors import ConfigError
from nemotron_jax.model.params import flat_params
from nemotron_jax.recipes import load_recipe, run_recipe
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train import TrainingError
from nemotron_jax.train.optim import OptimizerConfig, make_optimizer
from nemotron_jax.train.state import init_state, state_shardings_for
from nemotron_jax.train.step import _loss_and_grads, make_eval_step, make_train_step
from nemotron_jax.train.strategies import KDStrategy, LMStrategy

ROOT = Path(__file__).resolve().parents[1]
# In-process recipe runs use the 8 simulated devices data-parallel (cheapest collectives).
FAST = ["mesh.data=8", "mesh.fsdp=1", "data.batch_size=8", "progress=false", "eval_every=0"]


# ---------------------------------------------------------------- recipes and config errors
def test_shipped_recipes_validate():
    files = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    assert {"kd-tiny", "sft-tiny", "grpo-tiny", "grpo-arith", "dpo-tiny"} <= {f.stem for f in files}
    for file in files:
        assert load_recipe(file).kind == file.stem.split("-")[0], file


def test_bad_recipe_keys_and_types_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: sft\noptimizer:\n  lr: 1e-4\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key optimizer\.warmup; expected one of lr, schedule"):
        load_recipe(bad)
    bad.write_text("kind: sft\nsteps: ten\n")
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'ten'"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"kind: expected one of 'kd', 'cpt', 'sft', 'lm'.*, got 'rl'"):
        load_recipe(None, ["kind=rl"])
    with pytest.raises(ConfigError, match=r"mesh\.tensor: expected int"):
        load_recipe(None, ["mesh.tensor=two"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(None, ["steps"])
    with pytest.raises(ConfigError, match=r"kind: kd needs teacher\.source"):
        load_recipe(None, ["kind=kd"])
    recipe = load_recipe(None, ["optimizer.lr=1e-5", "steps=7", "model.attention_impl=pallas", "mesh.fsdp=2"])
    assert (recipe.optimizer.lr, recipe.steps, recipe.model.attention_impl, recipe.mesh.fsdp) == (1e-5, 7, "pallas", 2)


def test_cli_reports_config_errors(tmp_path, capsys):
    from nemotron_jax.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: sft\n")
    assert main(["train", str(recipe), "optimizer.lrr=1"]) == 2
    assert "unknown key optimizer.lrr" in capsys.readouterr().err


def test_empty_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    recipe = load_recipe(None, ["kind=sft", f"data.path={tmp_path / 'empty.jsonl'}", f"output_dir={tmp_path}/o"])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable records"):
        run_recipe(recipe)


# ---------------------------------------------------------------- the train step
def _batch(rows=4, t=16, seed=0):
    toks = np.random.default_rng(seed).integers(4, 512, (rows, t + 1)).astype(np.int32)
    seg = np.ones((rows, t), np.int32)
    seg[:, t // 2:] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
    return TokenBatch(inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((rows, t), np.float32),
                      positions=np.broadcast_to(pos, (rows, t)).astype(np.int32), segment_ids=seg)


def _setup(model, accum=1, layout=None, lr=1e-2):
    graphdef, params = nnx.split(model.module)
    # eps 1e-3: Adam's update stays a smooth function of the gradient, so results compare closely
    tx, schedule = make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0, eps=1e-3), 10)
    state = init_state(params, tx, 0, layout)
    shardings = None if layout is None else state_shardings_for(state.params, tx, layout)
    step = make_train_step(LMStrategy(chunk_tokens=24), graphdef, tx, schedule, layout=layout,
                           state_shardings=shardings, grad_accum=accum)
    return state, step


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_nonfinite_batch_is_skipped_and_counted(tiny_llama):
    state, step = _setup(tiny_llama)
    state, metrics = step(state, _batch())
    before = _host(state.params), _host(state.opt_state)
    poisoned = _batch(seed=1)
    poisoned.weights[0, 3] = np.nan
    state, metrics = step(state, poisoned)
    assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_count) == 1 and int(state.nonfinite_streak) == 1
    assert int(state.step) == 2
    for a, b in zip((_host(state.params), _host(state.opt_state)), before, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    state, metrics = step(state, _batch(seed=2))
    assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_streak) == 0 and int(state.nonfinite_count) == 1


def test_grad_accumulation_equals_full_batch(tiny_llama):
    batch = _batch(rows=4)
    batch.weights[1, :5] = 0.0  # unequal token counts per microbatch: the mean must still be global
    graphdef, params = nnx.split(tiny_llama.module)
    grads = [jax.jit(lambda p, b, a=accum: _loss_and_grads(LMStrategy(chunk_tokens=24), graphdef, None, p, b, None, a))(
        params, batch) for accum in (1, 2)]
    assert float(grads[0][0]) == pytest.approx(float(grads[1][0]), rel=1e-6)
    for x, y in zip(_host(grads[0][2]), _host(grads[1][2]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_sharded_step_matches_single_device(tiny_llama):
    """data=2 x fsdp=2 x tensor=2 over the 8 simulated devices gives the unsharded step's result."""
    layout = MeshConfig(data=2, fsdp=2, tensor=2).layout()
    sharded = nj.init("tiny-llama", seed=0, layout=layout)
    outs = []
    for m, lay in ((tiny_llama, None), (sharded, layout)):
        state, step = _setup(m, layout=lay)
        state, metrics = step(state, _batch(rows=4))
        outs.append((float(metrics["loss"]), float(metrics["grad_norm"]), _host(state.params)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)
    for x, y in zip(outs[0][2], outs[1][2], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights(tiny_llama):
    model = nj.init("tiny-llama", seed=0, compute_dtype="bfloat16")
    losses = []
    for m in (tiny_llama, model):
        state, step = _setup(m)
        state, metrics = step(state, _batch())
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == np.float32 for x in _host(state.params))
    assert all(x.dtype == np.float32 for x in _host(state.opt_state) if x.ndim)
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != losses[0]


# ---------------------------------------------------------------- learning
def _masked_ce(model, tok, record, index):
    ex = make_example(tok, ExampleFormat(), record, index)
    logits = model.logits(ex.tokens[None, :-1])[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[np.arange(len(ex.tokens) - 1), ex.tokens[1:]]
    return float(ce[ex.loss_mask[1:]].mean())


@pytest.mark.slow
def test_sft_drives_loss_down_in_both_reasoning_modes(tmp_path):
    records = gsm8k_records(8, seed=2)  # reasoning alternates on / off
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = load_recipe(ROOT / "configs" / "recipes" / "sft-tiny.yaml", [
        f"output_dir={tmp_path}/run", f"data.path={data}", "data.eval_examples=0", "data.max_examples=null",
        "data.seq_len=256", "steps=30", "log_every=5", "checkpoint_every=30", "optimizer.lr=1e-2",
        "optimizer.warmup_ratio=0.05", "model.scan_layers=false", *FAST])
    result = run_recipe(recipe)
    tok = Tokenizer.tiny()
    initial = nj.init("tiny-llama", seed=0)
    for mode in ("on", "off"):
        picked = [(i, r) for i, r in enumerate(records) if r["reasoning"] == mode]
        before = np.mean([_masked_ce(initial, tok, r, i) for i, r in picked])
        after = np.mean([_masked_ce(result.model, tok, r, i) for i, r in picked])
        assert after < 0.5 and after < 0.1 * before, (mode, before, after)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(5, 31, 5))
    assert nj.load(tmp_path / "run" / "model").config == initial.config


@pytest.mark.slow
def test_kd_lowers_held_out_kl(tmp_path):
    recipe = load_recipe(ROOT / "configs" / "recipes" / "kd-tiny.yaml", [
        f"output_dir={tmp_path}", "teacher.pretrain_steps=25", "steps=40", "data.synthetic_examples=400",
        "data.eval_examples=16", "data.seq_len=128", "checkpoint_every=40", "log_every=10", "eval_batches=2",
        *FAST])
    result = run_recipe(recipe)
    assert (tmp_path / "teacher" / "model").is_dir() and (tmp_path / "teacher" / "metrics.jsonl").is_file()
    # held-out KL of the initial student, evaluated on the same batches by the same eval step
    from nemotron_jax.data.pipeline import DataPipeline, resolve_path

    teacher = nj.load(tmp_path / "teacher" / "model")
    student = nj.init("tiny-hetero", seed=0)
    pipeline = DataPipeline(recipe.data, Tokenizer.tiny(), 0, resolve_path(recipe.data, tmp_path),
                            shard_index=0, shard_count=1)
    strategy = KDStrategy(cosine_weight=1.0)
    eval_step = make_eval_step(strategy, nnx.split(student.module)[0], teacher=nnx.split(teacher.module))
    kl = weight = 0.0
    for batch in pipeline.eval_batches(recipe.eval_batches):
        out = eval_step(nnx.split(student.module)[1], jax.device_put(batch))
        kl, weight = kl + float(out["kl"]), weight + float(out["weight"])
    initial_kl = kl / weight
    assert result.eval_metrics["eval_kl"] < 0.5 * initial_kl, (initial_kl, result.eval_metrics)


@pytest.mark.slow
def test_repeated_nonfinite_steps_stop_with_a_clear_message(tmp_path):
    nj.init("tiny-llama", seed=1).save(tmp_path / "start")  # model.source may be a saved model directory
    recipe = load_recipe(ROOT / "configs" / "recipes" / "sft-tiny.yaml", [
        f"output_dir={tmp_path}/run", f"model.source={tmp_path / 'start'}", "data.path=synthetic:gsm8k",
        "data.synthetic_examples=32", "data.eval_examples=0",
        "data.seq_len=128", "steps=20", "checkpoint_every=1", "log_every=1", "max_nonfinite_steps=3",
        "optimizer.lr=1e30", "optimizer.clip_norm=null", "optimizer.warmup_steps=0", "model.scan_layers=false",
        *FAST])
    message = r"3 consecutive non-finite steps .* last good checkpoint, step \d+, is intact"
    with pytest.raises(TrainingError, match=message):
        run_recipe(recipe)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["nonfinite"] == 0 and [m["nonfinite"] for m in lines[-3:]] == [1, 1, 1]
    import orbax.checkpoint as ocp

    from nemotron_jax.train.checkpoints import RunCheckpoints

    ckpt = RunCheckpoints(tmp_path / "run" / "checkpoints")
    restored = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]["params"]))
    ckpt.close()


# ---------------------------------------------------------------- exact resume after SIGKILL
def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "nemotron_jax", "train", str(ROOT / "configs" / "recipes" / "sft-tiny.yaml"),
            f"output_dir={out}", "data.path=synthetic:gsm8k", "data.synthetic_examples=48", "data.eval_examples=4",
            "data.seq_len=128", "data.batch_size=2", "steps=16", "checkpoint_every=3", "log_every=1",
            "eval_every=8", "model.scan_layers=false", "progress=false"]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_sigkill_and_restart_gives_identical_run(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device; compile cache from conftest
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    subprocess.run(_train_cmd(reference), env=env, check=True, capture_output=True, cwd=tmp_path)
    proc = subprocess.Popen(_train_cmd(resumed), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = resumed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(_losses_safe(metrics)) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_losses_safe(metrics))
    assert killed_at < 16
    # TensorBoard events are flushed at every checkpoint: the curve up to the last one survives the kill.
    saved = max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    rows = [json.loads(line) for line in _losses_safe(metrics)]
    scalars = sum(1 for r in rows if r["step"] <= saved for k, v in r.items() if k != "step" and np.isfinite(v))
    assert _event_records(resumed / "tb") >= scalars > 0
    done = subprocess.run(_train_cmd(resumed), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint step" in done.stderr
    assert _losses(resumed) == _losses(reference) and len(_losses(reference)) == 16
    a, b = flat_params(nj.load(reference / "model").module), flat_params(nj.load(resumed / "model").module)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _event_records(tb: Path) -> int:
    """Complete TFRecord records (length, crc, data, crc) in a run's TensorBoard event files."""
    count = 0
    for file in tb.glob("events.out.tfevents.*"):
        data, pos = file.read_bytes(), 0
        while pos + 12 <= len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            if pos + 12 + length + 4 > len(data):
                break
            pos, count = pos + 12 + length + 4, count + 1
    return count


def _losses_safe(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.endswith("}")]


def test_train_step_rejects_missing_teacher(tiny_llama):
    graphdef, _ = nnx.split(tiny_llama.module)
    tx, schedule = make_optimizer(OptimizerConfig(), 10)
    with pytest.raises(ValueError, match="needs a teacher"):
        make_train_step(KDStrategy(), graphdef, tx, schedule)
    assert jnp.isfinite(schedule(3))
