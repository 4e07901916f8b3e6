"""The chat template (SPEC §3) against hand-rendered strings encoded by two independent tokenizers.

The expected prompt strings below are written out by hand from SPEC §3, then encoded with the
`tokenizers` library directly and with transformers' `PreTrainedTokenizerFast`; our
`apply_chat_template` must give exactly those ids.
"""

import json

import pytest

import nemotron_jax as nj
from nemotron_jax.tokenizer import Tokenizer

SYS = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
TURN = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
GEN = "<|start_header_id|>assistant<|end_header_id|>\n\n"

HISTORY = [
    {"role": "user", "content": "  What is 2 + 2?\n"},
    {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n  It is 4. "},
    {"role": "user", "content": "And 3 + 3? 😀"},
]


@pytest.fixture(scope="module")
def llama(shared_data):
    path = shared_data / "tokenizers" / "llama-3.1"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("Llama-3.1 tokenizer not present")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def references(llama):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    file = llama.name
    raw = tokenizers.Tokenizer.from_file(file)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=file)
    return (lambda s: raw.encode(s, add_special_tokens=False).ids,
            lambda s: fast.encode(s, add_special_tokens=False))


def check(llama, references, messages, expected, **kw):
    ids = llama.apply_chat_template(messages, **kw)
    for encode in references:
        assert ids == encode(expected)
    assert llama.decode(ids) == expected
    return ids


def test_single_turn_exact_ids(llama, references):
    expected = SYS.format("") + TURN.format("user", "Hello there!") + GEN
    ids = check(llama, references, [{"role": "user", "content": " Hello there!\n\n"}], expected)
    assert ids[0] == llama.bos_id == 128000 and ids.count(128006) == 3 and ids.count(128009) == 2
    assert ids[-4:] == [128006, 78191, 128007, 271]  # header + "\n\n" as one token


@pytest.mark.parametrize("thinking,word", [(True, "on"), (False, "off")])
def test_thinking_flag_writes_the_system_prompt(llama, references, thinking, word):
    expected = SYS.format(f"detailed thinking {word}") + TURN.format("user", "Hi") + GEN
    check(llama, references, [{"role": "user", "content": "Hi"}], expected, thinking=thinking)


def test_multi_turn_strips_history_thinking_and_trims(llama, references):
    expected = (SYS.format("You are terse.") + TURN.format("user", "What is 2 + 2?")
                + TURN.format("assistant", "It is 4.") + TURN.format("user", "And 3 + 3? 😀") + GEN)
    check(llama, references, [{"role": "system", "content": " You are terse. "}, *HISTORY], expected)
    no_gen = expected.removesuffix(GEN)
    check(llama, references, [{"role": "system", "content": "You are terse."}, *HISTORY], no_gen,
          add_generation_prompt=False)


def test_system_and_thinking_together_is_an_error(llama):
    with pytest.raises(ValueError, match="either"):
        llama.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                  thinking=True)
    for bad in ("hello", [{"role": "user"}], [{"role": "us<|eot_id|>er", "content": "x"}], [("user", "x")]):
        with pytest.raises(ValueError):
            llama.apply_chat_template(bad)


def test_encode_chat_mask_covers_exactly_assistant_turns(llama, references):
    messages = [*HISTORY, {"role": "assistant", "content": "<think>\nSix, clearly.\n</think>\n\nIt is 6 😀."}]
    ids, mask = llama.encode_chat(messages, thinking=True)
    expected = (SYS.format("detailed thinking on") + TURN.format("user", "What is 2 + 2?")
                + TURN.format("assistant", "It is 4.") + TURN.format("user", "And 3 + 3? 😀")
                + TURN.format("assistant", "<think>\nSix, clearly.\n</think>\n\nIt is 6 😀."))
    for encode in references:
        assert ids == encode(expected)
    assert len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert llama.decode(masked) == "It is 4.<|eot_id|><think>\nSix, clearly.\n</think>\n\nIt is 6 😀.<|eot_id|>"
    # The masked tokens are two contiguous runs, each ending at an <|eot_id|>.
    starts = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
    ends = [k for k in range(len(mask)) if mask[k] and (k == len(mask) - 1 or not mask[k + 1])]
    assert len(starts) == 2 and all(ids[e] == 128009 for e in ends)
    assert all(ids[s - 1] == 271 for s in starts)  # right after the header's "\n\n"


def test_special_ids_and_think_markers(llama):
    assert llama.vocab_size == 128256 and llama.bos_id == 128000
    assert 128009 in llama.eos_ids and 128001 in llama.eos_ids
    assert llama.encode("hi") == llama.encode("hi", add_bos=True)[1:]
    assert llama.decode(llama.think_open_ids) == "<think>" and llama.decode(llama.think_close_ids) == "</think>"
    spec = llama.think_tokens
    assert spec.close_ids == tuple(llama.think_close_ids)
    # "</think>\n\n" ends in the single token ">\n\n", which detection must accept.
    in_context = llama.encode("\n</think>\n\nThe")
    assert in_context[1:3] == llama.think_close_ids[:2] and in_context[3] in spec.close[-1]
    assert llama.encode(" </think>")[0] in spec.close[0]
    assert llama.encode("<think>\nOk")[2] in spec.open[-1]


def test_tiny_tokenizer_is_built_deterministically(tmp_path):
    import importlib.util

    from nemotron_jax.presets import configs_dir

    tok = nj.Tokenizer.tiny()
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_ids == (2, 3) and tok.pad_id == 0
    assert [tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>")] == [4, 5]
    for text in ["<think>\nLet me add: 12 + 7 = 19\n</think>\n\nThe answer is 19.\n#### 19", "Héllo wörld 😀"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "2 * 3 = ?"}], thinking=False)
    assert ids[:2] == [1, 4] and ids.count(2) == 2
    assert tok.decode(ids) == SYS.format("detailed thinking off") + TURN.format("user", "2 * 3 = ?") + GEN
    cfg = nj.preset("tiny-llama")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids)

    script = configs_dir().parent / "scripts" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    committed = configs_dir() / "tokenizers" / "tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((committed / name).read_text())


def test_loading_errors(tmp_path):
    with pytest.raises(OSError):
        Tokenizer.from_file(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError):
        Tokenizer.from_file(tmp_path)
    assert Tokenizer.from_file("tiny").vocab_size == 512
