"""Sharded runs on 8 simulated devices agree with the single-device run, for every rules preset,
on the heterogeneous tiny model (GQA with 4/2/1 KV heads, linear and no-op attention, SwiGLU,
linear and no-op FFNs): logits, train steps (LM, and KD with a sharded teacher), greedy decoding."""

import jax
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.sharding import MeshConfig
from nemotron_jax.train.optim import OptimizerConfig, make_optimizer
from nemotron_jax.train.state import init_state, state_shardings_for
from nemotron_jax.train.step import make_train_step
from nemotron_jax.train.strategies import KDStrategy, LMStrategy

LAYOUTS = {
    "dp": MeshConfig(data=8, fsdp=1, rules="dp"),
    "fsdp": MeshConfig(data=2, fsdp=4, rules="fsdp"),
    "fsdp_tp": MeshConfig(data=1, fsdp=2, tensor=4, rules="fsdp_tp"),
}
TOKENS = np.random.default_rng(0).integers(0, 512, size=(8, 24))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_logits_equal_single_device(tiny_hetero, name):
    layout = LAYOUTS[name].layout()
    sharded = nj.init(tiny_hetero.config, seed=0, layout=layout)
    embed = sharded.module.embed[...]
    assert len(embed.sharding.device_set) == 8
    np.testing.assert_allclose(sharded.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)


def test_kv_heads_that_do_not_divide_are_replicated(tiny_hetero):
    layout = LAYOUTS["fsdp_tp"].layout()
    model = nj.init(tiny_hetero.config, layout=layout)
    k_gqa1 = model.module.layers[4].attention.k[...]  # 1 KV head cannot split over tensor=4
    q = model.module.layers[4].attention.q[...]  # 4 query heads can
    assert k_gqa1.sharding.spec[1] is None
    assert q.sharding.spec[1] == "tensor"


def test_save_on_one_mesh_restore_on_another(tiny_hetero, tmp_path):
    saved = nj.init(tiny_hetero.config, seed=0, layout=LAYOUTS["fsdp_tp"].layout())
    saved.save(tmp_path / "m")
    restored = nj.load(tmp_path / "m", layout=LAYOUTS["fsdp"].layout())
    gate = restored.module.layers[0].ffn.gate[...]
    assert gate.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(restored.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)
    hf = nj.load(_hf_copy(tiny_hetero, tmp_path), layout=LAYOUTS["dp"].layout())
    np.testing.assert_allclose(hf.logits(TOKENS), tiny_hetero.logits(TOKENS), rtol=2e-5, atol=2e-5)


def _hf_copy(model, tmp_path):
    model.save_hf(tmp_path / "hf")
    return tmp_path / "hf"


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="does not fit"):
        MeshConfig(data=3, fsdp=-1).layout()
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).layout()
    with pytest.raises(ValueError, match="unknown sharding rules"):
        MeshConfig(rules="zero9").layout()


def _batch(rows=8, t=16, seed=0):
    toks = np.random.default_rng(seed).integers(4, 512, (rows, t + 1)).astype(np.int32)
    seg = np.ones((rows, t), np.int32)
    seg[:, t // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
    return TokenBatch(inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((rows, t), np.float32),
                      positions=np.broadcast_to(pos, (rows, t)).astype(np.int32), segment_ids=seg)


def _train(model, strategy, layout, teacher=None, steps=2):
    graphdef, params = nnx.split(model.module)
    # eps 1e-3: Adam's update stays a smooth function of the gradient, so results compare closely
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, eps=1e-3), 10)
    state = init_state(params, tx, 0, layout)
    shardings = None if layout is None else state_shardings_for(state.params, tx, layout)
    step = make_train_step(strategy, graphdef, tx, schedule, layout=layout, state_shardings=shardings,
                           teacher=None if teacher is None else nnx.split(teacher.module))
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(seed=i))
        losses.append(float(metrics["loss"]))
    return losses, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _assert_same_run(run, reference):
    (losses, params), (ref_losses, ref_params) = run, reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for x, y in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_train_steps_equal_single_device(tiny_hetero, name):
    layout = LAYOUTS[name].layout()
    sharded = nj.init(tiny_hetero.config, seed=0, layout=layout)
    _assert_same_run(_train(sharded, LMStrategy(chunk_tokens=32), layout),
                     _train(tiny_hetero, LMStrategy(chunk_tokens=32), None))


def test_sharded_kd_step_with_sharded_teacher_equals_single_device(tiny_hetero, tiny_llama):
    layout = LAYOUTS["fsdp_tp"].layout()
    kd = KDStrategy(kl_weight=1.0, cosine_weight=1.0, chunk_tokens=32)
    student = nj.init(tiny_hetero.config, seed=0, layout=layout)
    teacher = nj.init(tiny_llama.config, seed=0, layout=layout)
    _assert_same_run(_train(student, kd, layout, teacher=teacher), _train(tiny_hetero, kd, None, teacher=tiny_llama))


def _sharpened(model):
    """Scale the output head so greedy decoding has clear margins (no near-ties to flip)."""
    head = model.module.lm_head if model.module.lm_head is not None else model.module.embed
    head[...] = head[...] * 30.0
    return model


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_greedy_generation_equals_single_device(tiny_hetero, name):
    layout = LAYOUTS[name].layout()
    single = _sharpened(nj.init(tiny_hetero.config, seed=0))
    sharded = _sharpened(nj.init(tiny_hetero.config, seed=0, layout=layout))
    prompts = [list(map(int, row[: 5 + i])) for i, row in enumerate(TOKENS)]  # 8 ragged prompts
    ref, ref_logp = single.generate(prompts, 12, stop_tokens=[], return_logprobs=True)
    out, logp = sharded.generate(prompts, 12, stop_tokens=[], return_logprobs=True)
    assert out == ref
    np.testing.assert_allclose(np.concatenate(logp), np.concatenate(ref_logp), rtol=1e-4, atol=1e-4)
