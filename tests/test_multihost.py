"""Two processes on localhost (jax.distributed over CPU gloo collectives, 2 devices each) train
exactly like one process with the same 4 devices.

Each step's global batch is the whole 8-record data set (one record per packed row, no shuffle,
packing windows of 4 so that no row depends on how the records are split between hosts),
so the two runs see the same rows — split by host (records i::2) in one, read whole in the other —
and must produce the same losses and final parameters up to float reassociation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import nemotron_jax as nj

pytestmark = pytest.mark.slow


def _records(n: int = 8, lo: int = 40, hi: int = 64) -> list[dict]:
    """Texts whose token count (with BOS/EOS) lies in [lo, hi]: one record fills one 64-token row."""
    tok, rng, out = nj.Tokenizer.tiny(), np.random.default_rng(0), []
    words = "zero one two three four five six seven eight nine ten plus minus equals is".split()
    while len(out) < n:
        text = " ".join(rng.choice(words, size=int(rng.integers(20, 40))))
        if lo <= len(tok.encode(text)) + 2 <= hi:
            out.append({"text": text})
    return out


def _recipe(tmp_path: Path, kind: str = "lm") -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    recipe = {"kind": kind, "seed": 0, "steps": 3, "log_every": 1, "checkpoint_every": 3, "progress": False,
              "async_checkpointing": False,
              "model": {"source": "tiny-llama"},
              "data": {"path": str(data), "tokenizer": "tiny", "seq_len": 63, "batch_size": 8, "shuffle": False,
                       "pack_window": 4},
              "optimizer": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
              "mesh": {"data": 1, "fsdp": -1}}
    if kind == "kd":  # the student is distilled from a frozen teacher run inside the same step
        recipe.update(model={"source": "tiny-hetero"}, teacher={"source": "tiny-llama"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMOTRON_JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return {**env, **extra}


def _train(recipe: Path, out: Path, env: dict[str, str], *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nemotron_jax", "train", str(recipe), f"output_dir={out}",
                             *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _two_processes(recipe: Path, out: Path, *overrides: str) -> None:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workers = [_train(recipe, out, _env(2, NEMOTRON_JAX_COORDINATOR=f"localhost:{port}",
                                        NEMOTRON_JAX_NUM_PROCESSES="2", NEMOTRON_JAX_PROCESS_ID=str(i)), *overrides)
               for i in range(2)]
    for w in workers:
        _finish(w)


def test_two_process_training_matches_one_process(tmp_path):
    recipe = _recipe(tmp_path)
    multi, single = tmp_path / "two-processes", tmp_path / "one-process"
    _two_processes(recipe, multi)
    _finish(_train(recipe, single, _env(4)))

    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-5)
    assert _losses(single)[-1] < _losses(single)[0]  # it trained
    tokens = np.arange(16).reshape(1, 16)
    np.testing.assert_allclose(nj.load(multi / "model").logits(tokens), nj.load(single / "model").logits(tokens),
                               rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]

    # Both hosts restore the Orbax checkpoint (and the data position) and carry on identically.
    _two_processes(recipe, multi, "steps=4")
    _finish(_train(recipe, single, _env(4), "steps=4"))
    assert len(_losses(multi)) == 4
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-5)


@pytest.mark.parametrize("kind", ["kd", "grpo", "dpo"])
def test_two_process_kinds_match_one_process(tmp_path, kind):
    """kd: each host reads its share of the data (one record per row, as above) and runs the teacher
    on it; grpo/dpo: every host
    computes the iteration's rollouts (or pairs) whole and trains on its share of the rows. Two
    processes give one process's losses and weights, and resume together."""
    root = Path(__file__).resolve().parents[1] / "configs" / "recipes"
    common = ["progress=false", "log_every=1", "checkpoint_every=2", "steps=2", "async_checkpointing=false",
              "optimizer.lr=1e-3", *([] if kind == "kd" else ["start.sft_steps=0"])]
    over = {"grpo": ["grpo.prompts_per_iteration=2", "sampling.group_size=4", "sampling.max_new_tokens=8",
                     "prompts.eval_examples=0", "grpo.skip_flat_groups=false"],
            "dpo": ["dpo.pairs_per_iteration=4", "dpo.seq_len=64"],
            "kd": []}[kind]
    recipe = _recipe(tmp_path, "kd") if kind == "kd" else root / f"{kind}-tiny.yaml"
    multi, single = tmp_path / "two-processes", tmp_path / "one-process"
    _two_processes(recipe, multi, *common, *over)
    _finish(_train(recipe, single, _env(4), *common, *over))
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
    tokens = np.arange(16).reshape(1, 16)
    np.testing.assert_allclose(nj.load(multi / "model").logits(tokens), nj.load(single / "model").logits(tokens),
                               rtol=1e-4, atol=1e-4)
    _two_processes(recipe, multi, *common, *over, "steps=3")
    _finish(_train(recipe, single, _env(4), *common, *over, "steps=3"))
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
