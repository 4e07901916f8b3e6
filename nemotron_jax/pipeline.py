"""`nemotron-jax pipeline`: the whole Llama-Nemotron recipe in one resumable command.

Each stage is a recipe that already exists, run on the previous stage's output:

    puzzle/    parent training -> block library + BLD -> scores -> costs -> MIP search ->
               child assembly -> KD from the parent           (`nemotron_jax.puzzle.Puzzle`)
    sft/       reasoning SFT of the distilled child, both toggle modes     (`kind: sft` recipe)
    grpo/      GRPO with accuracy + format rewards from the SFT model      (`kind: grpo` recipe)
    eval/      per model and mode: accuracy, format compliance, response length, decode speed
    export/    the final model as a Hugging Face DeciLM checkpoint with its tokenizer
    report.json, report.md, report.png: parent, child, child+KD, +SFT, +GRPO side by side
               (the paper's Tables 3-5 in miniature)

A stage whose output exists is not redone, and a stage killed mid-way resumes from its own
checkpoints, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from nemotron_jax.errors import ConfigError
from nemotron_jax.fileio import atomic_write_text
from nemotron_jax.typed_yaml import load_yaml

MODELS = ("parent", "child", "child+KD", "+SFT", "+GRPO")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A stage's base YAML (relative to the pipeline file when not found as given) and overrides."""

    config: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: `data` is `synthetic:arith`, `synthetic:chain` or `synthetic:chain4`
    (problems never generated for training) or a JSONL of {question, answer} (GSM8K works as is)."""

    data: str = "synthetic:arith"
    examples: int = 512  # sampling noise at 128 problems was as large as the GRPO gain (docs/pipeline.md)
    max_new_tokens: int = 96
    batch_size: int = 64
    seed: int = 1234
    max_thinking_tokens: int | None = None
    # Serving throughput through the engine (eval/throughput.py): concurrent requests x prompt
    # tokens x new tokens, timed round-robin over every model.
    speed_requests: int = 32
    speed_prompt_tokens: int = 192
    speed_new_tokens: int = 32
    speed_rounds: int = 3


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    output_dir: str = "outputs/pipeline-tiny"
    seed: int = 0
    tokenizer: str = "tiny"
    puzzle: StageConfig = StageConfig("../puzzle/tiny.yaml")
    sft: StageConfig = StageConfig("../recipes/sft-tiny.yaml")
    grpo: StageConfig = StageConfig("../recipes/grpo-tiny.yaml")
    eval: EvalConfig = EvalConfig()
    export_format: Literal["decilm", "native"] = "decilm"
    progress: bool = True


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> tuple[PipelineConfig, Path]:
    """The config and the directory its stage paths are relative to."""
    cfg = load_yaml(PipelineConfig, path, overrides, what="pipeline config")
    if cfg.eval.examples < 1:
        raise ConfigError(f"{path}: eval.examples must be >= 1, got {cfg.eval.examples}")
    return cfg, Path(path).resolve().parent


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class Pipeline:
    """One pipeline run; `run()` executes (or reuses) every stage and returns the report."""

    def __init__(self, cfg: PipelineConfig, base_dir: Path):
        self.cfg, self.base = cfg, base_dir
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def _stage_file(self, stage: StageConfig, name: str) -> Path:
        for candidate in (Path(stage.config), self.base / stage.config):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"{name}.config: no such file {stage.config!r} (looked in the working directory and "
                          f"in {self.base})")

    def _timed(self, name: str, fn: Any) -> Any:
        start = time.perf_counter()
        log(f"pipeline: stage {name}")
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        return result

    # ---------------------------------------------------------------- stages
    def puzzle(self) -> dict[str, Path]:
        from nemotron_jax.puzzle.config import load_config
        from nemotron_jax.puzzle.pipeline import Puzzle

        pz_cfg = load_config(self._stage_file(self.cfg.puzzle, "puzzle"), [
            *self.cfg.puzzle.overrides, f"output_dir={self.out / 'puzzle'}", f"seed={self.cfg.seed}",
            f"data.tokenizer={self.cfg.tokenizer}", f"output.progress={self.cfg.progress}"])
        puzzle = Puzzle(pz_cfg)
        puzzle.run("summary")
        return {"parent": puzzle.parent_dir, "child": puzzle.out / "assembled", "child+KD": puzzle.child_dir}

    def train(self, name: str, stage: StageConfig, source: Path, extra: Sequence[str] = ()) -> Path:
        """Run a training recipe from `source` in `{output_dir}/{name}`; returns its saved model."""
        from nemotron_jax.recipes import load_recipe, run_recipe

        out = self.out / name
        recipe = load_recipe(self._stage_file(stage, name), [
            *stage.overrides, *extra, f"output_dir={out}", f"seed={self.cfg.seed}", f"model.source={source}",
            f"data.tokenizer={self.cfg.tokenizer}", f"progress={self.cfg.progress}"])
        if not (out / "model").is_dir():
            run_recipe(recipe)
        return out / "model"

    def eval_records(self) -> list[dict[str, Any]]:
        from nemotron_jax.data.sources import eval_records

        e = self.cfg.eval
        try:
            records = eval_records(e.data, e.examples, e.seed)
        except ValueError as err:
            raise ConfigError(f"eval.data: {err}") from None
        bad = next((i for i, r in enumerate(records) if "question" not in r or "answer" not in r), None)
        if bad is not None:
            raise ConfigError(f"eval.data {e.data}: record {bad} has no question/answer fields")
        return records

    def evaluate(self, models: dict[str, Path]) -> list[dict[str, Any]]:
        """Both modes of every model, each model's rows cached in eval/{n}-{name}.json (redone when
        the eval settings change)."""
        from nemotron_jax.api import load
        from nemotron_jax.eval.reasoning import evaluate_reasoning
        from nemotron_jax.tokenizer import Tokenizer

        e, tokenizer, records = self.cfg.eval, Tokenizer.from_file(self.cfg.tokenizer), self.eval_records()
        rows, settings = [], dataclasses.asdict(e)
        for k, (name, path) in enumerate(models.items()):
            cached = self.out / "eval" / f"{k}-{name.strip('+').replace('+', '-')}.json"
            done = json.loads(cached.read_text()) if cached.is_file() else {}
            if done.get("eval") != settings:
                model = load(path)
                result = [evaluate_reasoning(model, tokenizer, records, thinking, name=name,
                                             max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=e.seed,
                                             max_thinking_tokens=e.max_thinking_tokens,
                                             progress=self.cfg.progress).to_dict() for thinking in (True, False)]
                done = {"path": str(path), "eval": settings, "rows": result}
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cached, json.dumps(done, indent=1) + "\n")
            rows += done["rows"]
        speed = self.serving_speed(models)
        return [{**row, **speed[row["model"]]} for row in rows]

    def serving_speed(self, models: dict[str, Path]) -> dict[str, dict[str, float]]:
        """Every model serving the same concurrent workload through the engine (not cached: it
        is a measurement of this machine now)."""
        from nemotron_jax.api import load
        from nemotron_jax.eval.throughput import engine_throughput

        e = self.cfg.eval
        loaded = {name: load(path) for name, path in models.items()}
        return engine_throughput(loaded, requests=e.speed_requests, prompt_tokens=e.speed_prompt_tokens,
                                 new_tokens=e.speed_new_tokens, rounds=e.speed_rounds, seed=e.seed)

    def export(self, source: Path) -> Path:
        from nemotron_jax.api import load
        from nemotron_jax.tokenizer import Tokenizer

        out = self.out / "export"
        if not out.is_dir():
            model = load(source)
            if self.cfg.export_format == "decilm":  # weights, config, generation config and tokenizer at once
                model.save_hf(out, tokenizer=self.cfg.tokenizer)
            else:
                model.save(out)
                Tokenizer.from_file(self.cfg.tokenizer).save(out)
        return out

    def run(self) -> dict[str, Any]:
        from nemotron_jax.eval.report import format_table, plot

        models = self._timed("puzzle", self.puzzle)
        models["+SFT"] = self._timed("sft", lambda: self.train("sft", self.cfg.sft, models["child+KD"]))
        models["+GRPO"] = self._timed("grpo", lambda: self.train("grpo", self.cfg.grpo, models["+SFT"],
                                                                   ["start.sft_steps=0"]))
        rows = self._timed("eval", lambda: self.evaluate(models))
        export = self._timed("export", lambda: self.export(models["+GRPO"]))
        puzzle_summary = json.loads((self.out / "puzzle" / "summary.json").read_text())
        report = {"rows": rows, "models": {k: str(v) for k, v in models.items()}, "export": str(export),
                  "puzzle": {k: puzzle_summary[k] for k in ("parent_params", "child_params", "measured_speedup",
                                                             "architecture")},
                  "stage_seconds": self.seconds, "eval": dataclasses.asdict(self.cfg.eval)}
        table = format_table(rows)
        atomic_write_text(self.out / "report.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(self.out / "report.md", table + "\n")
        plot(rows, self.out / "report.png", title="parent -> Puzzle child -> KD -> SFT -> GRPO (held-out accuracy)")
        return report
