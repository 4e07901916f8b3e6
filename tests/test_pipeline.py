"""`nemotron-jax pipeline` end to end on minimal settings: every stage runs, the report has a row
per model and mode, the export loads, and a second run redoes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import nemotron_jax as nj
from nemotron_jax.presets import configs_dir

PUZZLE_SMOKE = [
    "parent.model=tiny-llama", "parent.train_steps=4", "data.path=synthetic:arith", "data.synthetic_examples=256",
    "data.eval_examples=8", "data.seq_len=128", "data.batch_size=8", "library.kv_heads=[2, 1]",
    "library.ffn_fractions=[1.0]", "library.calibration_batches=1", "bld.steps=2", "bld.checkpoint_every=2",
    "score.batches=1", "costs.method=analytic", "costs.rounds=1", "costs.decode_steps=2", "costs.decode_context=16",
    "search.speedup=1.1", "search.num_solutions=1", "search.calibration_rounds=0", "kd.steps=2"]
SFT_SMOKE = ["steps=2", "data.path=synthetic:arith", "data.synthetic_examples=64", "data.max_examples=null",
             "eval_every=0", "data.batch_size=8", "data.seq_len=128"]
GRPO_SMOKE = ["steps=2", "grpo.prompts_per_iteration=2", "sampling.group_size=2", "sampling.max_new_tokens=16",
              "checkpoint_every=1"]


def smoke_config(tmp_path: Path) -> Path:
    """A pipeline YAML on minimal settings (the notebooks' test reuses it)."""
    cfg = {"output_dir": str(tmp_path / "run"), "seed": 0, "tokenizer": "tiny", "progress": False,
           "puzzle": {"config": str(configs_dir() / "puzzle" / "tiny.yaml"), "overrides": PUZZLE_SMOKE},
           "sft": {"config": str(configs_dir() / "recipes" / "sft-tiny.yaml"), "overrides": SFT_SMOKE},
           "grpo": {"config": str(configs_dir() / "recipes" / "grpo-tiny.yaml"), "overrides": GRPO_SMOKE},
           "eval": {"examples": 4, "max_new_tokens": 16, "batch_size": 4, "speed_requests": 4,
                    "speed_prompt_tokens": 32, "speed_new_tokens": 8, "speed_rounds": 1}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemotron_jax", *args], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_pipeline_runs_every_stage_reports_and_resumes(tmp_path):
    config = smoke_config(tmp_path)
    out = tmp_path / "run"
    first = run_cli("pipeline", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [(m, mode) for m in ("parent", "child", "child+KD", "+SFT",
                                                                           "+GRPO") for mode in ("on", "off")]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["format_rate"] <= 1.0
        assert r["tokens_per_s"] > 0 and r["params"] > 0 and r["examples"] == 4
        assert r["engine_tokens_per_s"] > 0 and r["engine_speedup"] > 0
    assert {r["engine_speedup"] for r in rows if r["model"] == "parent"} == {1.0}
    params = {r["model"]: r["params"] for r in rows}
    assert params["child"] == params["child+KD"] == params["+SFT"] == params["+GRPO"] < params["parent"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| +GRPO | on |" in first.stdout

    # The export is a complete HF DeciLM checkpoint of the final model.
    hf_cfg = json.loads((out / "export" / "config.json").read_text())
    assert hf_cfg["model_type"] == "nemotron-nas"
    assert nj.Tokenizer.from_file(out / "export").vocab_size == nj.Tokenizer.tiny().vocab_size
    tokens = np.arange(12).reshape(1, 12)
    final = nj.load(out / "grpo" / "model")
    np.testing.assert_array_equal(nj.load(out / "export").logits(tokens), final.logits(tokens))

    # A second run reuses every finished stage: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "grpo" / "model", out / "eval", out / "export" / "config.json")}
    second = run_cli("pipeline", str(config))
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    measured = lambda rs: [{k: v for k, v in r.items() if not k.startswith("engine_")} for r in rs]  # timings
    assert measured(json.loads((out / "report.json").read_text())["rows"]) == measured(rows)

    # Changed eval settings redo the evaluation only.
    third = run_cli("pipeline", str(config), "eval.examples=3")
    assert third.returncode == 0, third.stderr[-3000:]
    assert {r["examples"] for r in json.loads((out / "report.json").read_text())["rows"]} == {3}
    assert (out / "grpo" / "model").stat().st_mtime_ns == stamps[out / "grpo" / "model"]


def test_pipeline_bad_stage_config_is_a_clear_error(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "sft": {"config": "nope.yaml"}}))
    result = run_cli("pipeline", str(config), "puzzle.config=missing.yaml")
    assert result.returncode == 2
    assert "puzzle.config" in result.stderr and "missing.yaml" in result.stderr
    result = run_cli("pipeline", str(config), "eval.exmaples=3")
    assert result.returncode == 2 and "eval.exmaples" in result.stderr
