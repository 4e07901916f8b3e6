"""`nemotron-jax eval`: reasoning rows per mode, sharded evaluation equal to single-device, loss."""

import json

import pytest

import nemotron_jax as nj
from nemotron_jax.cli import main
from nemotron_jax.data.synthetic import gsm8k_records
from nemotron_jax.eval.perplexity import evaluate_loss
from nemotron_jax.eval.reasoning import evaluate_reasoning
from nemotron_jax.sharding import MeshConfig


@pytest.fixture(scope="module")
def tokenizer():
    return nj.Tokenizer.tiny()


def test_sharded_eval_equals_single_device(tiny_hetero, tokenizer):
    records = gsm8k_records(4, seed=1)
    sharded = nj.init(tiny_hetero.config, seed=0, layout=MeshConfig(data=4, fsdp=2, rules="fsdp").layout())
    for thinking in (True, False):
        kw = {"thinking": thinking, "max_new_tokens": 8, "batch_size": 4, "temperature": 0.0, "progress": False}
        one, many = evaluate_reasoning(tiny_hetero, tokenizer, records, **kw), evaluate_reasoning(
            sharded, tokenizer, records, **kw)
        assert (one.accuracy, one.format_rate, one.mean_response_tokens) == (
            many.accuracy, many.format_rate, many.mean_response_tokens)
        assert one.mode == ("on" if thinking else "off") and one.examples == 4
        assert one.kv_cache_bytes_per_token == tiny_hetero.config.kv_cache_bytes_per_token("bfloat16")


def test_loss_of_a_model_on_text(tiny_hetero, tokenizer):
    records = [{"text": "one two three four five six"}, {"text": "7 + 8 = 15"}]
    out = evaluate_loss(tiny_hetero, tokenizer, records, seq_len=32, batch_size=2, progress=False)
    n_tokens = sum(len(tokenizer.encode(r["text"])) + 1 for r in records)  # + end-of-text, BOS is not a target
    assert out["tokens"] == n_tokens
    assert 4.0 < out["loss"] < 9.0  # an untrained model sits near log(vocab) = 6.2


def test_cli_writes_rows_per_mode(tmp_path, tiny_hetero, capsys):
    tiny_hetero.save(tmp_path / "model")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records(2)))
    code = main(["eval", str(tmp_path / "model"), "--data", str(data), "--tokenizer", "tiny", "--json",
                 "--max-new-tokens", "4", "--output", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["rows"]] == ["on", "off"]
    assert {"accuracy", "format_rate", "tokens_per_s", "params"} <= set(report["rows"][0])
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "nope.jsonl"), "--tokenizer", "tiny"]) == 2


def test_cli_evaluates_a_synthetic_tasks_held_out_problems(tmp_path, tiny_hetero, capsys):
    tiny_hetero.save(tmp_path / "model")
    args = ["eval", str(tmp_path / "model"), "--tokenizer", "tiny", "--json", "--max-new-tokens", "4",
            "--thinking", "off", "--limit", "3"]
    assert main([*args, "--data", "synthetic:arith"]) == 0
    assert [r["examples"] for r in json.loads(capsys.readouterr().out)["rows"]] == [3]
    assert main([*args, "--data", "synthetic:text"]) == 2  # no held-out split
    assert "synthetic:arith" in capsys.readouterr().err
