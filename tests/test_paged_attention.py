"""Paged decode attention: the reference equals dense attention over the same keys, and the Pallas
kernel (interpret mode on CPU) equals the reference, for ragged lengths and shuffled pages."""


import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels.paged_attention import paged_attention, paged_attention_kernel, paged_attention_reference
from nemotron_jax.kernels.reference import dot_product_attention


def _setup(b=3, n=4, kh=2, h=16, s=4, m=5, layers=2, pages=24, seed=0):
    """Random pools, and for each row a dense K/V of M*S positions scattered over shuffled pages."""
    rng = np.random.default_rng(seed)
    k_pool = rng.standard_normal((layers, pages, s, kh, h)).astype(np.float32)
    v_pool = rng.standard_normal((layers, pages, s, kh, h)).astype(np.float32)
    table = rng.permutation(np.arange(1, pages))[: b * m].reshape(b, m).astype(np.int32)
    q = rng.standard_normal((b, 1, n, h)).astype(np.float32)
    lengths = np.array([1, s * 2 + 1, m * s][:b], np.int32)
    return k_pool, v_pool, table, q, lengths


@pytest.mark.parametrize("layer", [0, 1])
def test_reference_equals_dense_attention_over_the_gathered_keys(layer):
    k_pool, v_pool, table, q, lengths = _setup()
    b, m = table.shape
    s = k_pool.shape[2]
    pos = (lengths - 1)[:, None]
    out = paged_attention_reference(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(pos),
                                    jnp.asarray(table), layer)
    for i in range(b):
        k = k_pool[layer, table[i]].reshape(1, m * s, *k_pool.shape[3:])[:, : lengths[i]]
        v = v_pool[layer, table[i]].reshape(1, m * s, *v_pool.shape[3:])[:, : lengths[i]]
        want = dot_product_attention(jnp.asarray(q[i:i + 1]), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos[i:i + 1]),
                                     jnp.arange(lengths[i])[None])
        np.testing.assert_allclose(np.asarray(out[i:i + 1]), np.asarray(want), atol=1e-5)


def test_pages_past_the_length_do_not_matter():
    k_pool, v_pool, table, q, lengths = _setup()
    pos = jnp.asarray((lengths - 1)[:, None])
    a = paged_attention_reference(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), pos, jnp.asarray(table))
    t2 = table.copy()
    t2[0, 1:] = 0  # row 0 has length 1: only its first page is read
    b = paged_attention_reference(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), pos, jnp.asarray(t2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("n,kh", [(4, 2), (4, 1), (4, 4)])
def test_pallas_kernel_equals_the_reference(n, kh):
    k_pool, v_pool, table, q, lengths = _setup(n=n, kh=kh)
    pos = jnp.asarray((lengths - 1)[:, None])
    args = (jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), pos, jnp.asarray(table), 1)
    want = paged_attention_reference(*args)
    got = paged_attention_kernel(*args, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(paged_attention(*args, impl="pallas")), np.asarray(want), atol=1e-5)


def test_kernel_refuses_what_it_cannot_take_and_dispatch_falls_back():
    k_pool, v_pool, table, q, lengths = _setup()
    q2 = jnp.asarray(np.concatenate([q, q], axis=1))
    pos2 = jnp.asarray(np.stack([lengths - 2, lengths - 1], 1).clip(0))
    with pytest.raises(ValueError, match="one query per row"):
        paged_attention_kernel(q2, jnp.asarray(k_pool), jnp.asarray(v_pool), pos2, jnp.asarray(table))
    got = paged_attention(q2, jnp.asarray(k_pool), jnp.asarray(v_pool), pos2, jnp.asarray(table), impl="pallas")
    want = paged_attention_reference(q2, jnp.asarray(k_pool), jnp.asarray(v_pool), pos2, jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="unknown"):
        paged_attention(q2, jnp.asarray(k_pool), jnp.asarray(v_pool), pos2, jnp.asarray(table), impl="cuda")
