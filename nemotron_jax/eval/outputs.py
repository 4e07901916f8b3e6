"""Evaluation outputs on disk: append-only JSONL part files (one per host) that survive a kill, and
the merged responses and summary written atomically by process 0.

A killed run leaves at most a torn last line, which `read_jsonl` ignores and `append_jsonl`
terminates before writing, so re-running resumes from the problems already graded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nemotron_jax.fileio import atomic_write_text


def part_path(out_dir: str | Path, benchmark: str, mode: str, shard: int, num_shards: int) -> Path:
    return Path(out_dir) / f"{benchmark}.{mode}.part-{shard:05d}-of-{num_shards:05d}.jsonl"


def merged_path(out_dir: str | Path, benchmark: str, mode: str) -> Path:
    return Path(out_dir) / f"{benchmark}.{mode}.responses.jsonl"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file ([] when absent); a torn or corrupt line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows, each one line, flushed and fsynced (after ending a torn last line, if any)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
    if not data:
        return
    with path.open("ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def done_problems(out_dir: str | Path, benchmark: str, mode: str) -> dict[int, dict[str, Any]]:
    """Every graded problem of (benchmark, mode) found in the directory's part and merged files."""
    out_dir = Path(out_dir)
    found: dict[int, dict[str, Any]] = {}
    paths = [*sorted(out_dir.glob(f"{benchmark}.{mode}.part-*.jsonl")), merged_path(out_dir, benchmark, mode)]
    for path in paths:
        for row in read_jsonl(path):
            if row.get("benchmark") == benchmark and row.get("mode") == mode and isinstance(row.get("index"), int):
                found.setdefault(row["index"], row)
    return found


def merge(out_dir: str | Path, benchmark: str, mode: str, indices: Sequence[int]) -> list[dict[str, Any]] | None:
    """The problems `indices` in order, written to the merged file, or None while some are missing
    (another host has not finished)."""
    found = done_problems(out_dir, benchmark, mode)
    if any(i not in found for i in indices):
        return None
    rows = [found[i] for i in indices]
    atomic_write_text(merged_path(out_dir, benchmark, mode),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
