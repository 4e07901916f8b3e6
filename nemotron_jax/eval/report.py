"""Evaluation tables (markdown) and the side-by-side plot of a pipeline's models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = [("model", "model", "{}"), ("mode", "thinking", "{}"), ("accuracy", "accuracy", "{:.3f}"),
           ("format_rate", "format", "{:.3f}"), ("mean_response_tokens", "resp. tokens", "{:.1f}"),
           ("tokens_per_s", "decode tok/s", "{:.1f}"), ("kv_cache_bytes_per_token", "KV B/token", "{:,}"),
           ("engine_tokens_per_s", "serving tok/s", "{:.1f}"), ("engine_speedup", "serving ×", "{:.2f}"),
           ("params", "params", "{:,}")]


def format_table(rows: Sequence[dict[str, Any]], loss: dict[str, float] | None = None) -> str:
    """A markdown table, one row per model and mode (plus the loss line when measured)."""
    lines = []
    if rows:
        lines.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(fmt.format(row[key]) if key in row else "—" for key, _, fmt in COLUMNS) + " |"
                  for row in rows]
    if loss:
        lines.append(f"\nloss {loss['loss']:.4f}, perplexity {loss['perplexity']:.2f} over {loss['tokens']:,} tokens")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Bars of accuracy per model (thinking on / off) beside decode speed: the paper's trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for k, mode in enumerate(("on", "off")):
        acc = [next((r["accuracy"] for r in rows if r["model"] == m and r["mode"] == mode), 0.0) for m in models]
        ax_acc.bar([i + (k - 0.5) * width for i in range(len(models))], acc, width, label=f"thinking {mode}")
    ax_acc.set_xticks(range(len(models)), models, rotation=20)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    key = "engine_tokens_per_s" if all("engine_tokens_per_s" in r for r in rows) else "tokens_per_s"
    speed = [max((r[key] for r in rows if r["model"] == m), default=0.0) for m in models]
    ax_speed.bar(range(len(models)), speed, color="tab:green")
    ax_speed.set_xticks(range(len(models)), models, rotation=20)
    ax_speed.set_ylabel("serving tokens/s (engine)" if key == "engine_tokens_per_s" else "decode tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(path: str | Path, key: str = "accuracy") -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl that carry `key`."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if key in r]


def quarter_means(rows: Sequence[dict[str, Any]], key: str = "accuracy") -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the rows (the GRPO learning check)."""
    q = max(1, len(rows) // 4)
    mean = lambda rs: sum(r[key] for r in rs) / len(rs)
    return mean(rows[:q]), mean(rows[-q:])


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", window: int = 10) -> None:
    """RL curves per iteration (raw and a `window`-iteration moving average): accuracy per mode
    (rollouts, and held-out problems where measured), reward, format compliance per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = (("accuracy", "accuracy_on", "accuracy_off", "heldout_accuracy_on", "heldout_accuracy_off"),
              ("reward_mean",), ("format_rate_on", "format_rate_off"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
    for ax, keys in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            x, y = np.asarray(pts, dtype=float).T
            if key.startswith("heldout"):  # a few evaluations: points joined, no smoothing
                ax.plot(x, y, "o--", label=key)
                continue
            line, = ax.plot(x, y, alpha=0.25)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) >= window else y
            ax.plot(x[len(x) - len(smooth):], smooth, color=line.get_color(), label=key)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
