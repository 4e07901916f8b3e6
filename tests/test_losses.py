"""Chunked losses against float64 NumPy references: values and gradients, chunked == unchunked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.train.losses import cosine_per_token, cross_entropy_per_token, kd_per_token
from nemotron_jax.train.strategies import KDStrategy, LMStrategy

N, D, V = 37, 16, 50  # N not a multiple of the chunk sizes used below


def _log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return dict(h=rng.normal(size=(N, D)).astype(np.float32), head=rng.normal(size=(D, V)).astype(np.float32),
                th=rng.normal(size=(N, D)).astype(np.float32), thead=rng.normal(size=(D, V)).astype(np.float32),
                targets=rng.integers(0, V, N).astype(np.int32), w=rng.uniform(size=N).astype(np.float32))


def _ref_ce(a):
    logp = _log_softmax64(a["h"].astype(np.float64) @ a["head"].astype(np.float64))
    return -logp[np.arange(N), a["targets"]]


def _ref_kl(a, tau, top_k=None):
    s = a["h"].astype(np.float64) @ a["head"].astype(np.float64) / tau
    t = a["th"].astype(np.float64) @ a["thead"].astype(np.float64) / tau
    log_ps = _log_softmax64(s)
    if top_k is None:
        log_pt = _log_softmax64(t)
        return tau**2 * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)
    idx = np.argsort(-t, axis=-1)[:, :top_k]
    log_pt = _log_softmax64(np.take_along_axis(t, idx, -1))
    return tau**2 * np.sum(np.exp(log_pt) * (log_pt - np.take_along_axis(log_ps, idx, -1)), -1)


@pytest.mark.parametrize("chunk", [N, 8, 5])
def test_cross_entropy_matches_float64(arrays, chunk):
    got = cross_entropy_per_token(jnp.asarray(arrays["h"]), jnp.asarray(arrays["head"]),
                                  jnp.asarray(arrays["targets"]), chunk)
    np.testing.assert_allclose(np.asarray(got), _ref_ce(arrays), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau,top_k,chunk", [(1.0, None, N), (2.0, None, 8), (1.5, 7, 5)])
def test_kd_matches_float64(arrays, tau, top_k, chunk):
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    kl, ce = kd_per_token(a["h"], a["head"], a["th"], a["thead"], a["targets"], tau, top_k, chunk)
    np.testing.assert_allclose(np.asarray(kl), _ref_kl(arrays, tau, top_k), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ce), _ref_ce(arrays), rtol=1e-5, atol=1e-5)


def test_cosine_matches_float64(arrays):
    h, th = arrays["h"].astype(np.float64), arrays["th"].astype(np.float64)
    ref = 1 - (h * th).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(th, axis=-1))
    np.testing.assert_allclose(np.asarray(cosine_per_token(jnp.asarray(arrays["h"]), jnp.asarray(arrays["th"]))),
                               ref, rtol=1e-5, atol=1e-6)


def test_gradients_match_float64_and_chunking(arrays):
    """d(Σ w·CE)/dh and /dhead against the closed form (softmax − onehot), chunked == unchunked."""
    a = {k: jnp.asarray(v) for k, v in arrays.items()}

    def ce_loss(h, head, chunk):
        return jnp.sum(a["w"] * cross_entropy_per_token(h, head, a["targets"], chunk))

    grads = {c: jax.grad(ce_loss, argnums=(0, 1))(a["h"], a["head"], c) for c in (N, 8)}
    h, head, w = (arrays[k].astype(np.float64) for k in ("h", "head", "w"))
    dlogits = np.exp(_log_softmax64(h @ head))
    dlogits[np.arange(N), arrays["targets"]] -= 1
    dlogits *= w[:, None]
    for c in (N, 8):
        np.testing.assert_allclose(np.asarray(grads[c][0]), dlogits @ head.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(grads[c][1]), h.T @ dlogits, rtol=1e-4, atol=1e-5)
    for x, y in zip(grads[N], grads[8], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_kd_gradient_matches_float64_and_chunking(arrays):
    """d KL/d student logits = τ (p_S − p_T) at temperature τ; the teacher gets no gradient."""
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    tau = 2.0

    def kl_loss(h, head, th, chunk):
        return jnp.sum(a["w"] * kd_per_token(h, head, th, a["thead"], a["targets"], tau, None, chunk)[0])

    grads = {c: jax.grad(kl_loss, argnums=(0, 1, 2))(a["h"], a["head"], a["th"], c) for c in (N, 6)}
    h, head, w = (arrays[k].astype(np.float64) for k in ("h", "head", "w"))
    ps = np.exp(_log_softmax64(h @ head / tau))
    pt = np.exp(_log_softmax64(arrays["th"].astype(np.float64) @ arrays["thead"].astype(np.float64) / tau))
    dlogits = tau * (ps - pt) * w[:, None]
    for c in (N, 6):
        np.testing.assert_allclose(np.asarray(grads[c][0]), dlogits @ head.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(grads[c][1]), h.T @ dlogits, rtol=1e-4, atol=1e-5)
        assert not np.any(np.asarray(grads[c][2]))
    for x, y in zip(grads[N], grads[6], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _batch(tokens_BxT1, weights_BxT=None):
    b, t1 = tokens_BxT1.shape
    t = t1 - 1
    return TokenBatch(inputs=jnp.asarray(tokens_BxT1[:, :-1]), targets=jnp.asarray(tokens_BxT1[:, 1:]),
                      weights=jnp.ones((b, t), jnp.float32) if weights_BxT is None else jnp.asarray(weights_BxT),
                      positions=jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids=jnp.ones((b, t), jnp.int32))


def test_lm_strategy_matches_model_logits(tiny_hetero):
    """The chunked LM loss equals a float64 CE over the model's own full logits."""
    tokens = np.random.default_rng(1).integers(0, 512, (2, 13)).astype(np.int32)
    weights = np.random.default_rng(2).uniform(size=(2, 12)).astype(np.float32)
    loss_sum, _ = LMStrategy(chunk_tokens=5).loss(tiny_hetero.module, _batch(tokens, weights), None)
    logp = _log_softmax64(tiny_hetero.logits(tokens[:, :-1]).astype(np.float64))
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(loss_sum), np.sum(ce * weights), rtol=1e-5)


def test_kd_of_student_identical_to_teacher_is_zero(tiny_hetero):
    tokens = np.random.default_rng(3).integers(0, 512, (2, 17)).astype(np.int32)
    strategy = KDStrategy(temperature=2.0, cosine_weight=1.0, chunk_tokens=8)
    module = tiny_hetero.module
    total, sums = strategy.loss(module, _batch(tokens), module)
    assert abs(float(sums["kl"])) < 1e-5 and abs(float(sums["cos"])) < 1e-5 and abs(float(total)) < 1e-5
