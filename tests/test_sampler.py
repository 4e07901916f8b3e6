"""The static sampler against independent references: full forward passes, transformers' generate, softmax.

Compiles are the cost here, so tests share shapes: most calls use batch bucket 4, prompt bucket 16
and cache bucket 64 on the tiny presets.
"""

import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.sampling import TRACES, ThinkTokens, abstract_cache_bytes, cache_bytes, generate
from nemotron_jax.sampling.logits_processing import make_params, sample, truncate_logits

PROMPTS = [[1, 17, 99, 250], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 300], [1, 42, 43, 44, 45, 46, 47]]
NEW = 12


def static(model, prompts, max_new_tokens, return_logprobs=False, **options):
    """The static sampler (the engine's reference; `Model.generate` runs on the engine)."""
    out = generate(*model.split(), prompts, max_new_tokens, return_logprobs=return_logprobs, layout=model.layout,
                   **options)
    return (out.tokens, out.logprobs) if return_logprobs else out.tokens


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced_logits(model, prompts, outs):
    """Full-forward logits [B, T, V] of prompt + generated tokens, right-padded (causality makes
    every position depend only on its own prefix, so one pass stands for step-by-step decoding)."""
    seqs = [p + o for p, o in zip(prompts, outs, strict=True)]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    return model.logits(tokens)


@pytest.fixture(scope="module")
def greedy_hetero(tiny_hetero):
    return static(tiny_hetero, PROMPTS, NEW, stop_tokens=[], return_logprobs=True)


def test_greedy_equals_argmax_of_full_forward(tiny_hetero, greedy_hetero):
    outs, logprobs = greedy_hetero
    assert [len(o) for o in outs] == [NEW] * len(PROMPTS)
    logits = teacher_forced_logits(tiny_hetero, PROMPTS, outs)
    for i, (p, o) in enumerate(zip(PROMPTS, outs, strict=True)):
        step_logits = logits[i, len(p) - 1:len(p) - 1 + NEW]
        assert np.argmax(step_logits, -1).tolist() == o, f"row {i}"
        ref = log_softmax(step_logits)[np.arange(NEW), o]
        np.testing.assert_allclose(logprobs[i], ref, atol=2e-5)


def test_stop_tokens_end_rows_and_are_included(tiny_hetero, greedy_hetero):
    outs, _ = greedy_hetero
    stop = outs[0][4]
    first = {i: o.index(stop) for i, o in enumerate(outs) if stop in o}
    got = static(tiny_hetero, PROMPTS, NEW, stop_tokens=[stop])
    for i, o in enumerate(outs):
        assert got[i] == (o[:first[i] + 1] if i in first else o)


def test_default_stop_tokens_are_the_config_eos_ids(tiny_hetero):
    eos = list(tiny_hetero.config.eos_token_ids)
    assert static(tiny_hetero, PROMPTS, NEW) == static(tiny_hetero, PROMPTS, NEW, stop_tokens=eos)


def test_no_recompile_within_bucket(tiny_hetero, greedy_hetero):
    before = dict(TRACES)
    static(tiny_hetero, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [7]], 20, stop_tokens=[])
    static(tiny_hetero, [[9] * 11, [1, 2], [3] * 16, [4] * 5], 5, stop_tokens=[5], temperature=0.0)
    assert dict(TRACES) == before


def test_matches_transformers_generate(tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tiny_llama.save_hf(tmp_path, format="llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    free = static(tiny_llama, PROMPTS, NEW, stop_tokens=[])
    eos = free[1][5]  # a token greedy decoding really produces, so stopping is exercised
    ours = static(tiny_llama, PROMPTS, NEW, stop_tokens=[eos])
    for p, o in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert o == ref[0, len(p):].tolist()
    assert any(o[-1] == eos and len(o) < NEW for o in ours)


def test_top_p_zero_is_greedy_and_seeds_are_deterministic(tiny_hetero, greedy_hetero):
    outs, _ = greedy_hetero
    assert static(tiny_hetero, PROMPTS, NEW, temperature=1.0, top_p=1e-9, stop_tokens=[], seed=3) == outs
    a = static(tiny_hetero, PROMPTS, NEW, temperature=1.0, top_p=0.9, top_k=50, stop_tokens=[], seed=7)
    b = static(tiny_hetero, PROMPTS, NEW, temperature=1.0, top_p=0.9, top_k=50, stop_tokens=[], seed=7)
    c = static(tiny_hetero, PROMPTS, NEW, temperature=1.0, top_p=0.9, top_k=50, stop_tokens=[], seed=8)
    assert a == b and a != c


def test_sampled_frequencies_match_softmax(tiny_hetero, temperature=0.7, top_k=0):
    """4096 rows x 1 token from one prompt: a chi-square test against the softmax at temperature."""
    scipy_stats = pytest.importorskip("scipy.stats")
    prompt = [1, 17, 99, 250]
    rows = 4096
    out = static(tiny_hetero, [prompt] * rows, 1, temperature=temperature, top_k=top_k, stop_tokens=[], seed=0,
                               cache_len=16)
    counts = np.bincount([o[0] for o in out], minlength=tiny_hetero.config.vocab_size)
    logits = tiny_hetero.logits([prompt])[0, -1] / temperature
    if top_k:
        logits = np.where(logits >= np.sort(logits)[-top_k], logits, -np.inf)
    probs = np.exp(log_softmax(logits))
    assert counts[probs == 0].sum() == 0
    expected = probs * rows
    big = expected >= 5  # pool the rare tokens into one bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert scipy_stats.chisquare(obs[keep], exp[keep]).pvalue > 1e-3


def test_truncation_unit():
    import jax
    import jax.numpy as jnp

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    params, greedy, truncate = make_params(1.0, 0, 0.7)
    assert not greedy and truncate
    truncate_fn = jax.jit(truncate_logits)
    kept = np.isfinite(np.asarray(truncate_fn(logits, params.top_k, params.top_p)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    params, _, _ = make_params(1.0, 3, 1.0)
    assert np.isfinite(np.asarray(truncate_fn(logits, params.top_k, params.top_p))).sum() == 3
    keys = jax.random.split(jax.random.key(0), 2000)
    params, _, _ = make_params(1.0, 0, 0.7)
    draws = jax.jit(sample, static_argnames=("greedy", "truncate"))(
        jnp.tile(logits, (2000, 1)), keys, params, greedy=False, truncate=True)
    freq = np.bincount(np.asarray(draws), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.04)


def test_cache_bytes_follow_the_architecture(tiny_hetero):
    cfg = tiny_hetero.config
    cache = tiny_hetero.module.init_cache(2, 64, "float32")
    gqa = [b.attention.num_kv_heads for b in cfg.blocks if b.attention.kind == "gqa"]
    assert len([c for c in cache if c is not None]) == len(gqa)
    assert cache_bytes(cache) == sum(2 * 2 * 64 * k * cfg.head_dim * 4 for k in gqa)
    assert cache_bytes(cache) == 2 * 64 * cfg.kv_cache_bytes_per_token("float32")
    assert cache_bytes(tiny_hetero.module.init_cache(2, 64, "bfloat16")) == cache_bytes(cache) // 2
    assert abstract_cache_bytes(tiny_hetero.module, 2, 64, "float32") == cache_bytes(cache)


def test_removing_half_the_attention_halves_the_cache(tiny_llama):
    cfg = tiny_llama.config
    blocks = [b if i % 2 else nj.BlockConfig(nj.AttentionConfig("none"), b.ffn) for i, b in enumerate(cfg.blocks)]
    pruned = cfg.replace(blocks=tuple(blocks))
    full = abstract_cache_bytes(tiny_llama.module, 8, 1024)
    from nemotron_jax.model.params import abstract_model
    from nemotron_jax.model.transformer import Policy

    half = abstract_cache_bytes(abstract_model(pruned, Policy()), 8, 1024)
    assert half * 2 == full


def test_clear_errors_before_any_work(tiny_hetero):
    limit = tiny_hetero.config.max_position_embeddings
    before = dict(TRACES)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        static(tiny_hetero, [[1] * 10], limit - 5)
    with pytest.raises(ValueError, match="cache_len"):
        static(tiny_hetero, [[1] * 10], 60, cache_len=64)
    for bad in ([], [[]], [[1, 512]], "abc"):
        with pytest.raises(ValueError):
            static(tiny_hetero, bad, 4)
    with pytest.raises(ValueError, match="temperature"):
        static(tiny_hetero, [[1]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="cache_dtype"):
        static(tiny_hetero, [[1]], 4, cache_dtype="int8")
    with pytest.raises(ValueError, match="think_tokens"):
        static(tiny_hetero, [[1]], 4, max_thinking_tokens=3)
    assert dict(TRACES) == before
    assert static(tiny_hetero, [[1], [2, 3]], 0) == [[], []]


def test_bfloat16_cache_stays_close(tiny_hetero, greedy_hetero):
    outs, logprobs = greedy_hetero
    # One token: prefill alone writes the bf16 cache and attends through it (as decode does).
    got, got_lp = static(tiny_hetero, PROMPTS, 1, stop_tokens=[], cache_dtype="bfloat16", return_logprobs=True)
    assert [o[0] for o in got] == [o[0] for o in outs]
    np.testing.assert_allclose([lp[0] for lp in got_lp], [lp[0] for lp in logprobs], atol=0.05)


def test_max_thinking_tokens_forces_the_close_marker(tiny_hetero, greedy_hetero):
    outs, _ = greedy_hetero
    row = 2  # short prompt (continuations stay in the 16-token prompt bucket), varied greedy output
    g, prompt = outs[row], PROMPTS[row]
    opener = next(t for k, t in enumerate(g[1:5], 1) if t not in g[:k])
    k_open = g.index(opener)
    unused = [t for t in range(10, 512) if t not in g][:2]
    budget = 3
    spec = ThinkTokens.exact([opener], unused)
    prompts = [prompt, prompt + g[:k_open + 1], PROMPTS[0]]
    got = static(tiny_hetero, prompts, NEW, stop_tokens=[], max_thinking_tokens=budget, think_tokens=spec)
    # Row 0: thinks for `budget` tokens after the opener, then the close marker is forced.
    cut = k_open + 1 + budget
    assert got[0][:cut] == g[:cut]
    assert got[0][cut:cut + 2] == unused
    cont = static(tiny_hetero, [prompt + got[0][:cut + 2]] * 3, NEW - cut - 2, stop_tokens=[])[0]
    assert got[0][cut + 2:] == cont  # then decoding simply continues
    # Row 1: the prompt already ends inside the think block.
    assert got[1][budget:budget + 2] == unused and got[1][:budget] == g[k_open + 1:cut]
    # A close marker the model writes itself ends the block: nothing is forced.
    natural = ThinkTokens.exact([opener], g[k_open + 1:k_open + 3])
    got = static(tiny_hetero, PROMPTS, NEW, stop_tokens=[], max_thinking_tokens=2, think_tokens=natural)
    assert got[row] == g


def test_think_state_machine_accepts_alternative_spellings():
    """Byte-level BPE spells `</think>\\n\\n` with a different last token than `</think>`: detection
    accepts any listed alternative, while the forced sequence is the canonical one."""
    import jax
    import jax.numpy as jnp

    from nemotron_jax.sampling import think

    spec = ThinkTokens(open=((10,), (11,), (12, 13)), close=((20, 21), (22,), (23, 24)))
    arrays = spec.arrays()
    step = jax.jit(think.advance)
    window = jnp.asarray(think.prompt_window([[1, 10, 11], [1, 2]], 2, spec.window))
    state = think.init_state(window, arrays)
    assert state.phase_B.tolist() == [think.BEFORE, think.BEFORE]
    phases = []
    for row0, row1 in [(13, 10), (5, 11), (21, 12), (22, 5), (24, 6), (7, 7)]:
        state = step(state, jnp.array([row0, row1]), jnp.int32(100), arrays)
        phases.append(state.phase_B.tolist())
    # Row 0 opens with the alternative last token 13, closes with " </" (21) ... ">\n\n" (24).
    assert [p[0] for p in phases] == [1, 1, 1, 1, 2, 2]
    assert [p[1] for p in phases] == [0, 0, 1, 1, 1, 1]
    assert state.count_B.tolist() == [3, 3]
    # Budget reached: the canonical close ids are forced, then the block is over.
    state = step(state, jnp.array([0, 8]), jnp.int32(4), arrays)
    forced = []
    for _ in range(3):
        token = think.choose(state, jnp.array([99, 99]), arrays)
        forced.append(int(token[1]))
        state = step(state, token, jnp.int32(4), arrays)
    assert forced == list(spec.close_ids) == [20, 22, 23]
    assert state.phase_B.tolist() == [2, 2] and state.force_B.tolist() == [-1, -1]
