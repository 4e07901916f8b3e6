"""Puzzle: block library initialisation, BLD, scoring, the MIP, FFN Fusion, checked against numpy."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.config import AttentionConfig, FFNConfig, ModelConfig
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.errors import ConfigError
from nemotron_jax.model.params import assemble, flat_params
from nemotron_jax.puzzle import bld, costs, fusion, search
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.assemble import assemble_child, choice_of
from nemotron_jax.puzzle.config import BLDConfig, LibraryConfig, load_config
from nemotron_jax.puzzle.evaluate import evaluate
from nemotron_jax.puzzle.library import (
    build_library,
    calibration_stats,
    ffn_importance,
    linear_from_attention,
    pool_kv,
    solve_normal,
)
from nemotron_jax.puzzle.score import score_library
from nemotron_jax.puzzle.store import load_library, save_library

LIB = LibraryConfig(kv_heads=(1,), ffn_fractions=(1.0, 0.5), width_multiple=32)


def _cfg(blocks: list[str], hidden: int = 32, heads: int = 4, vocab: int = 64) -> ModelConfig:
    return ModelConfig.from_dict(dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                                      blocks=blocks, rope_theta=10000.0, rope_scaling=None))


def _model(cfg: ModelConfig, seed: int) -> nj.Model:
    """Random weights made on the host (fast: no jitted init to compile) and random RMSNorm gains,
    so that copying and folding gains is tested too."""
    module = costs.random_model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    flat = {k: (jnp.asarray(1 + 0.3 * rng.standard_normal(v.shape), v.dtype) if k[-1] == "weight"
                else v * 25 / np.sqrt(v.shape[0])) for k, v in flat_params(module).items()}
    return nj.Model(assemble(cfg, module.policy, flat))


def _batch(rng: np.random.Generator, b: int = 2, t: int = 12, vocab: int = 64, segments: int = 2) -> TokenBatch:
    seg = np.repeat(np.arange(1, segments + 1), -(-t // segments))[:t]
    pos = np.concatenate([np.arange((seg == s).sum()) for s in range(1, segments + 1)])
    weights = np.ones((b, t), np.float32)
    weights[:, -1] = 0.0
    return TokenBatch(inputs=rng.integers(0, vocab, (b, t)).astype(np.int32),
                      targets=rng.integers(0, vocab, (b, t)).astype(np.int32), weights=weights,
                      positions=np.tile(pos, (b, 1)).astype(np.int32),
                      segment_ids=np.tile(seg, (b, 1)).astype(np.int32))


@pytest.fixture(scope="module")
def parent() -> nj.Model:
    return _model(_cfg(["3x gqa:2 swiglu:64"]), seed=1)


@pytest.fixture(scope="module")
def batches() -> list[TokenBatch]:
    rng = np.random.default_rng(0)
    return [_batch(rng) for _ in range(2)]


@pytest.fixture(scope="module")
def library(parent, batches):
    return build_library(parent, batches, LIB)


# ---------------------------------------------------------------- initialisation
def test_library_variants_and_exact_members(parent, library):
    names = {k: list(library.layers[0][k]) for k in ("attention", "ffn")}
    assert names == {"attention": ["gqa2", "gqa1", "linear", "none"], "ffn": ["swiglu64", "swiglu32", "linear", "none"]}
    flat = flat_params(parent.module)
    for i in range(3):
        for kind, name in (("attention", "gqa2"), ("ffn", "swiglu64")):
            cand = library.layers[i][kind][name]
            assert cand.origin == "parent"
            for path, value in cand.params.items():
                np.testing.assert_array_equal(value, flat[("layers", i, kind, *path)])


def test_kv_pooling_reference():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 8, 4, 3))
    k1, v1 = pool_kv(k, v, 4)  # group 1: the parent itself
    np.testing.assert_array_equal(k1, k)
    np.testing.assert_array_equal(v1, v)
    k2, _ = pool_kv(k, v, 2)
    np.testing.assert_allclose(k2[:, 1], (k[:, 2] + k[:, 3]) / 2)
    with pytest.raises(ValueError):
        pool_kv(k, v, 3)


def test_linear_attention_equals_self_attention(parent, library):
    """W_o·W_v reproduces GQA exactly where each token can attend only to itself."""
    rng = np.random.default_rng(1)
    cfg = parent.config
    x = jnp.asarray(rng.standard_normal((2, 5, cfg.hidden_size)), jnp.float32)
    own = jnp.tile(jnp.arange(1, 6), (2, 1))  # every token its own segment
    pos = jnp.zeros((2, 5), jnp.int32)
    parent_att = library.layers[1]["attention"]["gqa2"]
    linear = library.layers[1]["attention"]["linear"]
    want = sb.apply(cfg, parent_att.variant, parent_att.params, x, pos, own)
    got = sb.apply(cfg, linear.variant, linear.params, x, pos, own)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # numpy: Σ_n v[:, n // 2] @ o[n] (KV heads repeated to query heads)
    v, o = parent_att.params[("v",)], parent_att.params[("o",)]
    ref = sum(np.asarray(v)[:, n // 2, :] @ np.asarray(o)[n] for n in range(4))
    np.testing.assert_allclose(linear_from_attention(v, o), ref, atol=1e-5)


def _np_rmsnorm(x, w, eps=1e-5):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _np_silu(x):
    return x / (1 + np.exp(-x))


def test_ffn_pruning_and_least_squares_match_numpy(parent, batches, library):
    mids = []
    for b in batches:
        m = parent.module.capture(jnp.asarray(b.inputs), jnp.asarray(b.positions), jnp.asarray(b.segment_ids)).mids
        mids.append(np.asarray(m[0]).reshape(-1, 32))
    mid = np.concatenate(mids)
    w = library.layers[0]["ffn"]["swiglu64"].params
    h = _np_rmsnorm(mid, np.asarray(w[("norm", "weight")]))
    act = _np_silu(h @ w[("gate",)]) * (h @ w[("up",)])
    y = act @ w[("down",)]
    importance = np.abs(act).mean(0) * np.linalg.norm(w[("down",)], axis=1)
    stats = calibration_stats(parent, batches)[0]
    np.testing.assert_allclose(ffn_importance(stats["mean_abs_act"], w[("down",)]), importance, rtol=1e-4)
    keep = np.sort(np.argsort(-importance)[:32])
    pruned = library.layers[0]["ffn"]["swiglu32"].params
    np.testing.assert_array_equal(pruned[("gate",)], w[("gate",)][:, keep])
    np.testing.assert_array_equal(pruned[("down",)], w[("down",)][keep])
    lstsq = np.linalg.lstsq(h.astype(np.float64), y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(solve_normal(stats["gram"], stats["cross"], stats["n"], 0.0), lstsq, atol=2e-3)
    # the library's linear FFN is the ridge-regularised fit (ridge·n·I added to hᵀh)
    n = h.shape[0]
    ridge = np.linalg.solve(h.T @ h + LIB.ridge * n * np.eye(32), h.T @ y)
    np.testing.assert_allclose(library.layers[0]["ffn"]["linear"].params[("kernel",)], ridge, atol=2e-3)


# ---------------------------------------------------------------- BLD
def test_normalized_mse_reference():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    ref = ((pred - target) ** 2 * mask[..., None]).sum() / ((target ** 2 * mask[..., None]).sum() + bld.EPS)
    np.testing.assert_allclose(bld.normalized_mse(pred, target, mask), ref, rtol=1e-6)


def test_bld_lowers_loss_and_resumes(parent, batches, library, tmp_path):
    rng = np.random.default_rng(5)

    def stream():
        while True:
            yield _batch(rng)

    held_out = [_batch(rng) for _ in range(2)]
    before = bld.evaluate(library, parent, held_out)
    cfg = BLDConfig(steps=12, lr=3e-3, warmup_ratio=0.1, checkpoint_every=6)
    trained, history = bld.train_bld(library, parent, stream(), cfg, tmp_path / "ckpt", progress=False)
    after = bld.evaluate(trained, parent, held_out)
    trainable = [f"{i}/{c.kind}/{c.name}" for i, c in library.all() if c.trainable]
    assert trainable and history
    assert all(after[k] < before[k] for k in trainable), {k: (before[k], after[k]) for k in trainable}
    assert np.mean([after[k] for k in trainable]) < 0.9 * np.mean([before[k] for k in trainable])
    for key in before:
        if key not in trainable:
            assert after[key] == pytest.approx(before[key], abs=1e-6)  # parent copies and no-ops untouched
    assert before["0/ffn/swiglu64"] == pytest.approx(0.0, abs=1e-6)
    # a finished run resumes at its last step and returns the same weights without training
    again, _ = bld.train_bld(library, parent, stream(), cfg, tmp_path / "ckpt", progress=False)
    np.testing.assert_array_equal(again.layers[2]["ffn"]["swiglu32"].params[("up",)],
                                  trained.layers[2]["ffn"]["swiglu32"].params[("up",)])
    save_library(tmp_path / "lib", trained)
    loaded = load_library(tmp_path / "lib")
    for (_, a), (_, b) in zip(trained.all(), loaded.all(), strict=True):
        assert (a.variant, a.origin) == (b.variant, b.origin)
        for p in a.params:
            np.testing.assert_array_equal(a.params[p], b.params[p])


# ---------------------------------------------------------------- scoring
def test_scores_from_cached_activations_equal_naive_kl(parent, batches, library):
    scores, base = score_library(parent, library, batches)
    assert scores[0]["attention"]["gqa2"]["kl"] == 0.0
    for layer, kind, name in ((0, "attention", "gqa1"), (1, "attention", "none"), (2, "ffn", "swiglu32"),
                              (1, "ffn", "linear")):
        choice = choice_of(parent.config)
        att, ffn = choice[layer]
        variant = library.layers[layer][kind][name].variant
        choice[layer] = (variant, ffn) if kind == "attention" else (att, variant)
        child = assemble_child(parent, library, choice)
        naive = evaluate(child, batches, parent)
        assert scores[layer][kind][name]["kl"] == pytest.approx(naive["kl"], rel=1e-4, abs=1e-7)
        assert scores[layer][kind][name]["lm_loss"] == pytest.approx(naive["lm_loss"], rel=1e-5)
        assert naive["kl"] > 0
    assert base["lm_loss"] == pytest.approx(evaluate(parent, batches)["lm_loss"], rel=1e-5)


# ---------------------------------------------------------------- the MIP
def _random_problem(rng: np.random.Generator, groups: int = 4, options: int = 4) -> search.Problem:
    obj = rng.uniform(0, 1, (groups, options)).tolist()
    runtime = rng.uniform(0, 1, (groups, options)).tolist()
    memory = rng.uniform(0, 1, (groups, options)).tolist()
    return search.Problem(obj, {"runtime": runtime, "memory": memory},
                          {"runtime": 0.4 * groups, "memory": 0.5 * groups})


@pytest.mark.parametrize("seed", range(6))
def test_mip_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng)
    picks = search.solve(problem)
    best, value = search.brute_force(problem)
    if best is None:
        assert picks is None
        return
    assert problem.feasible(picks)
    assert problem.evaluate(picks)["objective"] == pytest.approx(value, abs=1e-9)
    # a diverse second solution shares at most α·groups choices with the first and is optimal for that
    second = search.solve(problem, [picks], alpha=0.5)
    best2, value2 = search.brute_force(problem, [picks], alpha=0.5)
    assert (second is None) == (best2 is None)
    if second is not None:
        assert sum(a == b for a, b in zip(second, picks, strict=True)) <= 2
        assert problem.feasible(second)
        assert problem.evaluate(second)["objective"] == pytest.approx(value2, abs=1e-9)


def test_search_respects_speedup_budget():
    parent = _cfg(["3x gqa:2 swiglu:64"])
    lib = LibraryConfig(kv_heads=(1,), ffn_fractions=(0.5,), width_multiple=32)
    from nemotron_jax.puzzle.library import attention_variants, ffn_variants

    variants = [{"attention": attention_variants(b.attention, 4, lib), "ffn": ffn_variants(b.ffn, lib)}
                for b in parent.blocks]
    table = {"overhead": {"decode_s": 1.0}, "variants": {}}
    runtime = {"gqa2": 2.0, "gqa1": 1.5, "linear": 0.3, "none": 0.0, "swiglu64": 2.0, "swiglu32": 1.0}
    for v in itertools.chain(*(layer["attention"] + layer["ffn"] for layer in variants)):
        name = sb.variant_name(v)
        table["variants"][name] = {**costs.static_costs(parent, v), "decode_s": runtime[name]}
    rng = np.random.default_rng(0)
    scores = [{k: {sb.variant_name(v): {"kl": 0.0 if v in (b.attention, b.ffn) else float(rng.uniform(0.1, 1))}
                   for v in layer[k]} for k in ("attention", "ffn")}
              for b, layer in zip(parent.blocks, variants, strict=True)]
    from nemotron_jax.puzzle.config import SearchConfig

    cfg = SearchConfig(speedup=2.0, num_solutions=2, diversity=0.67, max_params_ratio=0.8)
    options = search.build_options(parent, variants, scores, table, cfg, "kl", context=16)
    solutions, budgets = search.search(parent, options, table, cfg)
    assert budgets["parent_runtime_s"] == pytest.approx(1 + 3 * 4.0)
    for s in solutions:
        assert s["predicted_runtime_s"] <= budgets["target_runtime_s"] + 1e-9
        child = parent.replace(blocks=tuple(nj.BlockConfig(a, f) for a, f in s["choice"]))
        assert child.num_params() - parent.vocab_size * parent.hidden_size * 2 - parent.hidden_size == s["params"]
        assert costs.predicted_time(child, table, "decode") == pytest.approx(s["predicted_runtime_s"])
    assert sum(a == b for a, b in zip(solutions[0]["picks"], solutions[1]["picks"], strict=True)) <= 2
    with pytest.raises(ConfigError, match="no architecture"):
        search.search(parent, options, table, SearchConfig(speedup=100.0))


# ---------------------------------------------------------------- FFN Fusion
def test_ffn_fusion_exact_and_round_trips_hf(tmp_path):
    cfg = _cfg(["gqa:2 swiglu:256", "3x none swiglu:256", "gqa:4 swiglu:512", "none swiglu:256"], hidden=64)
    model = _model(cfg, seed=3)
    assert fusion.find_runs(cfg) == [(1, 4)]
    fused = fusion.fuse(model)
    assert [str(b.ffn) for b in fused.config.blocks] == ["swiglu(256)", "swiglu(768)", "swiglu(512)", "swiglu(256)"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 64)).astype(np.float32)
    flat = {k: np.asarray(v) for k, v in flat_params(model.module).items()}
    want = x.copy()
    for j in (1, 2, 3):  # the parallel formulation: every FFN of the run sees the run's input x
        w = {name: flat[("layers", j, "ffn", *path)] for name, path in
             (("norm", ("norm", "weight")), ("gate", ("gate",)), ("up", ("up",)), ("down", ("down",)))}
        h = _np_rmsnorm(x, w["norm"])
        want += (_np_silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
    block = fused.module.layers[1]
    got = np.asarray(x + block.ffn(jnp.asarray(x)[None])[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    tokens = rng.integers(0, 64, (2, 9))
    fused.save_hf(tmp_path / "fused")
    loaded = nj.load(tmp_path / "fused")
    assert [str(b.ffn) for b in loaded.config.blocks] == [str(b.ffn) for b in fused.config.blocks]
    assert loaded.config.blocks[1].ffn.ffn_mult == 18.0  # 768 = 2·18·64/3: a DeciLM multiple of 256
    np.testing.assert_allclose(loaded.logits(tokens), fused.logits(tokens), atol=1e-5)
    with pytest.raises(ValueError, match="not a run"):
        fusion.fuse(model, [(0, 2)])


# ---------------------------------------------------------------- configuration and costs
def test_config_unknown_keys_and_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("library:\n  kv_heads: [4, 2]\n  width_multipel: 32\n")
    with pytest.raises(ConfigError, match=r"library\.width_multipel"):
        load_config(path)
    path.write_text("library:\n  kv_heads: [4, 2]\n")
    cfg = load_config(path, ["output_dir=D", "search.speedup=2", "output.child_format=native",
                             "library.width_multiple=32"])
    assert (cfg.output_dir, cfg.search.speedup, cfg.library.kv_heads) == ("D", 2.0, (4, 2))
    with pytest.raises(ConfigError, match="multiples of 256"):
        load_config(path, ["library.width_multiple=32"])
    with pytest.raises(ConfigError, match=r"library.kv_heads\[1\]"):
        load_config(None, ["library.kv_heads=[4, x]"])


def test_cli_registers_puzzle_stages():
    from nemotron_jax.cli import build_parser

    args = build_parser().parse_args(["puzzle", "search", "configs/puzzle/tiny.yaml", "output_dir=D"])
    assert (args.stage, args.config, args.overrides) == ("search", "configs/puzzle/tiny.yaml", ["output_dir=D"])
    assert load_config("configs/puzzle/tiny.yaml", ["output_dir=D"]).search.speedup == 1.5


def test_static_costs_add_up_to_model():
    cfg = _cfg(["gqa:2 swiglu:64", "linear none", "none linear"])
    total = sum(costs.static_costs(cfg, v)["params"] for b in cfg.blocks for v in (b.attention, b.ffn))
    assert total == cfg.num_params() - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size
    kv = sum(costs.static_costs(cfg, b.attention, "bfloat16")["kv_bytes_per_token"] for b in cfg.blocks)
    assert kv == cfg.kv_cache_bytes_per_token("bfloat16")
    c = load_config(None).costs
    assert costs.analytic_time(cfg, FFNConfig("swiglu", 64), "decode", c) > costs.analytic_time(
        cfg, FFNConfig("swiglu", 32), "decode", c) > 0 == costs.analytic_time(cfg, AttentionConfig("none"), "decode", c)


# ---------------------------------------------------------------- one forward: the model's own states
HETERO = ["gqa:2 swiglu:64", "linear swiglu:32", "gqa:1 linear", "none swiglu:64", "gqa:4 none", "none none"]


def _policy_model(model: nj.Model, scan: bool) -> nj.Model:
    policy = dataclasses.replace(model.policy, scan_layers=scan)
    return nj.Model(assemble(model.config, policy, flat_params(model.module)))


@pytest.mark.parametrize("blocks", [HETERO, ["3x gqa:2 swiglu:64"]])
def test_capture_equals_layer_by_layer_run(blocks):
    """`Transformer.capture` is a manual loop over `Block.__call__`, split at `Block.attend`."""
    model = _model(_cfg(blocks), seed=4)
    b = _batch(np.random.default_rng(3))
    tokens, pos, seg = (jnp.asarray(a) for a in (b.inputs, b.positions, b.segment_ids))
    module = model.module
    cap = module.capture(tokens, pos, seg)
    x = module.embed[...][tokens]
    for i, block in enumerate(module.layers):
        np.testing.assert_array_equal(cap.inputs[i], x)
        mid = x if block.attention is None else x + block.attention(x, pos, seg, None)[0]
        np.testing.assert_allclose(cap.mids[i], mid, rtol=1e-6, atol=1e-6)
        x, _ = block(x, pos, seg, None)
        want = mid if block.ffn is None else mid + block.ffn(mid)
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(block.feed(cap.mids[i]), x)
    np.testing.assert_array_equal(cap.final, x)
    h, _ = module.hidden_states(tokens, pos, seg)
    np.testing.assert_array_equal(module.final_norm(cap.final), h)
    # the same states under jit and with scanned layers (the weights are the same layers)
    graphdef, state = model.split()
    cap_jit = jax.jit(lambda s, t, p, g: nnx.merge(graphdef, s).capture(t, p, g))(state, tokens, pos, seg)
    for a, c in zip([*cap.mids, cap.final], [*cap_jit.mids, cap_jit.final], strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    scanned = _policy_model(model, scan=True).module.capture(tokens, pos, seg)
    np.testing.assert_array_equal(scanned.final, cap.final)


@pytest.mark.parametrize("scan", [False, True])
def test_logits_from_any_layer_equal_the_full_forward(scan):
    model = _policy_model(_model(_cfg(["gqa:2 swiglu:64", "3x gqa:1 swiglu:32", "none linear"]), seed=6), scan)
    b = _batch(np.random.default_rng(4))
    tokens, pos, seg = (jnp.asarray(a) for a in (b.inputs, b.positions, b.segment_ids))
    module = model.module
    full, _ = module(tokens, pos, seg)
    cap = module.capture(tokens, pos, seg)
    states = [*cap.inputs, cap.final]
    for start, x in enumerate(states):
        np.testing.assert_allclose(module.logits_from(start, x, pos, seg), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        module.logits_from(len(states), cap.final, pos, seg)


def test_candidate_block_is_the_models_block(parent, library):
    """`block_for` with the parent's own weights reproduces the parent's layer exactly."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    pos = jnp.tile(jnp.arange(6), (2, 1))
    layer = parent.module.layers[1]
    weights = {k: library.layers[1][k][n].params for k, n in (("attention", "gqa2"), ("ffn", "swiglu64"))}
    block = sb.block_for(parent.config, parent.config.blocks[1], weights)
    np.testing.assert_array_equal(block(x, pos, None, None)[0], layer(x, pos, None, None)[0])
    with pytest.raises(KeyError, match="missing"):
        sb.block_for(parent.config, parent.config.blocks[1], {"attention": weights["attention"]})


# ---------------------------------------------------------------- one block grammar
ALL_SUBBLOCKS = [AttentionConfig("gqa", 8), AttentionConfig("gqa", 1), AttentionConfig("linear"),
                 AttentionConfig("none"), FFNConfig("swiglu", 768), FFNConfig("linear"), FFNConfig("none")]


@pytest.mark.parametrize("spelling", ["compact", "display", "key"])
def test_block_grammar_round_trips_every_kind(spelling):
    from nemotron_jax.config import format_subblock, parse_subblock

    for sub in ALL_SUBBLOCKS:
        slot = sb.kind_of(sub)
        text = format_subblock(sub, spelling)
        assert parse_subblock(slot, text) == sub, (spelling, text)
        assert " " not in text
    # the spellings already on disk and on screen
    assert [format_subblock(s, "key") for s in ALL_SUBBLOCKS] == [
        "gqa8", "gqa1", "linear", "none", "swiglu768", "linear", "none"]
    assert [str(s) for s in ALL_SUBBLOCKS] == ["gqa(kv=8)", "gqa(kv=1)", "linear", "none", "swiglu(768)",
                                               "linear", "none"]
    assert [sb.variant_name(s) for s in ALL_SUBBLOCKS] == [format_subblock(s, "key") for s in ALL_SUBBLOCKS]
    assert all(sb.variant_from_name(sb.kind_of(s), sb.variant_name(s)) == s for s in ALL_SUBBLOCKS)
    mult = FFNConfig("swiglu", 4864, 31.40625)
    assert format_subblock(mult) == "mult:31.40625" and format_subblock(mult, "key") == "swiglu4864"
    assert parse_subblock("ffn", "mult:31.40625", 232) == FFNConfig("swiglu", 4864, 31.40625)
    for slot, bad in (("attention", "gqa"), ("attention", "swiglu:8"), ("ffn", "gqa:8"), ("ffn", "mult:x"),
                      ("attention", "gqa:x"), ("ffn", "linear:3")):
        with pytest.raises(ValueError, match=f"{slot} must be"):
            parse_subblock(slot, bad)


def test_compact_blocks_read_every_spelling():
    cfg = _cfg(["2x gqa:2 swiglu:64", "gqa(kv=1) swiglu(32)", "gqa1 linear", "none swiglu64", "linear none"])
    assert [(str(b.attention), str(b.ffn)) for b in cfg.blocks] == [
        ("gqa(kv=2)", "swiglu(64)"), ("gqa(kv=2)", "swiglu(64)"), ("gqa(kv=1)", "swiglu(32)"),
        ("gqa(kv=1)", "linear"), ("none", "swiglu(64)"), ("linear", "none")]
    assert cfg.to_dict()["blocks"] == ["2x gqa:2 swiglu:64", "gqa:1 swiglu:32", "gqa:1 linear", "none swiglu:64",
                                       "linear none"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- one KDConfig, one optimiser
def test_puzzle_kd_section_is_the_training_kd_config():
    from nemotron_jax.puzzle.config import RecoveryConfig
    from nemotron_jax.train.config import KDConfig

    cfg = load_config("configs/puzzle/tiny.yaml", ["kd.steps=7", "kd.temperature=2.0"])
    assert isinstance(cfg.kd, KDConfig) and isinstance(cfg.kd, RecoveryConfig)
    assert (cfg.kd.steps, cfg.kd.lr) == (7, 1e-3)
    assert cfg.kd.loss() == KDConfig(temperature=2.0, kl_weight=1.0, cosine_weight=1.0, lm_weight=0.0)
    assert type(cfg.kd.loss()) is KDConfig
    assert load_config(None).kd.loss() == KDConfig(cosine_weight=1.0)  # SPEC §5: L = KL + (1 − cos)
    with pytest.raises(ConfigError, match=r"kd\.stpes"):
        load_config(None, ["kd.stpes=3"])


def test_bld_optimizer_clips_each_candidate_and_keeps_the_schedule():
    import optax

    cfg = BLDConfig(steps=40, lr=1e-3, warmup_ratio=0.05, min_lr_ratio=1e-5, clip_norm=1.0, weight_decay=0.0)
    opt, total = bld.optimizer_config(cfg)
    from nemotron_jax.train.optim import make_schedule

    schedule = make_schedule(opt, total)
    old = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, 2, 40, end_value=cfg.lr * cfg.min_lr_ratio)
    for step in range(0, 45):
        assert float(schedule(step)) == float(old(step)), step
    tx = bld.bld_optimizer(cfg)
    params = {"attention/gqa1": {"q": jnp.ones((2, 2))}, "ffn/linear": {"kernel": jnp.ones((2, 2))}}
    small = {"attention/gqa1": {"q": jnp.full((2, 2), 0.1)}, "ffn/linear": {"kernel": jnp.full((2, 2), 0.1)}}
    huge = {**small, "ffn/linear": {"kernel": jnp.full((2, 2), 1e9)}}
    state = tx.init(params)
    _, state = tx.update(small, state, params)  # step 0: lr 0 at the start of the warm-up
    upd_small, _ = tx.update(small, state, params)
    upd_huge, _ = tx.update(huge, state, params)
    # a huge gradient in one candidate does not shrink another candidate's update (a global clip would)
    assert float(jnp.abs(upd_small["attention/gqa1"]["q"]).min()) > 0
    np.testing.assert_array_equal(upd_small["attention/gqa1"]["q"], upd_huge["attention/gqa1"]["q"])
    assert jax.tree.structure(upd_small) == jax.tree.structure(params)


class _IndexedStream:
    """Batch k is a pure function of k; the position is checkpointed like a Grain iterator's."""

    def __init__(self, fail_at: int | None = None):
        self.i, self.fail_at = 0, fail_at

    def __iter__(self):
        return self

    def __next__(self) -> TokenBatch:
        if self.i == self.fail_at:
            raise RuntimeError("killed")
        self.i += 1
        return _batch(np.random.default_rng(100 + self.i))

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = state["i"]


def test_bld_interrupted_run_resumes_exactly(parent, library, tmp_path):
    cfg = BLDConfig(steps=8, lr=3e-3, warmup_ratio=0.1, checkpoint_every=4)
    whole, _ = bld.train_bld(library, parent, _IndexedStream(), cfg, tmp_path / "a", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        bld.train_bld(library, parent, _IndexedStream(fail_at=6), cfg, tmp_path / "b", progress=False)
    resumed, history = bld.train_bld(library, parent, _IndexedStream(), cfg, tmp_path / "b", progress=False)
    assert [h["step"] for h in history] == [8]
    for (_, a), (_, b) in zip(whole.all(), resumed.all(), strict=True):
        for p in a.params:
            np.testing.assert_array_equal(a.params[p], b.params[p])
