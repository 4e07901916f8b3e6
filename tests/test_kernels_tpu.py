"""The TPU kernel paths compile through Mosaic for a real TPU target (libtpu's v5e topology, no
TPU needed): `jit(...).lower(...).compile()` on the slice's devices, never interpret mode."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemotron_jax.kernels import reference, tpu

try:
    import libtpu  # noqa: F401
except ImportError as e:
    pytest.skip(f"libtpu is not installed ({e}); pip install 'jax[tpu]' (the test extra)", allow_module_level=True)


@pytest.fixture(scope="module")
def sds():
    """Abstract arrays on one chip of a v5e slice."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    sharding = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    return lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _mosaic(fn, *args) -> str:
    """The compiled TPU HLO of `fn`, asserting that a Mosaic kernel is in it. At the default matmul
    precision, as a TPU run uses: the suite's "highest" asks Mosaic for fp32 contractions of bf16
    operands, which it refuses ("Bad lhs type"; see the test below)."""
    with jax.default_matmul_precision("default"):
        hlo = jax.jit(fn).lower(*args).compile().as_text()
    assert "tpu_custom_call" in hlo, "no Mosaic kernel in the compiled program"
    return hlo


def test_splash_forward_backward_and_segments_compile(sds):
    q, kv, seg = sds((2, 256, 4, 128)), sds((2, 256, 2, 128)), sds((2, 256), jnp.int32)
    _mosaic(lambda q, k, v: tpu.splash_causal(q, k, v, None), q, kv, kv)
    _mosaic(lambda q, k, v, s: tpu.splash_causal(q, k, v, s), q, kv, kv, seg)
    loss = lambda q, k, v: tpu.splash_causal(q, k, v, None).astype(jnp.float32).sum()
    _mosaic(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)


def test_splash_attention_with_its_reference_branch_compiles(sds):
    """What `attention_impl="pallas"` runs on TPU: splash under `lax.cond`, the chunked reference else."""
    q, kv, pos = sds((1, 1024, 4, 128)), sds((1, 1024, 1, 128)), sds((1, 1024), jnp.int32)
    _mosaic(lambda q, k, v, p: tpu.splash_attention(q, k, v, p, p, p, p, reference=reference.dot_product_attention),
            q, kv, kv, pos)


def test_splash_under_highest_matmul_precision_is_refused_by_mosaic(sds):
    """Documents a limit: with jax_default_matmul_precision="highest" (set by tests/conftest.py),
    splash's bf16 dots carry fp32 precision and Mosaic fails to compile them."""
    q, kv = sds((1, 256, 2, 128)), sds((1, 256, 2, 128))
    with jax.default_matmul_precision("highest"), pytest.raises(Exception, match="Mosaic failed to compile"):
        jax.jit(lambda q, k, v: tpu.splash_causal(q, k, v, None)).lower(q, kv, kv).compile()


@pytest.mark.parametrize("kernel", ["decode", "swiglu"])
def test_gpu_only_kernels_have_no_mosaic_variant(sds, kernel):
    """Documents a gap: decode attention and fused SwiGLU are Triton kernels (Triton compiler params,
    GPU block shapes), which the TPU lowering refuses; on TPU the dispatcher uses splash / the
    reference instead. When a Mosaic variant lands, this test fails and should become a compile test."""
    from nemotron_jax.kernels.decode_attention import decode_attention
    from nemotron_jax.kernels.swiglu import fused_swiglu

    if kernel == "decode":
        args = (sds((2, 1, 4, 128)), sds((2, 256, 2, 128)), sds((2, 256, 2, 128)), sds((2, 1), jnp.int32),
                sds((2, 256), jnp.int32))
        fn = lambda q, k, v, qp, kp: decode_attention(q, k, v, qp, kp, interpret=False)
    else:
        args = (sds((2, 128, 256)), sds((256, 512)), sds((256, 512)), sds((512, 256)))
        fn = lambda h, g, u, d: fused_swiglu(h, g, u, d, interpret=False)
    with pytest.raises((ValueError, AssertionError)):  # "params for platform gpu", or "no Mosaic kernel"
        _mosaic(fn, *args)
