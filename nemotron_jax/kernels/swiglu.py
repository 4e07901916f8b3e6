"""Fused SwiGLU FFN: silu(h @ gate) * (h @ up) in one Pallas kernel, then the down projection.

Kernel: grid (token block, width block); each program accumulates both h @ gate and h @ up for its
[block_m, block_f] tile in float32 over chunks of the hidden dim, applies silu and the product in
float32 and writes the activation once in the compute dtype. Unfused XLA writes and re-reads the two
[M, F] matmul outputs; this writes one. The down projection [M, F] @ [F, D] is a plain XLA matmul:
fusing it would need either a full [block_m, D] accumulator per program (too big for registers at
D = 8k) or cross-program accumulation (atomics), and cuBLAS already runs that GEMM near peak.

Backward (custom VJP) is XLA math that recomputes the two projections from the saved inputs rather
than keeping the [M, F] activation alive:
    g = h Wg, u = h Wu, a = silu(g) u, da = dy Wd^T,
    dWd = a^T dy, dg = da * u * silu'(g), du = da * silu(g), dh = dg Wg^T + du Wu^T,
    dWg = h^T dg, dWu = h^T du.

Widths F must be multiples of 256 and D a multiple of 16 (the dispatcher falls back otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nemotron_jax.kernels import _common as c


def fused_swiglu(h_BxTxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, down_FxD: jax.Array, *,
                 block_m: int = 64, block_f: int = 128, block_d: int = 64,
                 interpret: bool | None = None) -> jax.Array:
    """down(silu(gate(h)) * up(h)), gate/up/silu fused in Pallas; differentiable."""
    d, f = gate_DxF.shape
    if up_DxF.shape != (d, f) or down_FxD.shape != (f, d) or h_BxTxD.shape[-1] != d:
        raise ValueError(f"inconsistent SwiGLU shapes: h {h_BxTxD.shape}, gate {gate_DxF.shape}, "
                         f"up {up_DxF.shape}, down {down_FxD.shape}")
    for name, b in (("block_m", block_m), ("block_f", block_f), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if f % block_f or d % 16:
        raise ValueError(f"width {f} must be a multiple of block_f={block_f} and hidden {d} of 16")
    while d % block_d:
        block_d //= 2
    m = h_BxTxD.size // d
    bm = max(16, min(block_m, c.next_pow2(m)))
    interpret = c.interpret_mode() if interpret is None else interpret
    return _swiglu(bm, block_f, block_d, interpret, h_BxTxD, gate_DxF, up_DxF, down_FxD)


def gated_activation(h_MxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, *, block_m: int,
                     block_f: int, block_d: int, interpret: bool) -> jax.Array:
    """The fused kernel alone: silu(h @ gate) * (h @ up) as [M, F] in h's dtype (M padded internally)."""
    m, d = h_MxD.shape
    f = gate_DxF.shape[1]
    mp = c.round_up(m, block_m)
    kernel = functools.partial(_gated_kernel, block_d=block_d, n_chunks=d // block_d)
    act = pl.pallas_call(
        kernel,
        grid=(mp // block_m, f // block_f),
        in_specs=[pl.BlockSpec((block_m, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, block_f), lambda i, j: (0, j)),
                  pl.BlockSpec((d, block_f), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_m, block_f), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, f), h_MxD.dtype),
        compiler_params=c.triton_params(8, 3, interpret),
        interpret=interpret,
        name="swiglu_gated",
    )(c.pad_axis(h_MxD, 0, mp), gate_DxF.astype(h_MxD.dtype), up_DxF.astype(h_MxD.dtype))
    return act[:m]


def _gated_kernel(h_ref, gate_ref, up_ref, out_ref, *, block_d: int, n_chunks: int) -> None:
    bm, bf = out_ref.shape

    def body(i, carry):
        acc_g, acc_u = carry
        cols = pl.ds(pl.multiple_of(i * block_d, block_d), block_d)
        h = h_ref[:, cols]
        return acc_g + c.dot(h, gate_ref[cols, :]), acc_u + c.dot(h, up_ref[cols, :])

    zeros = jnp.zeros((bm, bf), jnp.float32)
    g, u = jax.lax.fori_loop(0, n_chunks, body, (zeros, zeros))
    out_ref[...] = (g * jax.nn.sigmoid(g) * u).astype(out_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _swiglu(block_m: int, block_f: int, block_d: int, interpret: bool, h, gate, up, down) -> jax.Array:
    d = h.shape[-1]
    act_MxF = gated_activation(h.reshape(-1, d), gate, up, block_m=block_m, block_f=block_f,
                               block_d=block_d, interpret=interpret)
    out_MxD = jnp.dot(act_MxF, down.astype(h.dtype), preferred_element_type=jnp.float32)
    return out_MxD.astype(h.dtype).reshape(h.shape)


def _swiglu_fwd(block_m, block_f, block_d, interpret, h, gate, up, down):
    return _swiglu(block_m, block_f, block_d, interpret, h, gate, up, down), (h, gate, up, down)


def _swiglu_bwd(block_m, block_f, block_d, interpret, res, dy):
    h, gate, up, down = res
    f32 = jnp.float32
    d = h.shape[-1]
    h_MxD, dy_MxD = h.reshape(-1, d), dy.reshape(-1, d)
    mm = lambda a, b: jnp.dot(a, b, preferred_element_type=f32)
    g_MxF, u_MxF = mm(h_MxD, gate), mm(h_MxD, up)
    sig = jax.nn.sigmoid(g_MxF)
    silu = g_MxF * sig
    act_MxF = (silu * u_MxF).astype(h.dtype)
    da_MxF = mm(dy_MxD, down.T)
    dg_MxF = (da_MxF * u_MxF * sig * (1.0 + g_MxF * (1.0 - sig))).astype(h.dtype)
    du_MxF = (da_MxF * silu).astype(h.dtype)
    dh = mm(dg_MxF, gate.T) + mm(du_MxF, up.T)
    return (dh.astype(h.dtype).reshape(h.shape), mm(h_MxD.T, dg_MxF).astype(gate.dtype),
            mm(h_MxD.T, du_MxF).astype(up.dtype), mm(act_MxF.T, dy_MxD).astype(down.dtype))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
