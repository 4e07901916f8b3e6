"""`Policy.scan_layers`: runs of identical blocks as one `lax.scan`, with and without a KV cache.

Scanned and unrolled models with the same weights must agree (logits, cached prefill/decode,
greedy tokens, gradients); parameter paths stay per layer; a deep model's cached prefill traces
its block once per run; and the known cost of stacking per-layer weights inside the step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.config import AttentionConfig, BlockConfig, FFNConfig
from nemotron_jax.model.params import flat_params
from nemotron_jax.model.transformer import Policy
from nemotron_jax.sampling import cache_bytes, generate


def _block(att: str, kv: int | None, ffn: str, width: int | None) -> BlockConfig:
    return BlockConfig(AttentionConfig(att, kv), FFNConfig(ffn, width))


# runs of 3, 2 and 2 identical blocks between single ones, every block kind present
RUNS = (*[_block("gqa", 2, "swiglu", 128)] * 3, _block("linear", None, "swiglu", 128),
        *[_block("none", None, "swiglu", 96)] * 2, _block("gqa", 1, "linear", None),
        *[_block("gqa", 4, "swiglu", 128)] * 2, _block("none", None, "none", None))


@pytest.fixture(scope="module")
def pair():
    cfg = nj.preset("tiny-hetero").replace(blocks=RUNS)
    return nj.init(cfg, seed=3, scan_layers=False), nj.init(cfg, seed=3, scan_layers=True)


def _tokens(batch: int, t: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, t), 4, 512)


def test_runs_and_paths(pair):
    plain, scanned = pair
    assert scanned.module._runs() == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 9), (9, 10)]
    assert plain.module._runs() == [(i, i + 1) for i in range(10)]
    a, b = flat_params(plain.module), flat_params(scanned.module)
    assert list(a) == list(b) and all(p[0] != "layers" or isinstance(p[1], int) for p in b)
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))


def test_logits_equal(pair):
    plain, scanned = pair
    tokens = _tokens(2, 24)
    ref = np.asarray(plain.module(tokens)[0])
    np.testing.assert_allclose(np.asarray(scanned.module(tokens)[0]), ref, rtol=1e-5, atol=1e-5)


def test_cached_prefill_and_decode_equal(pair):
    scanned = pair[1]
    tokens, nxt = _tokens(2, 16), _tokens(2, 1, seed=1)
    outs = []
    for model in pair:
        m = model.module
        cache = m.init_cache(2, 32, "float32")
        logits, cache = m(tokens, None, None, cache)
        step, cache = m(nxt, jnp.full((2, 1), 16), None, cache)
        outs.append((logits, step, cache))
    (l0, s0, c0), (l1, s1, c1) = outs
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s0), rtol=1e-5, atol=1e-5)
    # the scanned cache: one stacked entry per run, the same bytes and the same per-layer contents
    assert len(c1) == len(scanned.module._runs()) and c1[0].k_BxSxKxH.shape == (3, 2, 32, 2, 16)
    assert cache_bytes(c1) == cache_bytes(c0)
    per_layer = []
    for (first, stop), c in zip(scanned.module._runs(), c1, strict=True):
        per_layer += [c] if stop - first == 1 else [None if c is None else type(c)(*(a[i] for a in c))
                                                    for i in range(stop - first)]
    for got, want in zip(per_layer, c0, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(np.asarray(got.k_BxSxKxH), np.asarray(want.k_BxSxKxH), atol=1e-5)


def test_greedy_tokens_equal(pair):
    prompts = [[5, 9, 200, 31, 7], [11, 12, 13]]
    got = [generate(*m.split(), prompts, 12, stop_tokens=[]).tokens for m in pair]
    assert got[0] == got[1] and all(len(t) == 12 for t in got[0])


def test_gradients_equal(pair):
    tokens = _tokens(2, 16, seed=2)

    def grads(model):
        graphdef, state = model.split()

        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens)[0]
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

        return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(jax.jit(jax.grad(loss))(state))}

    g0, g1 = grads(pair[0]), grads(pair[1])
    assert list(g0) == list(g1)
    for p in g0:
        np.testing.assert_allclose(g1[p], g0[p], rtol=1e-4, atol=1e-6, err_msg=str(p))


def _dots(cfg: nj.ModelConfig, scan: bool) -> int:
    """dot_generals in the jaxpr of a cached prefill: a scan body is traced (and counted) once."""
    model = nnx.eval_shape(lambda: nj.model.Transformer(cfg, Policy(scan_layers=scan), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(1, 32, "float32"))

    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state).hidden_states(tokens, None, None, cache)

    return str(jax.make_jaxpr(prefill)(state, _tokens(1, 8), cache)).count("dot_general")


@pytest.mark.parametrize("scan", [True, False])
def test_deep_cached_prefill_traces_the_block_once(scan):
    base = nj.preset("tiny-llama")
    counts = [_dots(base.replace(blocks=(base.blocks[0],) * n), scan) for n in (2, 24)]
    if scan:
        assert counts[0] == counts[1]  # one block body per run, whatever the depth
    else:
        assert counts[1] > counts[0]


def _step_temporaries(stacked_in_step: bool, layers: int = 8) -> tuple[int, int]:
    """(temporary bytes of a grad + SGD step over a run of scanned layers, bytes of their weights):
    the model's own `run_layers` (weights stored per layer, stacked in the step) or the same scan
    over weights stored stacked."""
    cfg = nj.preset("tiny-llama").replace(hidden_size=256, blocks=(nj.preset("tiny-llama").blocks[0],) * layers)
    policy = Policy(scan_layers=True, remat="full")
    model = nnx.eval_shape(lambda: nj.model.Transformer(cfg, policy, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(model, nnx.PathContains("layers"), ...)
    x = jax.ShapeDtypeStruct((2, 64, 256), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
    gd, one = nnx.split(model.layers[0])
    if not stacked_in_step:
        state = jax.tree.map(lambda v: jax.ShapeDtypeStruct((layers, *v.shape), v.dtype), one)

    def loss(params, rest, x):
        if stacked_in_step:
            y = nnx.merge(graphdef, params, rest).run_layers(x, pos)[0]
        else:
            body = jax.checkpoint(lambda h, s: (nnx.merge(gd, s)(h, pos, None, None)[0], None))
            y = jax.lax.scan(body, x, params)[0]
        return jnp.mean(y ** 2)

    def step(params, rest, x):
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss)(params, rest, x))

    compiled = jax.jit(step, donate_argnums=0).lower(state, rest, x).compile()
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(state))
    return compiled.memory_analysis().temp_size_in_bytes, weights


@pytest.mark.xfail(strict=True, reason="known: _scan_run stacks per-layer weights inside the step, so the "
                   "compiled step holds a second copy of a scanned run's weights (docs/scale.md, limit 4)")
def test_scanned_step_holds_no_second_copy_of_the_weights():
    in_step, weights = _step_temporaries(True)
    stored, _ = _step_temporaries(False)
    print(f"temporaries: stacked in the step {in_step}, stored stacked {stored}, weights {weights}")
    assert in_step - stored < weights // 2
