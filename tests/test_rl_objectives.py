"""GRPO/RLOO advantages and the policy and preference losses against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.rl.objectives import group_advantages, grpo_loss, k3_kl, preference_loss


def np_advantages(r, kind, normalize):
    r = r.astype(np.float64)
    out = np.zeros_like(r)
    for p in range(r.shape[0]):
        for i in range(r.shape[1]):
            if kind == "grpo":
                a = r[p, i] - r[p].mean()
                out[p, i] = a / (r[p].std() + 1e-6) if normalize else a
            else:
                others = np.delete(r[p], i)
                a = r[p, i] - others.mean()
                s = others.std()
                out[p, i] = a / (s + 1e-6) if normalize and s > 0 else a
    return out


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("normalize", [True, False])
def test_advantages_match_numpy(kind, normalize):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(5, 4)).astype(np.float32) + rng.normal(size=(5, 4)).astype(np.float32) * 0.1
    rewards[0] = 1.0  # a group whose rewards are all equal
    rewards[1] = [1, 0, 0, 0]
    got = np.asarray(group_advantages(jnp.asarray(rewards), kind, normalize))
    np.testing.assert_allclose(got, np_advantages(rewards, kind, normalize), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[0], 0.0)


def np_grpo(logp, old, adv, mask, ref, clip, kl_coef, aggregation):
    logp, old, ref = (x.astype(np.float64) for x in (logp, old, ref))
    ratio = np.exp(logp - old)
    a = adv[:, None].astype(np.float64)
    per_tok = -np.minimum(ratio * a, np.clip(ratio, 1 - clip, 1 + clip) * a)
    r = ref - logp
    per_tok = per_tok + kl_coef * (np.exp(r) - 1 - r)
    if aggregation == "token":
        return (per_tok * mask).sum() / mask.sum()
    seqs = [(per_tok[b] * mask[b]).sum() / mask[b].sum() for b in range(len(mask)) if mask[b].sum() > 0]
    return np.mean(seqs)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_loss_matches_numpy(aggregation):
    rng = np.random.default_rng(1)
    b, t = 6, 7
    logp = -rng.uniform(0.1, 3, size=(b, t)).astype(np.float32)
    old = logp + rng.normal(scale=0.4, size=(b, t)).astype(np.float32)  # ratios far enough to clip
    ref = logp + rng.normal(scale=0.3, size=(b, t)).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    mask = np.ones((b, t), np.float32)
    mask[0, 4:] = 0  # padding
    mask[1, :2] = 0  # prompt tokens
    mask[2] = 0  # a row with no response tokens at all
    loss, metrics = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                              jnp.asarray(ref), clip_low=0.2, clip_high=0.2, kl_coef=0.05, aggregation=aggregation)
    expected = np_grpo(logp, old, adv, mask, ref, 0.2, 0.05, aggregation)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) < 1


def test_grpo_gradient_raises_logprob_of_positive_advantage():
    logp = jnp.array([[-1.0, -1.0], [-1.0, -1.0]])
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 2))
    grad = jax.grad(lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0])(logp)
    assert (grad[0] < 0).all() and (grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    x = jnp.linspace(-3, 0, 7)
    assert float(jnp.abs(k3_kl(x, x)).max()) == 0.0
    assert bool((k3_kl(x, x[::-1]) >= 0).all())


def test_preference_losses_match_numpy():
    rng = np.random.default_rng(2)
    c, r, rc, rr, gap = (rng.normal(size=5).astype(np.float32) for _ in range(5))
    beta = 0.3
    margin = (c.astype(np.float64) - rc) - (r.astype(np.float64) - rr)
    dpo, _ = preference_loss(*map(jnp.asarray, (c, r, rc, rr)), beta=beta)
    np.testing.assert_allclose(float(dpo), np.mean(np.log1p(np.exp(-beta * margin))), rtol=1e-5)
    sq, _ = preference_loss(*map(jnp.asarray, (c, r, rc, rr)), beta=beta, kind="rpo_sq",
                            reward_gap_B=jnp.asarray(gap), eta=2.0)
    np.testing.assert_allclose(float(sq), np.mean((beta * margin - 2.0 * gap) ** 2), rtol=1e-5)
    kl, _ = preference_loss(*map(jnp.asarray, (c, r, rc, rr)), beta=beta, kind="rpo_bwd_kl",
                            reward_gap_B=jnp.asarray(gap))
    sig = lambda x: 1 / (1 + np.exp(-x))
    p, q = sig(gap.astype(np.float64)), sig(beta * margin)
    np.testing.assert_allclose(float(kl), np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))),
                               rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_aggregation_weights_reproduce_the_masked_mean(aggregation):
    from nemotron_jax.rl.objectives import aggregation_weights, masked_mean

    rng = np.random.default_rng(3)
    loss = jnp.asarray(rng.normal(size=(4, 6)))
    mask = jnp.asarray(rng.integers(0, 2, size=(4, 6)).astype(np.float32)).at[0].set(0.0)
    w = aggregation_weights(mask, aggregation)
    np.testing.assert_allclose(float((w * loss).sum() / w.sum()), float(masked_mean(loss, mask, aggregation)),
                               rtol=1e-6)
