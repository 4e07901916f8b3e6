"""`nemotron-jax generate` / `chat` on the tiny preset with the built-in tiny tokenizer.

Prompts are long enough (33..64 tokens) that every call here shares one compiled program
(batch 1, prompt bucket 64, cache bucket 64).
"""

import io

import pytest

import nemotron_jax as nj
from nemotron_jax.cli import main

LONG = "Tom has 12 apples and buys 7 more. How many apples does he have now?"


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_the_greedy_response(capsys, tiny_llama):
    tok = nj.Tokenizer.tiny()
    code, out, err = run(capsys, "generate", "tiny-llama", "--tokenizer", "tiny", "--prompt", LONG,
                         "--thinking", "off", "--max-new-tokens", "12", "--chunk", "5")
    assert code == 0 and "random weights" in err and "tokens in" in err
    ids = tok.apply_chat_template([{"role": "user", "content": LONG}], thinking=False)
    assert 32 < len(ids) <= 52
    stop = sorted(set(tok.eos_ids) | set(tiny_llama.config.eos_token_ids))
    new = static(tiny_llama, ids, 12, stop)
    assert out == tok.decode([t for t in new if t not in stop], skip_special_tokens=True) + "\n"


def static(model, ids, new, stop):
    """The static sampler's greedy tokens: an independent check of the engine the CLI runs on."""
    from nemotron_jax.sampling import generate

    return generate(*model.split(), [ids], new, stop_tokens=stop).tokens[0]


def test_generate_quantized_weights(capsys, tiny_llama):
    tok = nj.Tokenizer.tiny()
    code, out, err = run(capsys, "generate", "tiny-llama", "--prompt", LONG, "--thinking", "off",
                         "--max-new-tokens", "8", "--chunk", "5", "--quantize", "int8")
    assert code == 0, err
    ids = tok.apply_chat_template([{"role": "user", "content": LONG}], thinking=False)
    stop = sorted(set(tok.eos_ids) | set(tiny_llama.config.eos_token_ids))
    new = static(tiny_llama.quantize("int8"), ids, 8, stop)
    assert out == tok.decode([t for t in new if t not in stop], skip_special_tokens=True) + "\n"


def test_chat_multi_turn_with_think_toggle(capsys, monkeypatch, tiny_llama):
    monkeypatch.setattr("nemotron_jax.cli.generate_commands.load_model", lambda *args: tiny_llama)  # skip init
    lines = [LONG, "/think on", "/bogus", "Now 3 more?", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run(capsys, "chat", "tiny-llama", "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0, err
    assert "[reasoning on]" in err and "unknown command /bogus" in err
    assert err.count("tokens in") == 2  # two responses, then /exit
    tok = nj.Tokenizer.tiny()
    ids = tok.apply_chat_template([{"role": "user", "content": LONG}])
    first = tiny_llama.generate([ids], 6, stop_tokens=[2, 3])[0]
    assert out.startswith("> " + tok.decode([t for t in first if t not in (2, 3)], skip_special_tokens=True) + "\n> ")
    assert out.count("> ") >= 5  # one prompt per line read, up to /exit


@pytest.mark.parametrize("argv,message", [
    (["generate", "no-such-model", "--prompt", "x"], "not a model directory or a preset"),
    (["generate", "tiny-llama", "--tokenizer", "/nonexistent/tok", "--prompt", "x"], "no tokenizer.json"),
    (["generate", "tiny-llama", "--prompt", "x", "--max-new-tokens", "4000"], "max_position_embeddings"),
    (["generate", "tiny-llama", "--prompt", "x", "--top-p", "2"], "top_p"),
    (["chat", "tiny-llama", "--tokenizer", "/nonexistent/tok"], "no tokenizer.json"),
    (["generate", "tiny-llama", "--prompt", "x", "--adapters", "/nonexistent/adapter"], "not a directory"),
])
def test_errors_are_one_line_and_exit_nonzero(capsys, monkeypatch, argv, message):
    def no_weights(*args):
        raise AssertionError("the error should come before any weights are loaded")

    monkeypatch.setattr("nemotron_jax.cli.generate_commands.load_model", no_weights)
    code, _, err = run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and message in lines[0]
