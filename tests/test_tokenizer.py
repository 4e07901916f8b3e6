"""The chat template (SPEC §3) against hand-rendered strings encoded by two independent tokenizers.

The expected prompt strings below are written out by hand from SPEC §3, then encoded with the
`tokenizers` library directly and with transformers' `PreTrainedTokenizerFast`; our
`apply_chat_template` must give exactly those ids.
"""

import json
from pathlib import Path

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


# ---------------------------------------------------------------- chat templates from the tokenizer (jinja)
# Each is checked against transformers' own `apply_chat_template` on the same files.
from nemotron_jax.tokenizer import NEMOTRON_V1_TEMPLATE  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": " Hello there!\n\n"}],
    [{"role": "system", "content": " You are terse. "}, *HISTORY],
    [*HISTORY, {"role": "assistant", "content": "<think>\nSix.\n</think>\n\nIt is 6 😀."}],
    [{"role": "user", "content": "Füße < 3 & \"quoted\"\ttab"}, {"role": "assistant", "content": "no think"},
     {"role": "user", "content": "  "}],
]

# In the style of Llama-3.3-Nemotron-Super-49B-v1.5: the toggle is `/think` | `/no_think` in the system
# prompt (stripped from what is rendered), reasoning off pre-fills an empty think block. Some blocks
# deliberately lack `-` so that trim_blocks / lstrip_blocks matter; tojson and strftime_now are used.
SLASH_TEMPLATE = """{%- set ns = namespace(enable_thinking=true) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' and '/no_think' in message['content'] -%}
    {%- set ns.enable_thinking = false -%}
  {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'].replace('/no_think', '').replace('/think', '') | trim -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' -}}
{% for message in turns %}
    {% if message['role'] == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | tojson + '<|eot_id|>' }}
    {% elif message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% else %}
        {% set content = message['content'] %}
        {% if message['role'] == 'assistant' and '</think>' in content %}
            {% set content = content.split('</think>')[-1].lstrip() %}
        {% endif %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>' }}
    {% endif %}
{% endfor %}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
  {%- if not ns.enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
{%- if strftime_now('%Y') < '2000' -%}{{ raise_exception('clock') }}{%- endif -%}"""

# A template switched by a variable (the `enable_thinking` convention), with `{% generation %}` blocks.
FLAG_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think></think>' }}{% endif %}{% endif %}")


def tokenizer_dir(path, template, source=None):
    """A copy of the tiny tokenizer (or `source`) whose tokenizer_config.json carries `template`."""
    from nemotron_jax.presets import configs_dir

    source = source or configs_dir() / "tokenizers" / "tiny"
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text((source / "tokenizer.json").read_text())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def hf_ids(hf, messages, add_generation_prompt=True, **kw):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_v1_template_in_jinja_is_the_builtin_one(tmp_path):
    """NEMOTRON_V1_TEMPLATE renders what the built-in v1 code writes, and transformers agrees."""
    transformers = pytest.importorskip("transformers")
    builtin = Tokenizer.tiny()
    jinja = Tokenizer.from_file("tiny", chat_template=NEMOTRON_V1_TEMPLATE)
    assert builtin.toggle == jinja.toggle == "system" and builtin.chat_template == NEMOTRON_V1_TEMPLATE
    builtin.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert Tokenizer.from_file(tmp_path / "tok")._template is None  # reads back as the built-in
    for messages in CONVERSATIONS:
        for thinking in (None, True, False):
            if thinking is not None and messages[0]["role"] == "system":
                continue
            for gen in (True, False):
                text = builtin.render_chat(messages, thinking, gen)[0]
                assert jinja.render_chat(messages, thinking, gen)[0] == text
                ids = builtin.apply_chat_template(messages, thinking, gen)
                system = [] if thinking is None else [{"role": "system",
                                                       "content": f"detailed thinking {'on' if thinking else 'off'}"}]
                assert hf_ids(hf, [*system, *messages], gen) == ids
                assert jinja.apply_chat_template(messages, thinking, gen) == ids


def test_llama31_template_ids_equal_transformers(llama):
    transformers = pytest.importorskip("transformers")
    path = Path(llama.name).parent
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_file(path, chat_template="file")
    assert llama.toggle == "system" and llama.chat_template == NEMOTRON_V1_TEMPLATE  # auto: no toggle there
    assert ours.toggle is None and ours.chat_template == hf.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == hf_ids(hf, messages, gen)
    with pytest.raises(ValueError, match="no reasoning toggle"):
        ours.apply_chat_template(CONVERSATIONS[0], thinking=True)


def test_nemotron_slash_template_ids_equal_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tokenizer_dir(tmp_path / "tok", SLASH_TEMPLATE)
    ours, hf = Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.toggle == "slash" and ours.chat_template == SLASH_TEMPLATE  # auto: the file's template
    tool = [{"role": "user", "content": "x"}, {"role": "tool", "content": 'é <"json">'}]
    for messages in [*CONVERSATIONS, tool]:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == hf_ids(hf, messages, gen)
            if messages[0]["role"] == "system":
                continue
            for thinking, word in ((True, "/think"), (False, "/no_think")):
                expected = hf_ids(hf, [{"role": "system", "content": word}, *messages], gen)
                assert ours.apply_chat_template(messages, thinking, gen) == expected
    off = ours.decode(ours.apply_chat_template(CONVERSATIONS[0], thinking=False))
    assert off.endswith("<|end_header_id|>\n\n<think>\n\n</think>\n\n") and "/no_think" not in off
    with pytest.raises(ValueError, match="either"):
        ours.apply_chat_template(CONVERSATIONS[1], thinking=True)
    with pytest.raises(ValueError, match="unknown role"):  # raise_exception reaches the caller as ValueError
        ours.apply_chat_template([{"role": "critic", "content": "x"}])


def test_flag_template_and_its_loss_mask_equal_transformers(tmp_path):
    """`thinking=` becomes `enable_thinking`; encode_chat's mask equals transformers' assistant mask
    from the template's `{% generation %}` blocks."""
    transformers = pytest.importorskip("transformers")
    path = tokenizer_dir(tmp_path / "tok", FLAG_TEMPLATE)
    ours, hf = Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.toggle == "flag"
    messages = CONVERSATIONS[2]
    for thinking in (True, False):
        assert ours.apply_chat_template(messages[:3], thinking) == hf_ids(hf, messages[:3], enable_thinking=thinking)
    assert ours.apply_chat_template(messages[:3]) == hf_ids(hf, messages[:3])
    ids, mask = ours.encode_chat(messages)
    ref = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"]) and [int(m) for m in mask] == list(ref["assistant_masks"])
    assert sum(mask) > 0


def test_chat_template_sources_and_errors(tmp_path):
    path = tokenizer_dir(tmp_path / "tok", [{"name": "tool_use", "template": "{{ 'x' }}"},
                                            {"name": "default", "template": SLASH_TEMPLATE}])
    assert Tokenizer.from_file(path).toggle == "slash"  # the default of transformers' named templates
    (path / "chat_template.jinja").write_text(FLAG_TEMPLATE)  # transformers' newer file wins over the key
    assert Tokenizer.from_file(path).toggle == "flag"
    assert Tokenizer.from_file(path, chat_template="v1").chat_template == NEMOTRON_V1_TEMPLATE
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(ValueError, match=r"tokenizer\.json: the chat template is not valid jinja"):
        Tokenizer.from_file(path)
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_file("tiny", chat_template="file")
    with pytest.raises(ValueError, match="'auto', 'v1', 'file'"):
        Tokenizer.from_file("tiny", chat_template="v2")
    bad = tokenizer_dir(tmp_path / "bad", 42)
    with pytest.raises(ValueError, match="chat_template must be a string"):
        Tokenizer.from_file(bad)
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_file(bad)
    # a template that re-renders an earlier assistant turn once later turns follow has no mask for it
    last_keeps_thinking = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                           "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}"
                           "{% endfor %}{#- /no_think -#}")
    tok = Tokenizer.from_file("tiny", chat_template=last_keeps_thinking)
    assert tok.encode_chat(CONVERSATIONS[2][:2])[1].count(True) > 0
    with pytest.raises(ValueError, match="loss mask is ambiguous"):
        tok.encode_chat(CONVERSATIONS[2])
