"""The evaluation protocol of the Llama-Nemotron report (NeMo-Skills): per-mode sampling, k samples
per problem, pass@1 (mean over the k), maj@k and unbiased pass@k, resumable and sharded.

Problems are cut into fixed batches in their global order (`batch_size // samples` problems, each
sampled `samples` times by the engine, which prefills a prompt once for its k samples); batch b is
generated with seed `seed + b` by shard `b % num_shards`, and every sample draws from its own key,
so results do not depend on how many hosts ran them, on resumption, or on the mesh (the engine
splits its rows over the mesh's data axes). Every graded problem is appended to the shard's JSONL
part file as soon as its batch is done; process 0 merges the parts and writes the summary.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nemotron_jax.eval import outputs
from nemotron_jax.eval.grading import Benchmark, Record

# Recommended decoding per mode (SPEC §3): on 0.6 / 0.95, off greedy.
MODE_SAMPLING = {True: {"temperature": 0.6, "top_p": 0.95}, False: {"temperature": 0.0, "top_p": 1.0}}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k samples drawn without replacement
    from n, c of them correct, is correct) = 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_score(keys: Sequence[str | None], scores: Sequence[float]) -> float:
    """maj@k: the score of the most voted answer (ties: the one voted first); no answers score 0."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)
    return float(scores[list(keys).index(winner)])


def prompt_messages(bench: Benchmark, record: Record, thinking: bool, system: str | None) -> tuple[list, bool | None]:
    """(messages, thinking= for the chat template): an extra system text goes beside the toggle."""
    messages = bench.messages(record)
    system = system if system is not None else bench.system
    if not system:
        return messages, thinking
    toggle = f"detailed thinking {'on' if thinking else 'off'}"
    return [{"role": "system", "content": f"{toggle}\n{system}"}, *messages], None


def generate_samples(model: Any, prompts: Sequence[list[int]], samples: int, max_new_tokens: int, *,
                     seed: int, **sampling: Any) -> list[list[list[int]]]:
    """`samples` responses per prompt, as token lists [prompt][sample], from the engine: each
    prompt is prefilled once and its k samples share its pages; sample j of prompt i draws from its
    own key (seed, i·k + j), so a response never depends on what else is in the batch."""
    out = model.generate(list(prompts), max_new_tokens, seed=seed, n=samples, **sampling)
    return [out[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def _problem_row(bench: Benchmark, index: int, record: Record, mode: str, responses: Sequence[str],
                 tokens: Sequence[int], grades: Sequence[Any]) -> dict[str, Any]:
    scores = [g.score for g in grades]
    keys = [bench.vote_key(g.answer, record) for g in grades]
    ident = next((record[k] for k in ("id", "key", "task_id", "unique_id", "problem_id") if k in record), None)
    return {"benchmark": bench.name, "mode": mode, "index": index, "id": ident, "reference": bench.reference(record),
            "samples": [{"response": r, "tokens": t, **g.to_dict()} for r, t, g in zip(responses, tokens, grades,
                                                                                      strict=True)],
            "pass@1": sum(scores) / len(scores), "maj": majority_score(keys, scores) if bench.votes else None}


def run(model: Any, tokenizer: Any, bench: Benchmark, records: Sequence[Record], thinking: bool, *,
        samples: int = 1, max_new_tokens: int = 256, max_thinking_tokens: int | None = None, batch_size: int = 32,
        temperature: float | None = None, top_p: float | None = None, top_k: int = 0, seed: int = 0,
        system: str | None = None, output_dir: str | Path | None = None, shard: int = 0, num_shards: int = 1,
        progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate and grade this shard's problems in one mode: (problem rows, {"tokens", "seconds"}
    timed after compilation). With `output_dir`, problems already in its files are skipped and
    each finished batch is appended to the shard's part file."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    mode = "on" if thinking else "off"
    sampling: dict[str, Any] = dict(MODE_SAMPLING[thinking])
    sampling.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
    sampling["top_k"] = top_k
    if max_thinking_tokens is not None and thinking:
        sampling.update(max_thinking_tokens=max_thinking_tokens, think_tokens=tokenizer.think_tokens)
    sampling["stop_tokens"] = [i for i in tokenizer.eos_ids if i < model.config.vocab_size] or None
    per_batch = max(1, batch_size // samples)
    done = outputs.done_problems(output_dir, bench.name, mode) if output_dir is not None else {}
    part = outputs.part_path(output_dir, bench.name, mode, shard, num_shards) if output_dir is not None else None
    batches = [b for b in range(math.ceil(len(records) / per_batch)) if b % num_shards == shard]
    results = [done[i] for b in batches for i in range(b * per_batch, min(len(records), (b + 1) * per_batch))
               if i in done]
    todo = [b for b in batches
            if any(i not in done for i in range(b * per_batch, min(len(records), (b + 1) * per_batch)))]
    timing = {"tokens": 0.0, "seconds": 0.0}
    for n, b in enumerate(tqdm(todo, desc=f"{bench.name} thinking {mode}", unit="batch", disable=not progress)):
        index = list(range(b * per_batch, min(len(records), (b + 1) * per_batch)))
        prompts = [tokenizer.apply_chat_template(*prompt_messages(bench, records[i], thinking, system)) for i in index]
        start = time.perf_counter()
        out = generate_samples(model, prompts, samples, max_new_tokens, seed=seed + b, **sampling)
        seconds = time.perf_counter() - start
        if n == 0 and len(todo) == 1:  # the only batch paid for compilation: time it again, warm
            start = time.perf_counter()
            generate_samples(model, prompts, samples, max_new_tokens, seed=seed + b, **sampling)
            seconds = time.perf_counter() - start
        if n > 0 or len(todo) == 1:
            timing["tokens"] += sum(len(o) for group in out for o in group)
            timing["seconds"] += seconds
        eos = set(tokenizer.eos_ids)
        texts = [[tokenizer.decode([t for t in o if t not in eos], skip_special_tokens=True) for o in group]
                 for group in out]
        flat_records = [records[i] for i in index for _ in range(samples)]
        grades = bench.grade_many([t for group in texts for t in group], flat_records, thinking)
        new = []
        for j, i in enumerate(index):
            if i in done:
                continue
            row = _problem_row(bench, i, records[i], mode, texts[j], [len(o) for o in out[j]],
                               grades[j * samples:(j + 1) * samples])
            new.append(row)
        if part is not None:
            outputs.append_jsonl(part, new)
        results += new
    results.sort(key=lambda r: r["index"])
    return results, timing


def summarize(bench: Benchmark, results: Sequence[dict[str, Any]], timing: dict[str, float] | None = None,
              ) -> dict[str, Any]:
    """One summary row: pass@1 (= accuracy, the mean score over all samples), maj@k, pass@k for
    k = 1, 2, 4, …, n, format and truncated rates, mean response tokens, decode tokens/s."""
    if not results:
        raise ValueError(f"{bench.name}: no graded problems to summarise")
    n = min(len(r["samples"]) for r in results)
    every = [s for r in results for s in r["samples"]]
    row: dict[str, Any] = {
        "benchmark": bench.name, "mode": results[0]["mode"], "examples": len(results), "samples": n,
        "accuracy": sum(r["pass@1"] for r in results) / len(results),
        "pass@1": sum(r["pass@1"] for r in results) / len(results),
        f"maj@{n}": (sum(r["maj"] for r in results) / len(results)) if bench.votes else None,
        "format_rate": sum(s["formatted"] for s in every) / len(every),
        "truncated_rate": sum(s["truncated"] for s in every) / len(every),
        "mean_response_tokens": sum(s["tokens"] for s in every) / len(every),
        "tokens_per_s": (timing["tokens"] / timing["seconds"]) if timing and timing["seconds"] else 0.0,
    }
    ks = sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})
    row["pass@k"] = {str(k): sum(pass_at_k(n, sum(s["score"] >= 1.0 for s in r["samples"][:n]), k)
                                 for r in results) / len(results) for k in ks}
    if bench.name == "ifeval":  # IFEval's four numbers; instruction level is over all instructions
        followed = [v for s in every for v in s["details"].get("followed", {}).values()]
        row["prompt_strict"] = sum(s["details"]["prompt_strict"] for s in every) / len(every)
        row["prompt_loose"] = sum(s["details"]["prompt_loose"] for s in every) / len(every)
        row["instruction_strict"] = sum(f[0] for f in followed) / len(followed) if followed else 0.0
        row["instruction_loose"] = sum(f[1] for f in followed) / len(followed) if followed else 0.0
    return row


COLUMNS = [("model", "model", "{}"), ("benchmark", "benchmark", "{}"), ("mode", "thinking", "{}"),
           ("examples", "problems", "{}"), ("samples", "k", "{}"), ("pass@1", "pass@1", "{:.3f}"),
           ("maj", "maj@k", "{:.3f}"), ("pass_k", "pass@k", "{:.3f}"), ("format_rate", "format", "{:.3f}"),
           ("truncated_rate", "truncated", "{:.3f}"), ("mean_response_tokens", "resp. tokens", "{:.1f}"),
           ("tokens_per_s", "decode tok/s", "{:.1f}")]


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown summary table, one row per benchmark × mode."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        k = row["samples"]
        view = {**row, "maj": row.get(f"maj@{k}"), "pass_k": row["pass@k"][str(k)]}
        lines.append("| " + " | ".join("-" if view.get(key) is None else fmt.format(view[key])
                                       for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)
