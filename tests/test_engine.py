"""The engine against independent references: the static sampler's greedy tokens and think budget,
the trainer's log-probs; and its own guarantees: page accounting, sharing, preemption, no
recompiles, batch-independent sampling, sharding over a mesh."""

import jax
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.engine import TRACES, SamplingOptions
from nemotron_jax.rl.strategies import target_logprobs
from nemotron_jax.sampling import ThinkTokens, generate
from nemotron_jax.sharding import MeshConfig

PROMPTS = [[1, 17], [1, 5, 9, 33, 40, 41, 42, 43, 44, 45, 46], [1, *range(60, 80)], [1, 300, 301, 302, 7]]
NEW = [9, 20, 5, 14]


def _static(model, prompts, new, **kw):
    """The static sampler one prompt at a time (its own reference: no batch padding involved)."""
    kw.setdefault("stop_tokens", [])
    return [generate(*model.split(), [p], n, **kw).tokens[0] for p, n in zip(prompts, new, strict=True)]


@pytest.fixture(scope="module")
def hetero_engine(tiny_hetero):
    return nj.Engine(tiny_hetero, max_batch=4, page_size=4, num_pages=40)


@pytest.fixture(scope="module")
def static_hetero(tiny_hetero):
    return _static(tiny_hetero, PROMPTS, NEW)


def test_greedy_equals_the_static_sampler_with_requests_arriving_while_others_decode(tiny_hetero, hetero_engine,
                                                                                     static_hetero):
    eng = hetero_engine
    got: dict = {}
    first = [eng.add_request(p, SamplingOptions(n, stop_tokens=())) for p, n in zip(PROMPTS[:2], NEW[:2], strict=True)]
    for _ in range(2):
        for e in eng.step():
            got.setdefault(e.request_id, []).append(e.token)
    assert any(got.values()), "the first requests are decoding"
    later = [eng.add_request(p, SamplingOptions(n, stop_tokens=())) for p, n in zip(PROMPTS[2:], NEW[2:], strict=True)]
    while eng.has_work():
        for e in eng.step():
            got.setdefault(e.request_id, []).append(e.token)
    assert [got[i] for i in first + later] == static_hetero
    assert eng.free_pages == eng.num_pages - 1  # every page returned


def test_greedy_equals_the_static_sampler_on_tiny_llama_through_generate(tiny_llama):
    eng = nj.Engine(tiny_llama, max_batch=4, page_size=8, num_pages=32)
    assert eng.generate(PROMPTS, NEW, stop_tokens=[]) == _static(tiny_llama, PROMPTS, NEW)


def test_a_pool_too_small_for_the_load_completes_every_request(tiny_hetero, static_hetero):
    # 8 usable pages of 4 slots: any one request fits (<= 7 pages), all four at once do not.
    eng = nj.Engine(tiny_hetero, max_batch=4, page_size=4, num_pages=9)
    assert eng.generate(PROMPTS, NEW, stop_tokens=[]) == static_hetero
    assert eng.stats["prefill_tokens"] > sum(len(p) - 1 for p in PROMPTS)  # preempted work was recomputed
    assert eng.free_pages == 8
    with pytest.raises(ValueError, match="pages"):
        eng.add_request([1] * 30, SamplingOptions(10))


def test_n_samples_prefill_the_prompt_once_and_share_its_full_pages(tiny_hetero):
    eng = nj.Engine(tiny_hetero, max_batch=4, page_size=4, num_pages=40)
    prompt = list(range(1, 14))  # 12 positions before the last token: 3 full pages
    rids = [eng.add_request(prompt, SamplingOptions(20, temperature=1.0, sample_index=j, stop_tokens=()), group="g")
            for j in range(4)]
    eng.step()
    eng.step()
    reqs = [eng.scheduler.requests[r] for r in rids]
    assert all(r.pages[:3] == reqs[0].pages[:3] for r in reqs)
    assert [eng.scheduler.pages.refcount(p) for p in reqs[0].pages[:3]] == [4, 4, 4]
    while eng.has_work():
        eng.step()
    assert eng.stats["prefill_tokens"] == len(prompt) - 1  # not 4 * 12
    assert eng.free_pages == eng.num_pages - 1
    # generate(n=...) groups the samples the same way and returns them consecutively
    outs = eng.generate([prompt, [1, 2, 3]], 5, temperature=1.0, n=3, stop_tokens=[])
    assert len(outs) == 6 and all(len(o) == 5 for o in outs) and len({tuple(o) for o in outs[:3]}) > 1


def test_sampled_tokens_do_not_depend_on_batch_mates(tiny_hetero, hetero_engine):
    opts = SamplingOptions(12, temperature=1.0, top_p=0.9, top_k=50, seed=5, sample_index=3, stop_tokens=())

    def run(others):
        rid = hetero_engine.add_request(PROMPTS[1], opts)
        for j, p in enumerate(others):
            hetero_engine.add_request(p, SamplingOptions(20, temperature=0.7, seed=j, stop_tokens=()))
        toks = []
        while hetero_engine.has_work():
            toks += [e.token for e in hetero_engine.step() if e.request_id == rid]
        return toks

    alone = run([])
    assert run([PROMPTS[0], PROMPTS[2], PROMPTS[3]]) == alone
    assert len(alone) == 12


def test_logprobs_equal_the_trainers_for_every_block_kind(tiny_hetero, hetero_engine):
    tokens, logprobs = hetero_engine.generate(PROMPTS, NEW, temperature=1.0, seed=1, stop_tokens=[],
                                              return_logprobs=True)
    t = max(len(p) + len(o) for p, o in zip(PROMPTS, tokens, strict=True)) - 1
    batch = TokenBatch.zeros(len(PROMPTS), t)
    for i, (p, o) in enumerate(zip(PROMPTS, tokens, strict=True)):
        seq = p + o
        batch.inputs[i, :len(seq) - 1] = seq[:-1]
        batch.targets[i, :len(seq) - 1] = seq[1:]
        batch.positions[i, :len(seq) - 1] = np.arange(len(seq) - 1)
        batch.segment_ids[i, :len(seq) - 1] = 1
    logp, _ = target_logprobs(tiny_hetero.module, jax.device_put(batch))
    logp = np.asarray(logp)
    for i, (p, o) in enumerate(zip(PROMPTS, tokens, strict=True)):
        want = logp[i, len(p) - 1:len(p) - 1 + len(o)]
        assert np.abs(np.asarray(logprobs[i], np.float32) - want).max() <= 1e-5


def test_stop_tokens_end_a_request_and_are_returned(tiny_hetero, hetero_engine, static_hetero):
    stop = static_hetero[1][6]
    got = hetero_engine.generate(PROMPTS, NEW, stop_tokens=[stop, 511])
    assert got == _static(tiny_hetero, PROMPTS, NEW, stop_tokens=[stop, 511])
    assert got[1][-1] == stop and len(got[1]) == static_hetero[1].index(stop) + 1


def test_max_thinking_tokens_matches_the_static_sampler(tiny_hetero, static_hetero):
    g = static_hetero[1]
    spec = ThinkTokens.exact([g[1]], [500, 501])
    eng = nj.Engine(tiny_hetero, max_batch=4, page_size=4, num_pages=40, think_tokens=spec)
    prompts = [PROMPTS[1], PROMPTS[1] + g[:2], PROMPTS[0]]
    got = eng.generate(prompts, 12, stop_tokens=[], max_thinking_tokens=3)
    want = _static(tiny_hetero, prompts, [12] * 3, max_thinking_tokens=3, think_tokens=spec)
    assert got == want
    assert got[0][5:7] == [500, 501]  # opened at token 1, thought 3 tokens, then forced to close


def test_a_steady_stream_does_not_recompile(tiny_hetero, hetero_engine):
    hetero_engine.generate([[1, 2, 3], [1, 9, 8, 7, 6]], [6, 9], stop_tokens=[])  # warm these buckets
    before = dict(TRACES)
    for k in range(3):
        hetero_engine.generate([[1, 2 + k, 3], [1, 9, 8, 7, 6 + k]], [6 - k, 9], stop_tokens=[])
    assert dict(TRACES) == before


def test_abort_frees_pages_and_bad_requests_are_refused(hetero_engine):
    rid = hetero_engine.add_request(PROMPTS[2], SamplingOptions(30))
    hetero_engine.step()
    assert hetero_engine.free_pages < hetero_engine.num_pages - 1
    hetero_engine.abort(rid)
    assert hetero_engine.free_pages == hetero_engine.num_pages - 1 and not hetero_engine.has_work()
    for bad in ([], [512], [-1]):
        with pytest.raises(ValueError, match="token ids"):
            hetero_engine.add_request(bad, SamplingOptions(4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        hetero_engine.add_request([1], SamplingOptions(5000))
    with pytest.raises(ValueError, match="top_p"):
        hetero_engine.generate([[1]], 3, temperature=1.0, top_p=2.0)
    assert hetero_engine.generate([[1, 2]], 0) == [[]]


def test_sharded_over_a_mesh_matches_unsharded(static_hetero):
    layout = MeshConfig(data=2, tensor=2).layout()
    model = nj.init(nj.preset("tiny-hetero"), seed=0, layout=layout)
    eng = nj.Engine(model, max_batch=4, page_size=4, num_pages=40)
    assert eng.pools[0][0].sharding.spec[3] == "tensor"  # 4 KV heads split over tensor
    assert eng.generate(PROMPTS, NEW, stop_tokens=[]) == static_hetero


@pytest.mark.slow
def test_pallas_decode_kernel_in_the_engine(tiny_hetero, static_hetero):
    eng = nj.Engine(tiny_hetero, max_batch=4, page_size=4, num_pages=40, attention_impl="pallas")
    assert eng.generate(PROMPTS[:2], NEW[:2], stop_tokens=[]) == static_hetero[:2]


def test_model_generate_runs_on_the_engine_with_the_models_current_weights(tiny_hetero, static_hetero):
    """`Model.generate` keeps its engine between calls of one size and always uses the weights the
    model holds now (a trainer updating them in place, adapters attached later)."""
    from flax import nnx

    model = nj.init(tiny_hetero.config, seed=0)
    assert model.generate(PROMPTS, NEW, stop_tokens=[]) == static_hetero  # a per-prompt max_new_tokens list
    engine = model.engine(PROMPTS, NEW)
    assert model.engine(PROMPTS, NEW) is engine
    other = nj.init(tiny_hetero.config, seed=5)
    nnx.update(model.module, nnx.state(other.module))
    assert model.generate(PROMPTS, NEW, stop_tokens=[]) == _static(other, PROMPTS, NEW)
    model.add_adapters(rank=2)  # B = 0: the same function, a new module structure
    assert model.engine(PROMPTS, NEW) is not engine
    assert model.generate(PROMPTS, NEW, stop_tokens=[]) == _static(other, PROMPTS, NEW)
    with pytest.raises(ValueError, match="unknown generate option"):
        model.generate(PROMPTS, NEW, cache_len=64)
