"""Pallas kernels (interpret mode on CPU) against independent float64 NumPy references.

Shapes are tiny and blocks 16 wide so every case still spans several blocks, ends mid-block and
(where segments are used) changes segment mid-block. Gradients are checked against analytic NumPy
backward formulas, not against JAX's own autodiff.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl

import nemotron_jax as nj
from nemotron_jax import kernels
from nemotron_jax.api import Model
from nemotron_jax.kernels import _common
from nemotron_jax.kernels.decode_attention import decode_attention
from nemotron_jax.kernels.flash_attention import flash_attention
from nemotron_jax.kernels.swiglu import fused_swiglu
from nemotron_jax.kernels.tpu import chunked_reference, index_causal, splash_causal
from nemotron_jax.model.params import assemble, flat_params
from nemotron_jax.model.transformer import Policy

BLOCKS = dict(block_q=16, block_k=16, block_outer_bwd=16, block_inner_bwd=16)


# ----------------------------------------------------------------------------- numpy references
def np_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """float64 causal-by-position GQA: (out [B,T,N,H], probs [B,N,T,S], k and v repeated to N heads)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k_rep, v_rep = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head n -> KV head n // g
    mask = np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]
    if q_seg is not None:
        mask &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    mask = mask[:, None]
    logits = np.einsum("btnh,bsnh->bnts", q, k_rep) / np.sqrt(q.shape[3])
    logits = np.where(mask, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    probs = np.exp(logits - np.where(np.isfinite(top), top, 0.0)) * mask
    total = probs.sum(-1, keepdims=True)
    probs = probs / np.where(total > 0, total, 1.0)
    return np.einsum("bnts,bsnh->btnh", probs, v_rep), probs, k_rep, v_rep


def np_attention_grads(q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout):
    """Analytic float64 (dq, dk, dv) of sum(out * dout)."""
    _, probs, k_rep, v_rep = np_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    q, dout = np.asarray(q, np.float64), np.asarray(dout, np.float64)
    b, s, kh, h = k.shape
    scale = 1 / np.sqrt(h)
    dv_rep = np.einsum("bnts,btnh->bsnh", probs, dout)
    dp = np.einsum("btnh,bsnh->bnts", dout, v_rep)
    ds = probs * (dp - (dp * probs).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnh->btnh", ds, k_rep) * scale
    dk_rep = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    fold = lambda x: x.reshape(b, s, kh, -1, h).sum(3)
    return dq, fold(dk_rep), fold(dv_rep)


def np_swiglu(h, gate, up, down):
    h, gate, up, down = (np.asarray(x, np.float64) for x in (h, gate, up, down))
    g, u = h @ gate, h @ up
    sig = 1 / (1 + np.exp(-g))
    return (g * sig * u) @ down, (g, u, sig)


def np_swiglu_grads(h, gate, up, down, dy):
    h, gate, up, down, dy = (np.asarray(x, np.float64) for x in (h, gate, up, down, dy))
    _, (g, u, sig) = np_swiglu(h, gate, up, down)
    act = g * sig * u
    da = dy @ down.T
    dg, du = da * u * (sig + g * sig * (1 - sig)), da * g * sig
    hm, dym = h.reshape(-1, h.shape[-1]), dy.reshape(-1, dy.shape[-1])
    flat = lambda x: x.reshape(-1, x.shape[-1])
    return (dg @ gate.T + du @ up.T, hm.T @ flat(dg), hm.T @ flat(du), flat(act).T @ dym)


def close(actual, expected, tol: float, what: str = "") -> None:
    """max |a - e| <= tol * max |e| (a scale-aware check that also works for bf16 outputs)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err, scale = np.abs(actual - expected).max(), max(np.abs(expected).max(), 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def rand(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def packed(b, t, starts):
    """Positions restarting at each segment start, and segment ids (boundaries mid-block)."""
    seg = np.zeros(t, np.int32)
    for s in starts:
        seg[s:] += 1
    pos = np.arange(t) - np.array([0, *starts])[seg]
    return jnp.asarray(np.tile(pos, (b, 1))), jnp.asarray(np.tile(seg, (b, 1)))


# ----------------------------------------------------------------------------- flash attention
ASYMMETRIC = dict(block_q=32, block_k=16, block_outer_bwd=32, block_inner_bwd=16)
FLASH_CASES = {
    # name: (B, T, S, N, K, H, dtype, layout, tol[, blocks])
    "mha_packed_f32": (2, 40, 40, 4, 4, 16, jnp.float32, "packed", 1e-4),
    "mqa_causal_f32": (1, 37, 37, 4, 1, 32, jnp.float32, "causal", 1e-4, ASYMMETRIC),
    "gqa_ragged_h48_f32": (2, 20, 45, 4, 2, 48, jnp.float32, "ragged", 1e-4),
    "gqa_packed_bf16": (2, 64, 64, 4, 2, 16, jnp.bfloat16, "packed", 3e-2),
}


def flash_inputs(rng, b, t, s, n, kh, h, dtype, layout):
    q, k, v = rand(rng, (b, t, n, h), dtype), rand(rng, (b, s, kh, h), dtype), rand(rng, (b, s, kh, h), dtype)
    if layout == "packed":
        pos, seg = packed(b, t, [23, 33] if t > 40 else [23])
        return q, k, v, pos, pos, seg, seg
    if layout == "causal":
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        return q, k, v, pos, pos, None, None
    # Ragged: arbitrary kv positions (a permutation per row) and queries that may see nothing.
    kv_pos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]))
    q_pos = jnp.asarray(rng.integers(-3, s + 3, (b, t)))
    return q, k, v, q_pos, kv_pos, None, None


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention_matches_numpy(case):
    b, t, s, n, kh, h, dtype, layout, tol, *blocks = FLASH_CASES[case]
    blocks = blocks[0] if blocks else BLOCKS
    rng = np.random.default_rng(list(FLASH_CASES).index(case))
    q, k, v, q_pos, kv_pos, q_seg, kv_seg = flash_inputs(rng, b, t, s, n, kh, h, dtype, layout)
    dout = rand(rng, (b, t, n, h), dtype)

    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **blocks), q, k, v)
        return out, vjp(dout)

    out, (dq, dk, dv) = run(q, k, v, dout)
    assert out.dtype == dtype and dq.dtype == dtype and dk.shape == k.shape
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    expected, *_ = np_attention(*args, q_pos, kv_pos, q_seg, kv_seg)
    close(out, expected, tol, "out")
    ref = np_attention_grads(*args, q_pos, kv_pos, q_seg, kv_seg, np.asarray(dout, np.float64))
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, strict=True):
        close(got, want, 2 * tol, name)
    if layout == "ragged":  # rows that see nothing are exact zeros, with zero gradient
        blind = ~(np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]).any(-1)
        assert blind.any() and not np.asarray(out)[blind].any() and not np.asarray(dq)[blind].any()


def test_flash_writes_every_output_element():
    """Interpret mode starts outputs as NaN; the padded kernel outputs (tails included) must be finite."""
    poisoned = pl.pallas_call(lambda o_ref: None, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                              interpret=True)()
    assert np.isnan(np.asarray(poisoned)).all(), "this JAX no longer poisons unwritten outputs: rethink the check"

    from nemotron_jax.kernels import flash_attention as fa
    from nemotron_jax.kernels import flash_backward as fb

    rng = np.random.default_rng(1)
    q, k, v, pos, _, seg, _ = flash_inputs(rng, 1, 37, 37, 4, 2, 16, jnp.float32, "packed")
    cfg = fa.FlashConfig(16, 16, 16, 16, kv_len=37, interpret=True)

    @jax.jit
    def raw(q, k, v, pos, seg):  # the padded pallas_call outputs, before any slicing
        p = fa.prepare(cfg, q, k, v, pos, pos, seg, seg)
        q_lo, q_hi, k_lo, k_hi = fa.block_bounds(p, 16, 16)
        out, lse = fa.forward_call(cfg, p, q_lo, q_hi, 0.25)
        do_pad, delta = jnp.ones_like(out), jnp.ones(lse.shape, jnp.float32)
        dq = fb._dq_call(cfg, p, do_pad, lse, delta, q_lo, q_hi, 0.25)
        return (out, lse, dq, *fb._dkdv_call(cfg, p, do_pad, lse, delta, k_lo, k_hi, 0.25))

    out, lse, dq, dk, dv = raw(q, k, v, pos.astype(jnp.int32), seg)
    assert out.shape == (1, 48, 4, 16) and dk.shape == (1, 48, 2, 16)
    for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.isfinite(np.asarray(x)).all(), f"{name}: unwritten (NaN) or non-finite elements"


def test_block_bounds_never_skip_visible_blocks():
    rng = np.random.default_rng(2)
    q_pos, kv_pos = jnp.asarray(rng.integers(0, 50, (3, 40))), jnp.asarray(rng.integers(0, 50, (3, 56)))
    seg_q, seg_kv = jnp.asarray(rng.integers(0, 3, (3, 40))), jnp.asarray(rng.integers(0, 3, (3, 56)))
    lo, hi = jax.jit(lambda *a: _common.span(_common.visible_blocks(*a, 16, 8)))(q_pos, kv_pos, seg_q, seg_kv)
    lo, hi = np.asarray(lo), np.asarray(hi)
    mask = (np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None])
    mask &= np.asarray(seg_q)[:, :, None] == np.asarray(seg_kv)[:, None, :]
    for b, t, s in zip(*np.nonzero(mask), strict=True):
        assert lo[b, t // 16] <= s // 8 < hi[b, t // 16]


# ----------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("t,n,kh,h,dtype,tol", [(1, 8, 2, 16, jnp.float32, 1e-4), (2, 4, 1, 32, jnp.bfloat16, 3e-2)])
def test_decode_attention_ragged_matches_numpy(t, n, kh, h, dtype, tol):
    rng = np.random.default_rng(t)
    b, s = 3, 72  # S not a block multiple
    q, k, v = rand(rng, (b, t, n, h), dtype), rand(rng, (b, s, kh, h), dtype), rand(rng, (b, s, kh, h), dtype)
    q_pos = jnp.asarray([[5, 6], [69, 70], [-1, 0]])[:, :t]  # ragged rows; row 2 (mostly) sees nothing
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    out = jax.jit(lambda *a: decode_attention(*a, block_k=16, num_splits=3))(q, k, v, q_pos, slots)
    expected, *_ = np_attention(q, k, v, q_pos, slots)
    close(out, expected, tol, "decode")
    assert not np.asarray(out)[2, 0].any()


def test_dispatch_uses_decode_for_one_token_and_flash_otherwise():
    q, kv = jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 32, 2, 16))
    pos, slots = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 32), jnp.int32)
    one = str(jax.make_jaxpr(kernels.pallas_attention)(q, kv, kv, pos, slots))
    assert "decode_attention" in one and "flash_attention_fwd" not in one
    many = str(jax.make_jaxpr(kernels.pallas_attention)(jnp.zeros((1, 32, 4, 16)), kv, kv, slots, slots))
    assert "flash_attention_fwd" in many


# ----------------------------------------------------------------------------- fused SwiGLU
@pytest.mark.parametrize("m_shape,d,f,dtype,tol", [((2, 9), 32, 256, jnp.float32, 1e-4),
                                                   ((1, 20), 48, 512, jnp.bfloat16, 3e-2)])
def test_fused_swiglu_matches_numpy(m_shape, d, f, dtype, tol):
    rng = np.random.default_rng(d)
    h, dy = rand(rng, (*m_shape, d), dtype), rand(rng, (*m_shape, d), dtype)
    gate, up = rand(rng, (d, f), dtype, d ** -0.5), rand(rng, (d, f), dtype, d ** -0.5)
    down = rand(rng, (f, d), dtype, f ** -0.5)

    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(lambda *a: fused_swiglu(*a, block_m=16, block_f=128, block_d=16), *args)
        return out, vjp(dy)

    out, grads = run(h, gate, up, down)
    expected, _ = np_swiglu(h, gate, up, down)
    close(out, expected, tol, "swiglu")
    for name, got, want in zip(("dh", "dgate", "dup", "ddown"), grads, np_swiglu_grads(h, gate, up, down, dy),
                               strict=True):
        assert got.dtype == dtype
        close(got, want, 2 * tol, name)


# ----------------------------------------------------------------------------- selection, model
def test_selection_and_unknown_impl():
    from nemotron_jax.kernels.reference import dot_product_attention, swiglu

    assert kernels.attention_fn("xla") is dot_product_attention and kernels.ffn_fn("xla") is swiglu
    assert kernels.attention_fn("pallas") is kernels.pallas_attention
    with pytest.raises(ValueError, match="attention_impl"):
        kernels.attention_fn("cuda")
    with pytest.raises(ValueError, match="ffn_impl"):
        nj.init(nj.preset("tiny-hetero"), ffn_impl="triton")


def test_unsupported_shapes_fall_back_with_a_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_logged", set())
    rng = np.random.default_rng(3)
    q, k = rand(rng, (1, 8, 2, 8)), rand(rng, (1, 8, 1, 8))  # head_dim 8
    pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
    with caplog.at_level(logging.WARNING, logger="nemotron_jax.kernels"):
        out = kernels.pallas_attention(q, k, k, pos, pos)
        h, w = rand(rng, (1, 4, 32)), rand(rng, (32, 384), scale=0.2)  # width 384
        y = kernels.pallas_swiglu(h, w, w, w.T)
        kernels.pallas_attention(q, k, k, pos, pos)  # same reason again: logged once
    close(out, np_attention(q, k, k, pos, pos)[0], 1e-5)
    close(y, np_swiglu(h, w, w, w.T)[0], 1e-5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("head_dim 8 is not a multiple of 16" in m for m in messages) == 1
    assert any("FFN width 384 is not a multiple of 256" in m for m in messages)


def test_index_causal_detects_when_splash_masking_is_exact():
    pos, seg = packed(1, 12, [5])
    ar = jnp.broadcast_to(jnp.arange(12), (1, 12))
    assert index_causal(ar, ar, None, None) and index_causal(pos, pos, seg, seg)
    assert not index_causal(pos, pos, None, None)  # positions restart without segments
    assert not index_causal(ar, ar + 1, None, None)
    assert not index_causal(pos, pos, seg[:, ::-1], seg[:, ::-1])


def test_splash_path_in_tpu_interpret_mode():
    """The TPU wiring (head transposes, scaling, GQA, segments) through splash, interpreted on CPU."""
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, (1, 128, 2, 128)), rand(rng, (1, 128, 1, 128)), rand(rng, (1, 128, 1, 128))
    pos, seg = packed(1, 128, [50])
    assert index_causal(pos, pos, seg, seg)
    out = jax.jit(lambda q, k, v: splash_causal(q, k, v, seg, interpret=True))(q, k, v)
    close(out, np_attention(q, k, v, pos, pos, seg, seg)[0], 1e-4, "splash")


def test_chunked_reference_matches_numpy():
    from nemotron_jax.kernels.reference import dot_product_attention

    rng = np.random.default_rng(6)
    q, k, v = rand(rng, (2, 48, 4, 16)), rand(rng, (2, 48, 2, 16)), rand(rng, (2, 48, 2, 16))
    pos, seg = packed(2, 48, [20])
    out = chunked_reference(dot_product_attention, q, k, v, pos, pos, seg, seg, chunk=16)
    close(out, np_attention(q, k, v, pos, pos, seg, seg)[0], 1e-5, "chunked")


def test_kernels_lower_to_verified_triton_ir(monkeypatch):
    """No GPU needed: lower every kernel for CUDA (Triton) and run the MLIR verifier on each module."""
    from jax import export

    try:
        from jax._src.lib import triton
        from jax._src.lib import version as jaxlib_version
        from jax._src.pallas.triton import lowering
    except ImportError as e:
        pytest.skip(f"no Pallas Triton lowering in this jaxlib ({e})")
    if jaxlib_version > (0, 10, 2) and not triton.has_compilation_handler("cuda"):
        pytest.skip("this jaxlib compiles Triton while lowering and has no CUDA compiler here")
    lower, verified = lowering.lower_jaxpr_to_triton_module, []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        verified.append(result)
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    sds = jax.ShapeDtypeStruct
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    lower_cuda = lambda f, *args: export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)

    def flash_grad(q, k, v, pos, seg):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, pos, pos, seg, seg, interpret=False), q, k, v)
        return vjp(out)

    for h, dtype in ((128, jnp.bfloat16), (80, jnp.float32)):
        q, kv, ints = sds((2, 200, 8, h), dtype), sds((2, 200, 2, h), dtype), sds((2, 200), jnp.int32)
        lower_cuda(flash_grad, q, kv, kv, ints, ints)
    lower_cuda(lambda q, k, v, p, s: decode_attention(q, k, v, p, s, interpret=False),
               sds((4, 1, 32, 128), jnp.bfloat16), sds((4, 1024, 8, 128), jnp.bfloat16),
               sds((4, 1024, 8, 128), jnp.bfloat16), sds((4, 1), jnp.int32), sds((4, 1024), jnp.int32))
    w, wd = sds((1024, 2048), jnp.bfloat16), sds((2048, 1024), jnp.bfloat16)
    lower_cuda(lambda *a: jax.vjp(lambda *b: fused_swiglu(*b, interpret=False), *a)[0],
               sds((2, 100, 1024), jnp.bfloat16), w, w, wd)
    assert len(verified) == 3 + 3 + 1 + 1


@pytest.mark.slow
def test_model_logits_and_train_step_match_between_xla_and_pallas(tiny_hetero):
    """tiny-hetero (GQA with 4/2/1 KV heads, SwiGLU widths 256/512): logits, loss and all grads."""
    cfg = tiny_hetero.config
    policy = Policy(attention_impl="pallas", ffn_impl="pallas")
    pallas_model = Model(assemble(cfg, policy, flat_params(tiny_hetero.module)))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    pos, seg = packed(2, 24, [13])

    def step(model):
        graphdef, params, rest = nnx.split(model.module, nnx.Param, ...)

        @jax.jit
        def run(params, rest):
            def loss_fn(params):
                logits = nnx.merge(graphdef, params, rest)(tokens, pos, seg)[0]
                logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
                nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
                return nll.mean(), logits

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        return run(params, rest)

    (loss_x, logits_x), grads_x = step(tiny_hetero)
    (loss_p, logits_p), grads_p = step(pallas_model)
    close(logits_p, logits_x, 1e-4, "logits")
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
    flat_x, flat_p = nnx.to_flat_state(grads_x), nnx.to_flat_state(grads_p)
    for (path, gx), (path_p, gp) in zip(flat_x, flat_p, strict=True):
        assert path == path_p
        close(gp[...], gx[...], 1e-3, "/".join(map(str, path)))
