"""The Puzzle pipeline: parent -> library + BLD -> scores -> costs -> search -> assemble + KD -> summary.

Every stage writes its output under `output_dir` atomically and is skipped when that output
already exists, so re-running a command resumes (and BLD / the trainings resume mid-way from
their checkpoints):

    parent/model        the trained parent (`Model.save`; none when `parent.source` is given)
    library/            candidate weights after BLD (`store`), bld.json the BLD losses
    scores.json         replace-one-block KL / LM loss per candidate
    costs.json          parameter, KV-cache and measured runtime costs per variant
    search.json         the MIP's solutions, their measured speed-ups and held-out KL; the choice
    assembled/          the chosen child with library weights (`Model.save`), kd/ the KD run
    child/              the distilled child: HF DeciLM (or `Model.save` with child_format native)
    summary.json        parent vs child: params, measured speed-up, held-out quality
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from nemotron_jax.api import Model, load
from nemotron_jax.config import ModelConfig
from nemotron_jax.data.pipeline import DataPipeline, resolve_path
from nemotron_jax.presets import resolve_config
from nemotron_jax.puzzle import bld, costs, fusion, search
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.assemble import assemble_child, child_config, describe, kd_recover
from nemotron_jax.puzzle.config import PuzzleConfig, to_dict
from nemotron_jax.puzzle.evaluate import evaluate
from nemotron_jax.puzzle.library import Library, build_library
from nemotron_jax.puzzle.report import read_json, table, write_json
from nemotron_jax.puzzle.score import score_library
from nemotron_jax.puzzle.store import load_library, save_library
from nemotron_jax.tokenizer import Tokenizer

STAGES = ("parent", "library", "score", "costs", "search", "assemble", "summary")


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def parent_model_config(model: Any) -> ModelConfig:
    """`parent.model`: an inline ModelConfig dict, a preset name, a config path or a YAML file."""
    if isinstance(model, dict):
        return ModelConfig.from_dict(model, where="parent.model")
    path = Path(str(model))
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return ModelConfig.from_dict(yaml.safe_load(path.read_text()), where=str(path))
    return resolve_config(str(model))


class Puzzle:
    """One Puzzle run; each property/method is a stage that reuses its output when present."""

    def __init__(self, cfg: PuzzleConfig):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "puzzle_config.json"
        if saved.is_file():
            old = read_json(saved)
            changed = sorted(k for k, v in to_dict(cfg).items() if old.get(k) != v)
            if changed:
                log(f"warning: {saved} differs in {changed}; finished stages are reused as they are "
                    "(use a new output_dir to rerun them)")
        write_json(saved, to_dict(cfg))

    # ---------------------------------------------------------------- data
    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.cfg.data.tokenizer)

    def data(self, seed: int) -> DataPipeline:
        return DataPipeline(self.cfg.data, self.tokenizer, seed, resolve_path(self.cfg.data, self.out))

    @cached_property
    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        batches = self.data(self.cfg.seed).eval_batches()
        if not batches:
            raise ValueError("no held-out data: set data.eval_examples (or data.eval_path)")
        return batches

    # ---------------------------------------------------------------- stages
    @cached_property
    def parent_dir(self) -> Path:
        p = self.cfg.parent
        if p.source:
            return Path(p.source)
        done = self.out / "parent" / "model"
        if not done.is_dir():
            from nemotron_jax.train import LMRecipe, run_training
            from nemotron_jax.train.config import ModelSpec
            from nemotron_jax.train.optim import OptimizerConfig

            mcfg = parent_model_config(p.model)
            config_file = self.out / "parent_config.json"
            write_json(config_file, mcfg.to_hf("llama" if mcfg.is_homogeneous else "decilm"))
            log(f"parent: training {mcfg.num_layers} layers, {mcfg.num_params():,} params for {p.train_steps} steps")
            run_training(LMRecipe(kind="lm", output_dir=str(self.out / "parent"), seed=self.cfg.seed,
                                  steps=p.train_steps, log_every=10, checkpoint_every=max(1, p.train_steps // 2),
                                  progress=self.cfg.output.progress, model=ModelSpec(source=str(config_file)),
                                  data=self.cfg.data, optimizer=OptimizerConfig(lr=p.lr, weight_decay=0.0)))
        return done

    @cached_property
    def parent(self) -> Model:
        return load(self.parent_dir)

    @cached_property
    def library(self) -> Library:
        path = self.out / "library"
        if path.is_dir():
            return load_library(path)
        init_path = self.out / "library_init"
        if init_path.is_dir():
            library = load_library(init_path)
        else:
            it = self.data(self.cfg.seed + self.cfg.bld.seed_offset + 1).train_iterator()
            calibration = [next(it) for _ in range(self.cfg.library.calibration_batches)]
            library = build_library(self.parent, calibration, self.cfg.library, self.cfg.output.progress)
            save_library(init_path, library)
        before = bld.evaluate(library, self.parent, self.eval_batches)
        log(f"library: BLD of {sum(c.trainable for _, c in library.all())} candidates for {self.cfg.bld.steps} steps")
        trained, history = bld.train_bld(library, self.parent,
                                         self.data(self.cfg.seed + self.cfg.bld.seed_offset).train_iterator(),
                                         self.cfg.bld, self.out / "bld", self.cfg.output.progress)
        after = bld.evaluate(trained, self.parent, self.eval_batches)
        for i, c in trained.all():
            c.bld_loss = after[f"{i}/{c.kind}/{c.name}"]
        rows = [{"layer": i, "slot": c.kind, "variant": c.name, "origin": c.origin,
                 "init_nmse": before[f"{i}/{c.kind}/{c.name}"], "bld_nmse": c.bld_loss} for i, c in trained.all()]
        write_json(self.out / "bld.json", {"history": history, "candidates": rows})
        log("library (normalised MSE on held-out data, before / after BLD):\n" + table(rows))
        save_library(path, trained)
        return trained

    @cached_property
    def scores(self) -> dict[str, Any]:
        path = self.out / "scores.json"
        if not path.is_file():
            scores, base = score_library(self.parent, self.library, self.eval_batches[:self.cfg.score.batches],
                                         self.cfg.output.progress)
            write_json(path, {"metric": self.cfg.score.metric, "parent": base, "scores": scores})
            metric = self.cfg.score.metric
            rows = [{"layer": i, **{f"{k[:3]}:{n}": v[metric] for k in ("attention", "ffn") for n, v in s[k].items()}}
                    for i, s in enumerate(scores)]
            log(f"scores ({metric} of replace-one-block; parent lm_loss {base['lm_loss']:.4f}):\n" + table(rows))
        return read_json(path)

    @cached_property
    def costs(self) -> dict[str, Any]:
        path = self.out / "costs.json"
        if not path.is_file():
            variants = [c.variant for _, c in self.library.all()]
            cache = self.cfg.costs.cache_file or self.out / "latency_cache.json"
            result = costs.cost_table(self.library.parent, variants, self.cfg.costs, cache, self.cfg.output.progress)
            write_json(path, result)
            rows = [{"variant": n, **{k: v[k] for k in ("params", "kv_bytes_per_token", "prefill_s", "decode_s")}}
                    for n, v in result["variants"].items()]
            log(f"costs on {result['device_kind']} ({result['method']}; overhead {result['overhead']}):\n"
                + table(rows))
        return read_json(path)

    def variants(self) -> list[dict[str, list[sb.Variant]]]:
        return [{k: [c.variant for c in self.library.candidates(i, k)] for k in ("attention", "ffn")}
                for i in range(self.library.parent.num_layers)]

    @cached_property
    def search(self) -> dict[str, Any]:
        path = self.out / "search.json"
        if path.is_file():
            return read_json(path)
        s, parent = self.cfg.search, self.library.parent
        context = self.cfg.costs.decode_context
        options = search.build_options(parent, self.variants(), self.scores["scores"], self.costs, s,
                                       self.cfg.score.metric, context)
        scale, rounds, chosen = 1.0, [], None
        for attempt in range(s.calibration_rounds + 1):
            solutions, budgets = search.search(parent, options, self.costs, s, scale)
            for sol in solutions:
                child = child_config(parent, sol["choice"])
                sol.update(costs.measured_speedup(parent, child, s.target, self.cfg.costs))
                sol["heldout_kl"] = evaluate(assemble_child(self.parent, self.library, sol["choice"]),
                                             self.eval_batches, self.parent)["kl"]
                sol["meets"] = self._meets(sol, budgets)
                sol["architecture"] = describe(sol["choice"])
                sol["config"] = child.to_dict()
                sol.pop("choice")
            rounds.append({"attempt": attempt, "runtime_scale": scale, "budgets": budgets, "solutions": solutions})
            ok = [x for x in solutions if x["meets"]]
            if ok:
                chosen = min(ok, key=lambda x: x["heldout_kl"])
                break
            worst = min(x["speedup"] / x["predicted_speedup"] for x in solutions)
            scale *= 0.98 * worst / (1 + s.margin)
            log(f"search: measured speed-up below the predicted one (ratio {worst:.3f}); re-solving with a "
                f"runtime budget x{scale:.3f}")
        if chosen is None:
            chosen = max(rounds[-1]["solutions"], key=lambda x: x["speedup"])
            log("search: WARNING no solution met the constraint when measured; keeping the fastest")
        result = {"constraint": self.constraint(), "rounds": rounds, "chosen": chosen}
        write_json(path, result)
        rows = [{"attempt": r["attempt"], "solution": k, "score": x["score"], "heldout_kl": x["heldout_kl"],
                 "predicted_speedup": x["predicted_speedup"], "measured_speedup": x["speedup"], "meets": x["meets"]}
                for r in rounds for k, x in enumerate(r["solutions"])]
        log("search:\n" + table(rows) + "\nchosen: " + ", ".join(chosen["architecture"]))
        return result

    def constraint(self) -> dict[str, Any]:
        s = self.cfg.search
        return {k: v for k, v in {"target": s.target, "speedup": s.speedup, "latency_ms": s.latency_ms,
                                  "max_memory_ratio": s.max_memory_ratio, "max_params_ratio": s.max_params_ratio,
                                  "decode_batch": self.cfg.costs.decode_batch,
                                  "decode_context": self.cfg.costs.decode_context,
                                  "prefill_batch": self.cfg.costs.prefill_batch,
                                  "prefill_seq": self.cfg.costs.prefill_seq}.items() if v is not None}

    def _meets(self, sol: dict[str, Any], budgets: dict[str, float]) -> bool:
        s = self.cfg.search
        if s.speedup is not None:
            return sol["speedup"] >= s.speedup * (1 + s.margin)
        return sol[f"child_{s.target}_s"] * (1 + s.margin) <= s.latency_ms / 1000.0

    @cached_property
    def child_dir(self) -> Path:
        done = self.out / "child"
        if done.is_dir():
            return done
        cfg = ModelConfig.from_dict(self.search["chosen"]["config"], where="search.json")
        assembled = self.out / "assembled"
        if not assembled.is_dir():
            assemble_child(self.parent, self.library, [(b.attention, b.ffn) for b in cfg.blocks]).save(assembled)
        log(f"assemble: KD of the child ({cfg.num_params():,} params) for {self.cfg.kd.steps} steps")
        child = kd_recover(assembled, self.parent_dir, self.out / "kd", self.cfg.data, self.cfg.kd, self.cfg.seed,
                           self.cfg.output.progress)
        if self.cfg.output.child_format == "decilm":
            child.save_hf(done)
        else:
            child.save(done)
        return done

    @cached_property
    def summary(self) -> dict[str, Any]:
        path = self.out / "summary.json"
        if path.is_file():
            return read_json(path)
        child = load(self.child_dir)
        assembled = load(self.out / "assembled")
        target = self.cfg.search.target
        speed = costs.measured_speedup(self.parent.config, child.config, target, self.cfg.costs,
                                       rounds=2 * self.cfg.costs.rounds)
        quality = {"parent": evaluate(self.parent, self.eval_batches),
                   "child_before_kd": evaluate(assembled, self.eval_batches, self.parent),
                   "child": evaluate(child, self.eval_batches, self.parent)}
        summary = {
            "parent_params": self.parent.config.num_params(), "child_params": child.config.num_params(),
            "measured_speedup": speed["speedup"], "timings": speed, "constraint": self.constraint(),
            "constraint_met": bool(self.cfg.search.speedup is None or speed["speedup"] >= self.cfg.search.speedup),
            "architecture": describe([(b.attention, b.ffn) for b in child.config.blocks]),
            "quality": quality,
            "retained": {k: quality["child"][k] / quality["parent"][k] for k in ("accuracy", "likelihood")},
            "child_dir": str(self.child_dir), "fusable_runs": fusion.find_runs(child.config),
        }
        write_json(path, summary)
        rows = [{"model": name, **{k: q[k] for k in ("lm_loss", "accuracy", "likelihood", "kl")}}
                for name, q in quality.items()]
        log(f"summary: {summary['child_params']:,} / {summary['parent_params']:,} params, measured {target} "
            f"speed-up {speed['speedup']:.2f}x\n" + table(rows))
        return summary

    def run(self, until: str = "summary") -> Any:
        """Run every stage up to and including `until`; returns that stage's result."""
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; expected one of {STAGES}")
        getters = {"parent": lambda: self.parent_dir, "library": lambda: self.library, "score": lambda: self.scores,
                   "costs": lambda: self.costs, "search": lambda: self.search, "assemble": lambda: self.child_dir,
                   "summary": lambda: self.summary}
        result = None
        for stage in STAGES[:STAGES.index(until) + 1]:
            result = getters[stage]()
        return result

