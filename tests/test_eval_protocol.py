"""The evaluation protocol: pass@k against brute force, maj@k, k samples per problem, resumable
JSONL outputs, shards over hosts and the mesh equal to one run, and the CLI's errors."""

import itertools
import json

import pytest

import nemotron_jax as nj
from nemotron_jax.cli import main
from nemotron_jax.eval import benchmarks, outputs, protocol
from nemotron_jax.sharding import MeshConfig


@pytest.fixture(scope="module")
def tokenizer():
    return nj.Tokenizer.from_file("tiny")


def _brute_pass_at_k(n, c, k):
    draws = list(itertools.combinations(range(n), k))  # samples 0..c-1 are the correct ones
    return sum(any(i < c for i in d) for d in draws) / len(draws)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert protocol.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
    assert protocol.pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError):
        protocol.pass_at_k(3, 4, 1)


def test_majority_vote():
    assert protocol.majority_score(["1", "2", "2", None], [1.0, 0.0, 0.0, 0.0]) == 0.0
    assert protocol.majority_score(["1", "2", "1", None], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert protocol.majority_score(["2", "1"], [0.0, 1.0]) == 0.0  # a tie goes to the answer voted first
    assert protocol.majority_score([None, None], [0.0, 0.0]) == 0.0
    bench = benchmarks.get("gsm8k")
    assert bench.vote_key("72.0", {}) == bench.vote_key("72", {}) == bench.vote_key("$72", {})


def _records():
    return [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8),
                                                                                  (2, 2)]]


RUN = {"samples": 2, "max_new_tokens": 6, "batch_size": 4, "progress": False}


def _key(rows):
    return [(r["index"], [s["response"] for s in r["samples"]], r["pass@1"]) for r in rows]


def test_samples_are_distinct_per_row_and_the_summary_adds_up(tiny_llama, tokenizer):
    bench = benchmarks.get("gsm8k", template="{question}")
    rows, timing = protocol.run(tiny_llama, tokenizer, bench, _records(), True, **RUN)
    assert [r["index"] for r in rows] == list(range(5)) and all(len(r["samples"]) == 2 for r in rows)
    assert any(r["samples"][0]["response"] != r["samples"][1]["response"] for r in rows)  # sampled at 0.6
    assert timing["seconds"] > 0 and timing["tokens"] > 0
    again, _ = protocol.run(tiny_llama, tokenizer, bench, _records(), True, **RUN)
    assert _key(again) == _key(rows)  # seeded: the same problems give the same samples
    summary = protocol.summarize(bench, rows, timing)
    every = [s for r in rows for s in r["samples"]]
    assert summary["samples"] == 2 and summary["examples"] == 5
    assert summary["pass@1"] == pytest.approx(sum(s["score"] for s in every) / len(every))
    assert summary["truncated_rate"] == pytest.approx(sum(s["truncated"] for s in every) / len(every))
    assert summary["mean_response_tokens"] == pytest.approx(sum(s["tokens"] for s in every) / len(every))
    assert set(summary["pass@k"]) == {"1", "2"} and "maj@2" in summary
    assert "| gsm8k | on | 5 | 2 |" in protocol.format_summary([{"model": "m", **summary}])


def test_greedy_off_mode_and_a_system_prompt_beside_the_toggle(tiny_llama, tokenizer):
    bench = benchmarks.get("gsm8k", template="{question}")
    messages, thinking = protocol.prompt_messages(bench, _records()[0], False, "Be brief.")
    assert thinking is None and messages[0] == {"role": "system", "content": "detailed thinking off\nBe brief."}
    rows, _ = protocol.run(tiny_llama, tokenizer, bench, _records()[:2], False, **RUN)
    assert all(r["samples"][0]["response"] == r["samples"][1]["response"] for r in rows)  # greedy


def test_resume_after_a_kill_skips_done_problems(tmp_path, tiny_llama, tokenizer):
    bench = benchmarks.get("gsm8k", template="{question}")
    full, _ = protocol.run(tiny_llama, tokenizer, bench, _records(), True, **RUN)
    out = tmp_path / "out"
    protocol.run(tiny_llama, tokenizer, bench, _records(), True, output_dir=out, **RUN)
    part = outputs.part_path(out, "gsm8k", "on", 0, 1)
    lines = part.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    part.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed while writing problem 2: a torn line
    assert [r["index"] for r in outputs.read_jsonl(part)] == [0, 1]
    resumed, _ = protocol.run(tiny_llama, tokenizer, bench, _records(), True, output_dir=out, **RUN)
    assert _key(resumed) == _key(full)
    on_disk = outputs.read_jsonl(part)
    assert sorted(r["index"] for r in on_disk) == [0, 1, 2, 3, 4]  # each problem once; the torn line ignored
    # A finished run generates nothing more: every batch is skipped.
    again, timing = protocol.run(tiny_llama, tokenizer, bench, _records(), True, output_dir=out, **RUN)
    assert _key(again) == _key(full) and timing["seconds"] == 0.0


def test_host_shards_and_the_mesh_give_the_unsharded_results(tmp_path, tiny_llama, tokenizer):
    bench = benchmarks.get("gsm8k", template="{question}")
    kw = {**RUN, "batch_size": 8}
    records = _records() * 2  # 10 problems, 4 per batch: 3 batches
    one, _ = protocol.run(tiny_llama, tokenizer, bench, records, True, **kw)
    for shard in (1, 0):  # two "hosts", in any order, into one directory
        protocol.run(tiny_llama, tokenizer, bench, records, True, output_dir=tmp_path, shard=shard, num_shards=2, **kw)
    merged = outputs.merge(tmp_path, "gsm8k", "on", range(len(records)))
    assert _key(merged) == _key(one)
    assert outputs.merge(tmp_path, "gsm8k", "on", range(len(records) + 1)) is None  # a missing problem: no merge
    sharded = nj.init(tiny_llama.config, seed=0, layout=MeshConfig(data=8, rules="fsdp").layout())
    on_mesh, _ = protocol.run(sharded, tokenizer, bench, records, True, **kw)
    assert _key(on_mesh) == _key(one)


def test_cli_benchmark_run_writes_responses_and_summary(tmp_path, tiny_llama, capsys):
    tiny_llama.save(tmp_path / "model")
    data = tmp_path / "mcq.jsonl"
    rows = [{"question": f"Pick {x}", "choices": ["w", "x", "y", "z"], "answer": x} for x in "ABCD"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", str(tmp_path / "model"), "--benchmark", "mcq", "--data", str(data), "--tokenizer", "tiny",
            "--samples", "2", "--max-new-tokens", "4", "--max-thinking-tokens", "2", "--batch-size", "4",
            "--system", "Answer briefly.", "--shuffle-choices", "0", "--output", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["benchmark"], r["mode"], r["examples"], r["samples"]) for r in report["rows"]] == [
        ("mcq", "on", 4, 2), ("mcq", "off", 4, 2)]
    assert {"pass@1", "maj@2", "pass@k", "format_rate", "truncated_rate", "tokens_per_s"} <= set(report["rows"][0])
    saved = json.loads((tmp_path / "out" / "mcq.summary.json").read_text())
    assert saved == report
    responses = outputs.read_jsonl(tmp_path / "out" / "mcq.on.responses.jsonl")
    assert [r["index"] for r in responses] == [0, 1, 2, 3]
    assert {"response", "answer", "score", "truncated", "tokens"} <= set(responses[0]["samples"][0])


def test_cli_bad_input_is_one_clear_line(tmp_path, tiny_llama, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "A"}) + "\n"
                   + json.dumps({"question": "q", "answer": "A"}) + "\n")
    base = ["eval", "tiny-llama", "--tokenizer", "tiny", "--benchmark", "mcq"]
    assert main([*base, "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2" in err and "'choices'" in err and len(err.splitlines()) == 1
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base[:-1], "aime", "--data", str(bad)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'aime'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_resumes_after_a_real_kill(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(12)))
    args = ["eval", "tiny-llama", "--benchmark", "gsm8k", "--data", str(data), "--tokenizer", "tiny", "--thinking",
            "on", "--max-new-tokens", "24", "--batch-size", "1", "--json"]
    out = tmp_path / "killed"
    part = outputs.part_path(out, "gsm8k", "on", 0, 1)
    proc = subprocess.Popen([sys.executable, "-m", "nemotron_jax", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(outputs.read_jsonl(part)) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(outputs.read_jsonl(part))
    assert 2 <= done_before < 12, "the run was not killed midway"
    assert main([*args, "--output", str(out)]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert main([*args, "--output", str(tmp_path / "straight")]) == 0
    straight = json.loads(capsys.readouterr().out)
    drop = {"tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["rows"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight["rows"]]
    assert _key(outputs.read_jsonl(outputs.merged_path(out, "gsm8k", "on"))) == _key(
        outputs.read_jsonl(outputs.merged_path(tmp_path / "straight", "gsm8k", "on")))


def test_parquet_records_in_the_benchmarks_own_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nemotron_jax.data.sources import eval_records

    path = tmp_path / "gpqa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Largest planet?", "choices": ["Mars", "Jupiter"],
                                          "answer": 1}]), path)
    bench = benchmarks.get("mcq")
    (record,) = eval_records(str(path), None, 0, check=bench.check)
    assert bench.reference(record) == "B" and bench.score("Answer: B", record, thinking=False) == 1.0
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": 1}]), path)
    with pytest.raises(ValueError, match=r"gpqa.parquet: row 0: mcq record has no 'choices' key"):
        eval_records(str(path), None, 0, check=bench.check)


def test_cli_shards_write_parts_and_the_last_one_merges(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    args = ["eval", "tiny-llama", "--benchmark", "gsm8k", "--data", str(data), "--tokenizer", "tiny", "--thinking",
            "on", "--samples", "2", "--max-new-tokens", "6", "--batch-size", "4", "--json"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*args, "--output", str(tmp_path / "two"), "--shard", "1/2"]) == 0
    assert "waits for the other shards" in capsys.readouterr().err
    assert not outputs.merged_path(tmp_path / "two", "gsm8k", "on").exists()
    assert main([*args, "--output", str(tmp_path / "two"), "--shard", "0/2"]) == 0
    two = json.loads(capsys.readouterr().out)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert drop(two["rows"]) == drop(one["rows"])
    assert _key(outputs.read_jsonl(outputs.merged_path(tmp_path / "two", "gsm8k", "on"))) == _key(
        outputs.read_jsonl(outputs.merged_path(tmp_path / "one", "gsm8k", "on")))
    assert main([*args, "--shard", "2/2"]) == 2
