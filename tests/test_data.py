"""Data: sources and their errors, chat/GSM8K rendering and loss masks, packing, the pipeline."""

import json

import jax
import numpy as np
import pytest

from nemotron_jax.data import DataConfig, DataError, DataPipeline, Example, ExampleFormat, make_example, pack
from nemotron_jax.data.examples import gsm8k_answer, messages_for
from nemotron_jax.data.sources import open_source, skip_summary
from nemotron_jax.data.synthetic import gsm8k_records, write_jsonl
from nemotron_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- sources
def test_bad_json_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "a.jsonl", ['{"text": "ok"}', "", '{"text": broken', '{"text": "fine"}'])
    with pytest.raises(DataError, match=r"a\.jsonl:3: not valid JSON"):
        open_source(str(f))


def test_bad_record_names_line_and_skip_mode_summarises(tmp_path):
    fmt = ExampleFormat(kind="gsm8k")
    from nemotron_jax.data.examples import checker

    lines = ['{"question": "q", "answer": "a\\n#### 1"}', '{"question": "q"}', "[1, 2]", "nope",
             '{"question": "q", "answer": "no final"}', '{"question": "q2", "answer": "b\\n#### 2"}']
    f = _write(tmp_path / "g.jsonl", lines)
    with pytest.raises(DataError, match=r"g\.jsonl:2: missing field 'answer'"):
        open_source(str(f), check=checker(fmt))
    source = open_source(str(f), on_error="skip", check=checker(fmt))
    assert len(source) == 2 and source.total == 6 and source.skips.count == 4
    summary = skip_summary(source)
    assert summary.startswith("skipped 4 of 6 records") and "g.jsonl:3" in summary and "g.jsonl:5" in summary
    assert [source[i]["answer"][-1] for i in range(2)] == ["1", "2"]


def test_empty_and_missing_data_are_clear_errors(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable records"):
        open_source(str(empty))
    with pytest.raises(DataError, match="no such data file"):
        open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data file type"):
        open_source(str(_write(tmp_path / "x.csv", ["a,b"])))
    all_bad = _write(tmp_path / "bad.jsonl", ["{", "}"])
    with pytest.raises(DataError, match=r"no usable records \(2 bad records skipped\)"):
        open_source(str(all_bad), on_error="skip")


def test_globs_concatenate_and_parquet_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write(tmp_path / "p1.jsonl", ['{"text": "a"}', '{"text": "b"}'])
    _write(tmp_path / "p2.jsonl", ['{"text": "c"}'])
    source = open_source(str(tmp_path / "p*.jsonl"))
    assert [source[i]["text"] for i in range(len(source))] == ["a", "b", "c"]
    pq.write_table(pa.table({"text": ["x", "y"], "n": [1, 2]}), tmp_path / "t.parquet")
    source = open_source(f"{tmp_path / 't.parquet'},{tmp_path / 'p2.jsonl'}")
    assert [source[i]["text"] for i in range(len(source))] == ["x", "y", "c"] and source[1]["n"] == 2


def test_tfds_without_tensorflow_datasets_is_a_clear_error():
    try:
        import tensorflow_datasets  # noqa: F401
        pytest.skip("tensorflow_datasets is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match="needs tensorflow_datasets"):
        open_source("tfds:gsm8k:train")


# ---------------------------------------------------------------- examples and loss masks
def _target_text(tok, example):
    return tok.decode(example.tokens[example.loss_mask])


def test_post_training_schema_masks_exactly_the_assistant_output(tok):
    record = {"input": [{"role": "user", "content": "Add 2 and 3."}], "output": "<think>2+3=5</think>5",
              "reasoning": "on", "system_prompt": "detailed thinking on", "category": "math"}
    ex = make_example(tok, ExampleFormat(), record)
    text = tok.decode(ex.tokens)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on")
    assert _target_text(tok, ex) == "<think>2+3=5</think>5<|eot_id|>"
    # a string `input` (early dataset versions) and reasoning off
    off = make_example(tok, ExampleFormat(), {"input": "Add 2 and 3.", "output": "5", "reasoning": "off"})
    assert "detailed thinking off" in tok.decode(off.tokens) and _target_text(tok, off) == "5<|eot_id|>"


def test_multi_turn_chat_masks_every_assistant_turn(tok):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    ex = make_example(tok, ExampleFormat(), record)
    assert _target_text(tok, ex) == "hello<|eot_id|>ciao<|eot_id|>"
    assert ex.loss_mask.sum() < len(ex.tokens) / 2


def test_gsm8k_reasoning_toggle(tok):
    record = {"question": "How many?", "answer": "Add them: 2+3 = <<2+3=5>>5.\n#### 5"}
    assert gsm8k_answer(record["answer"], True) == "<think>Add them: 2+3 = 5.</think>The answer is 5."
    assert gsm8k_answer(record["answer"], False) == "The answer is 5."
    # auto: even record index -> on, odd -> off, unless the record says which
    on, off = messages_for(ExampleFormat(), record, 0), messages_for(ExampleFormat(), record, 1)
    assert on[0]["content"] == "detailed thinking on" and on[-1]["content"].startswith("<think>")
    assert off[0]["content"] == "detailed thinking off" and off[-1]["content"] == "The answer is 5."
    assert messages_for(ExampleFormat(), {**record, "reasoning": "off"}, 0)[0]["content"] == "detailed thinking off"
    assert messages_for(ExampleFormat(reasoning="on"), record, 1)[0]["content"] == "detailed thinking on"
    ex = make_example(tok, ExampleFormat(), record, 1)
    assert _target_text(tok, ex) == "The answer is 5.<|eot_id|>"


def test_reasoning_on_requires_think_tags():
    with pytest.raises(ValueError, match="no <think>"):
        messages_for(ExampleFormat(reasoning="on"), {"input": "q", "output": "plain"})


def test_real_gsm8k_renders(shared_data, tok):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:20]
    for i, line in enumerate(lines):
        ex = make_example(tok, ExampleFormat(), json.loads(line), i)
        target = _target_text(tok, ex)
        assert target.endswith(".<|eot_id|>") and "The answer is" in target
        assert ("<think>" in target) == (i % 2 == 0) and "<<" not in target


# ---------------------------------------------------------------- packing
def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(4, 500, n).astype(np.int32), rng.uniform(size=n) < 0.7) for n in lengths]


def test_pack_layout_positions_segments_and_targets():
    examples = _examples([5, 9, 3, 12, 7, 4])
    rows, stats = pack(examples, seq_len=16)
    seen = []
    for row in rows:
        seg = row["segment_ids"]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            assert np.array_equal(row["positions"][idx], np.arange(len(idx)))  # restart at 0
            seen.append((tuple(row["inputs"][idx]), tuple(row["targets"][idx]), tuple(row["weights"][idx])))
        pad = seg == 0
        assert not row["weights"][pad].any() and not row["inputs"][pad].any()
    expected = [(tuple(e.tokens[:-1]), tuple(e.tokens[1:]), tuple(e.loss_mask[1:].astype(np.float32)))
                for e in examples if e.loss_mask[1:].any()]
    assert sorted(seen) == sorted(expected)
    assert stats.tokens == sum(len(e.tokens) - 1 for e in examples if e.loss_mask[1:].any())
    assert stats.efficiency == stats.tokens / (len(rows) * 16)


def test_pack_truncates_long_and_drops_maskless_examples():
    long = Example(np.arange(30, dtype=np.int32), np.ones(30, bool))
    maskless = Example(np.arange(6, dtype=np.int32), np.zeros(6, bool))
    rows, stats = pack([long, maskless], seq_len=8)
    assert stats.truncated == 1 and stats.dropped == 1 and len(rows) == 1
    assert np.array_equal(rows[0]["inputs"], np.arange(8)) and np.array_equal(rows[0]["targets"], np.arange(1, 9))


def test_packed_row_logits_equal_each_example_alone(tiny_hetero):
    examples = _examples([6, 11, 4, 9], seed=1)
    rows, _ = pack(examples, seq_len=32)
    assert len(rows) == 1
    row = rows[0]
    packed = tiny_hetero.logits(row["inputs"][None], row["positions"][None], row["segment_ids"][None])[0]
    for s in range(1, 5):
        idx = np.flatnonzero(row["segment_ids"] == s)
        alone = tiny_hetero.logits(row["inputs"][idx][None])[0]
        np.testing.assert_allclose(packed[idx], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "gsm.jsonl", gsm8k_records(40, seed=1))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(u, v) for x, y in zip(a, b, strict=True)
               for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


def test_pipeline_is_deterministic_by_seed_and_resumes_exactly(tok, gsm_file):
    cfg = DataConfig(path=str(gsm_file), seq_len=128, batch_size=2, pack_window=8)
    p = DataPipeline(cfg, tok, seed=3)
    it = p.train_iterator()
    first = _take(it, 3)
    state = it.get_state()
    rest = _take(it, 6)  # crosses windows and the end of an epoch
    assert _same(first, _take(DataPipeline(cfg, tok, seed=3).train_iterator(), 3))
    assert _same(rest, _take(p.train_iterator(state), 6))
    assert not _same(first, _take(DataPipeline(cfg, tok, seed=4).train_iterator(), 3))
    batch = first[0]
    assert batch.inputs.shape == (2, 128) and batch.weights.dtype == np.float32
    assert 0.5 < DataPipeline.packing_stats(it).efficiency <= 1.0


def _train_questions(pipeline, tok, batches):
    texts = set()
    it = pipeline.train_iterator()
    for batch in _take(it, batches):
        for row_inputs, row_seg in zip(batch.inputs, batch.segment_ids, strict=True):
            for s in np.unique(row_seg[row_seg > 0]):
                texts.add(tok.decode(row_inputs[row_seg == s]).split("user<|end_header_id|>\n\n")[1][:40])
    return texts


def test_host_shards_are_disjoint_and_eval_is_held_out(tok, gsm_file):
    cfg = DataConfig(path=str(gsm_file), seq_len=256, batch_size=4, pack_window=16, eval_examples=4, shuffle=False)
    shards = [DataPipeline(cfg, tok, seed=0, shard_index=i, shard_count=2) for i in range(2)]
    assert shards[0].rows == 2
    seen = [_train_questions(p, tok, 4) for p in shards]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    held_out = {r["question"][:40] for r in gsm8k_records(40, seed=1)[:4]}
    assert not held_out & (seen[0] | seen[1])
    eval_batches = shards[0].eval_batches()
    assert eval_batches and eval_batches[0].inputs.shape == (2, 256)
    with pytest.raises(DataError, match="leaves no training records"):
        DataPipeline(DataConfig(path=str(gsm_file), eval_examples=40), tok, seed=0)


def test_synthetic_tasks_hold_out_a_test_split_and_sloppy_teachers_err_only_at_the_end():
    from nemotron_jax import rewards
    from nemotron_jax.data import arith

    for make in (arith.arith_records, arith.chain_records):
        train = {r["question"] for r in make(3000, seed=0)}
        test = {r["question"] for r in make(200, seed=1, split="test")}
        assert train and test and not train & test
    # The split is a hash of the whole problem: every ones-column digit pair still occurs in
    # training (a split on the ones digits would hide whole steps from the student).
    ones = {tuple(int(x) % 10 for x in q[len("What is "):-1].split(" + ")) for q in
            (r["question"] for r in arith.arith_records(3000, seed=0))}
    assert len(ones) == 100
    sloppy = arith.sloppy_chain_records(600, seed=2)
    wrong = {"on": [], "off": []}
    for r in sloppy:
        xs = [int(x) for x in r["question"][len("What is "):-1].split(" + ")]
        steps = r["answer"].split("####")[0].strip().splitlines()
        assert steps == [f"{sum(xs[:i + 1])} + {xs[i + 1]} = {sum(xs[:i + 2])}" for i in range(len(xs) - 1)]
        final = int(rewards.ground_truth(r["answer"]))
        assert final in (sum(xs), xs[0] + xs[1])  # the right total, or the habit: the first running sum
        wrong[r["reasoning"]].append(final != sum(xs))
    assert not any(wrong["off"])  # the teacher errs only when it thinks
    assert 0.5 < sum(wrong["on"]) / len(wrong["on"]) < 0.7  # 60 %
