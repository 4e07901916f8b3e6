"""Puzzle proof on CPU: a searched child vs naive baselines at the same measured decode budget.

Runs `configs/puzzle/tiny.yaml` end to end (a small Llama parent trained on the synthetic text
task, block library + BLD, replace-one-block scores, measured costs, MIP under a measured decode
speed-up >= 1.5x, assembly, KD), then builds two naive children that meet the same measured
budget from the same library and gives them the same KD:
  uniform     every layer the same narrower FFN (widest first); where FFN width alone cannot
              reach the budget, every layer also the same fewer KV heads
  drop-last   attention removed from the last k layers (smallest k); then whole last layers
Every model is scored on the held-out split (next-token accuracy, likelihood exp(−CE), KL to the
parent). FFN Fusion is shown on the first model with a run of attention-free blocks. Writes
docs/puzzle.md (tables) and docs/puzzle.png (plot).

    .venv/bin/python scripts/puzzle_proof.py [--output-dir outputs/puzzle-proof] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import nemotron_jax as nj
from nemotron_jax.config import AttentionConfig, FFNConfig
from nemotron_jax.puzzle import costs, fusion
from nemotron_jax.puzzle.assemble import assemble_child, child_config, describe, kd_recover
from nemotron_jax.puzzle.config import load_config
from nemotron_jax.puzzle.evaluate import evaluate
from nemotron_jax.puzzle.pipeline import Puzzle, log
from nemotron_jax.puzzle.report import read_json, table, write_json

ROOT = Path(__file__).resolve().parents[1]


def uniform_candidates(pz: Puzzle) -> list[list[tuple[AttentionConfig, FFNConfig]]]:
    """Same pair in every layer: widest FFN first, then fewer KV heads."""
    layer0 = pz.variants()[0]
    atts = [a for a in layer0["attention"] if a.kind == "gqa"]
    ffns = [f for f in layer0["ffn"] if f.kind == "swiglu"][1:]
    return [[(a, f)] * pz.library.parent.num_layers for a in atts for f in ffns]


def drop_last_candidates(pz: Puzzle) -> list[list[tuple[AttentionConfig, FFNConfig]]]:
    """Attention removed from the last k layers, then the FFNs of the last m layers too."""
    parent = pz.library.parent
    base = [(b.attention, b.ffn) for b in parent.blocks]
    n = parent.num_layers
    none = AttentionConfig("none")
    out = [[(none if i >= n - k else a, f) for i, (a, f) in enumerate(base)] for k in range(1, n + 1)]
    for m in range(1, n + 1):
        out.append([(AttentionConfig("none"), FFNConfig("none") if i >= n - m else f) for i, (_, f) in enumerate(base)])
    return out


def first_meeting(pz: Puzzle, candidates: list, target: float) -> tuple[list, dict]:
    """The first candidate, in order, whose measured speed-up reaches `target` (every one is measured:
    the cost table's predictions are too rough to skip any)."""
    parent = pz.library.parent
    for choice in candidates:
        child = child_config(parent, choice)
        speed = costs.measured_speedup(parent, child, pz.cfg.search.target, pz.cfg.costs,
                                       rounds=3 * pz.cfg.costs.rounds)
        log(f"  {', '.join(describe(choice))}: measured {speed['speedup']:.2f}x")
        if speed["speedup"] >= target:
            return choice, speed
    raise RuntimeError(f"no candidate reaches {target:.2f}x")


def baseline(pz: Puzzle, name: str, candidates: list, target: float) -> dict:
    out = pz.out / "baselines" / name
    done = out / "result.json"
    if done.is_file():
        return read_json(done)
    log(f"baseline {name}: searching the first architecture with a measured speed-up >= {target:.2f}x")
    choice, first_speed = first_meeting(pz, candidates, target)
    assembled = out / "assembled"
    if not assembled.is_dir():
        assemble_child(pz.parent, pz.library, choice).save(assembled)
    child = kd_recover(assembled, pz.parent_dir, out / "kd", pz.cfg.data, pz.cfg.kd, pz.cfg.seed,
                       pz.cfg.output.progress)
    result = {"architecture": describe(choice), "params": child.config.num_params(), "selection_speed": first_speed,
              "config": child.config.to_dict(),
              "speed": costs.measured_speedup(pz.library.parent, child.config, pz.cfg.search.target, pz.cfg.costs,
                                              rounds=3 * pz.cfg.costs.rounds),
              "before_kd": evaluate(nj.load(assembled), pz.eval_batches, pz.parent),
              "after_kd": evaluate(child, pz.eval_batches, pz.parent)}
    write_json(done, result)
    return result


def fusion_demo(pz: Puzzle, models: dict[str, nj.Model]) -> dict | None:
    """Fuse the first model with a run of attention-free FFN blocks; measured latency and KL change."""
    for name, model in models.items():
        runs = fusion.find_runs(model.config)
        if not runs:
            continue
        fused = fusion.fuse(model, runs)
        if not (pz.out / "fused").exists():
            fused.save_hf(pz.out / "fused")
        reloaded = nj.load(pz.out / "fused")
        speed = costs.measured_speedup(model.config, fused.config, pz.cfg.search.target, pz.cfg.costs,
                                       rounds=2 * pz.cfg.costs.rounds)
        return {"model": name, "runs": runs, "blocks": f"{model.config.num_layers} -> {fused.config.num_layers}",
                "fused_widths": [b.ffn.intermediate_size for b in fused.config.blocks],
                "decode_speedup_vs_unfused": speed["speedup"], **{k: v for k, v in speed.items() if k != "speedup"},
                "kl_to_parent_unfused": evaluate(model, pz.eval_batches, pz.parent)["kl"],
                "kl_to_parent_fused": evaluate(reloaded, pz.eval_batches, pz.parent)["kl"]}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/puzzle/tiny.yaml"))
    ap.add_argument("--output-dir", default="outputs/puzzle-proof")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, [f"output_dir={args.output_dir}", *args.overrides])
    pz = Puzzle(cfg)
    summary = pz.run()
    target = cfg.search.speedup * (1 + cfg.search.margin)
    results = {"puzzle": {"architecture": summary["architecture"], "params": summary["child_params"],
                          "speed": summary["timings"], "before_kd": summary["quality"]["child_before_kd"],
                          "after_kd": summary["quality"]["child"]}}
    results["uniform"] = baseline(pz, "uniform", uniform_candidates(pz), target)
    results["drop-last"] = baseline(pz, "drop-last", drop_last_candidates(pz), target)
    parent_q = summary["quality"]["parent"]
    models = {"puzzle": nj.load(pz.child_dir), **{k: nj.load(pz.out / "baselines" / k / "kd" / "model")
                                                   for k in ("uniform", "drop-last")}}
    fused = fusion_demo(pz, models)
    minutes = (time.time() - start) / 60
    write_docs(Path(args.docs), args, cfg, pz, summary, results, parent_q, fused, minutes)
    puzzle = results["puzzle"]["after_kd"]
    others = [r["after_kd"] for k, r in results.items() if k != "puzzle"]
    checks = {"measured speed-up >= target": summary["measured_speedup"] >= cfg.search.speedup,
              "every baseline meets the budget when re-measured": all(
                  r["speed"]["speedup"] >= cfg.search.speedup for r in results.values()),
              "keeps >= 95% of the parent's accuracy and likelihood": min(summary["retained"].values()) >= 0.95,
              "lowest KL to the parent of all children": all(puzzle["kl"] < o["kl"] for o in others),
              "highest likelihood of all children": all(puzzle["likelihood"] > o["likelihood"] for o in others)}
    for name, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}")
    ok = all(checks.values())
    print(f"proof {'PASSED' if ok else 'FAILED'}: see {args.docs}/puzzle.md")
    return 0 if ok else 1


def write_docs(docs: Path, args: argparse.Namespace, cfg, pz: Puzzle, summary: dict, results: dict,
               parent_q: dict, fused: dict | None, minutes: float) -> None:
    parent_arch = describe([(b.attention, b.ffn) for b in pz.library.parent.blocks])
    rows = [{"model": "parent", "architecture": "; ".join(parent_arch),
             "params": summary["parent_params"], "measured decode speed-up": 1.0, "meets budget": "-",
             "acc before KD": parent_q["accuracy"],
             "acc after KD": parent_q["accuracy"], "likelihood": parent_q["likelihood"], "KL to parent": 0.0,
             "acc retained": "100%", "likelihood retained": "100%"}]
    for name, r in results.items():
        rows.append({"model": name, "architecture": "; ".join(r["architecture"]), "params": r["params"],
                     "measured decode speed-up": round(r["speed"]["speedup"], 3),
                     "meets budget": "yes" if r["speed"]["speedup"] >= cfg.search.speedup else "NO",
                     "acc before KD": r["before_kd"]["accuracy"], "acc after KD": r["after_kd"]["accuracy"],
                     "likelihood": r["after_kd"]["likelihood"], "KL to parent": r["after_kd"]["kl"],
                     "acc retained": f"{100 * r['after_kd']['accuracy'] / parent_q['accuracy']:.1f}%",
                     "likelihood retained": f"{100 * r['after_kd']['likelihood'] / parent_q['likelihood']:.1f}%"})
    search = read_json(pz.out / "search.json")
    sol_rows = [{"attempt": r["attempt"], "solution": k, "architecture": "; ".join(x["architecture"]),
                 "Σ KL scores": x["score"], "held-out KL": x["heldout_kl"], "predicted": x["predicted_speedup"],
                 "measured": x["speedup"], "meets": x["meets"]} for r in search["rounds"]
                for k, x in enumerate(r["solutions"])]
    cost_rows = [{"variant": n, "params": v["params"], "KV bytes/token": v["kv_bytes_per_token"],
                  "prefill ms": 1e3 * v["prefill_s"], "decode ms/token": 1e3 * v["decode_s"]}
                 for n, v in pz.costs["variants"].items()]
    score_rows = [{"layer": i, **{f"{k[:3]}:{n}": v["kl"] for k in ("attention", "ffn") for n, v in s[k].items()}}
                  for i, s in enumerate(pz.scores["scores"])]
    docs.mkdir(parents=True, exist_ok=True)
    plot(docs / "puzzle.png", rows, results, parent_q)
    c = pz.cfg.costs
    lines = [
        "# Puzzle on a tiny Llama (CPU proof)", "",
        "Produced by", "", "```",
        " ".join([sys.executable.split("/work/main/")[-1], "scripts/puzzle_proof.py", "--output-dir", args.output_dir,
                  *args.overrides]), "```", "",
        f"({minutes:.1f} min for this invocation on a shared 2-core {pz.costs['device_kind']}; stages already "
        "present in the output directory are reused.) The pipeline alone is "
        f"`nemotron-jax puzzle run configs/puzzle/tiny.yaml output_dir=D`; see `nemotron_jax/puzzle/`.", "",
        "Parent: a Llama with "
        f"{pz.library.parent.num_layers} layers, hidden {pz.library.parent.hidden_size}, "
        f"{pz.library.parent.num_attention_heads} heads, SwiGLU {pz.library.parent.blocks[0].ffn.intermediate_size}, "
        f"trained {cfg.parent.train_steps} steps on the synthetic text task. Constraint: measured decode speed-up "
        f">= {cfg.search.speedup}x (batch {c.decode_batch}, context {c.decode_context}; the search keeps a "
        f"{cfg.search.margin:.0%} margin). Every child gets the same KD ({cfg.kd.steps} steps, KL + cosine). "
        "Quality is on held-out text: next-token accuracy, likelihood = exp(−CE) per token, KL(parent‖child).", "",
        "## Result", "", table(rows, markdown=True), "",
        "![likelihood vs measured speed-up](puzzle.png)", "",
        f"Held-out set: {sum(int(b['weights'].sum()) for b in pz.eval_batches)} target tokens, so accuracy differences "
        "below about ±0.01 are noise; KL to the parent and likelihood are the sensitive measures.", "",
        "Baselines: *uniform* = the same narrower FFN in every layer (then fewer KV heads when width alone "
        "cannot reach the budget); *drop-last* = attention removed from the last layers (then whole last "
        "layers). Each is the first of its family, in that order, whose measured speed-up reaches the target "
        f"({cfg.search.speedup}x plus the search's {cfg.search.margin:.0%} margin, median of "
        f"{3 * cfg.costs.rounds} paired rounds); the table's speed-ups are independent re-measurements.", "",
        "## Search", "", table(sol_rows, markdown=True), "",
        "## Replace-one-block scores (KL, after BLD)", "", table(score_rows, markdown=True), "",
        "## Measured costs per subblock", "", table(cost_rows, markdown=True), "",
    ]
    if fused:
        lines += ["## FFN Fusion", "",
                  f"Model `{fused['model']}`: runs {fused['runs']} fused ({fused['blocks']} blocks, widths "
                  f"{fused['fused_widths']}), saved as HF DeciLM and reloaded. Measured decode speed-up of the fused "
                  f"model over the unfused one: {fused['decode_speedup_vs_unfused']:.3f}x. KL to the parent "
                  f"{fused['kl_to_parent_unfused']:.4f} (sequential) -> {fused['kl_to_parent_fused']:.4f} (parallel, "
                  "before any recovery KD).", ""]
    lines += ["## Notes", "",
              "- Timings are on a shared 2-core CPU: per-variant costs are noisy (min over rounds of medians), so "
              "the search re-measures each solution's whole-model speed-up (median of paired parent/child ratios) "
              "and re-solves with a tighter budget when it falls short; the table's speed-ups are a final "
              "re-measurement of the saved models' architectures.",
              "- The search optimises the sum of replace-one-block KL scores (before KD); how much KD then recovers "
              "differs per variant (e.g. pooled KV heads recover well), which the proxy does not see.",
              "- FFN widths are multiples of 256 so that every child is an HF DeciLM checkpoint (`ffn_mult`).",
              "- Token budgets are tiny (BLD and KD of a few hundred thousand tokens), far from the paper's billions.",
              "- From an empty output directory the whole proof takes about 17–25 min on this shared 2-core CPU (the "
              "pipeline alone, `puzzle run`, 10–13 min: parent training and KD dominate)."]
    (docs / "puzzle.md").write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], results: dict, parent_q: dict) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        ax1.scatter(r["measured decode speed-up"], r["likelihood"], s=60)
        ax1.annotate(r["model"], (r["measured decode speed-up"], r["likelihood"]), textcoords="offset points",
                     xytext=(5, 5))
    ax1.axhline(0.95 * parent_q["likelihood"], ls="--", c="grey", lw=1, label="95% of parent")
    ax1.set(xlabel="measured decode speed-up (x)", ylabel="held-out likelihood exp(-CE) (after KD)",
            title="quality vs measured speed")
    ax1.legend()
    names = list(results)
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [results[n]["before_kd"]["kl"] for n in names], 0.4, label="before KD")
    ax2.bar([i + 0.2 for i in x], [results[n]["after_kd"]["kl"] for n in names], 0.4, label="after KD")
    ax2.set_xticks(list(x), names)
    ax2.set(ylabel="KL(parent ‖ child), held-out", title="distance to the parent")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
