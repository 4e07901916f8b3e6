"""Packing variable-length examples into fixed-length rows, and the Grain dataset that does it.

A row of length T holds several examples back to back. Per token it carries:

    inputs_T       token ids fed to the model
    targets_T      the next token of the same example (what is predicted)
    weights_T      1.0 where the target counts in the loss (the example's loss mask), else 0.0
    positions_T    position within its own example: restarts at 0 for every segment
    segment_ids_T  1, 2, ... per example in the row; 0 marks padding

Attention masks by segment and position, so each example sees only itself and a packed row gives
exactly the logits of its examples run alone. Rows are built window by window (first-fit
decreasing over `window` consecutive examples), which makes the iterator state two integers
(window, row) and resume exact: a window is re-packed identically from its examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

Row = dict[str, np.ndarray]
ROW_FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")


class Example(NamedTuple):
    """One tokenised example: ids [L] and a loss mask [L] (True where token i is a target)."""

    tokens: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass
class PackStats:
    """Counts for reporting: `efficiency` is the fraction of row slots holding real tokens."""

    examples: int = 0
    rows: int = 0
    tokens: int = 0
    slots: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    def add(self, other: PackStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def shift(example: Example, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(inputs, targets, weights, truncated): next-token pairs, cut to at most `seq_len`."""
    tokens = np.asarray(example.tokens, np.int32)
    mask = np.asarray(example.loss_mask, bool)
    inputs, targets, weights = tokens[:-1], tokens[1:], mask[1:]
    truncated = len(inputs) > seq_len
    return inputs[:seq_len], targets[:seq_len], weights[:seq_len], truncated


def pack(examples: Sequence[Example], seq_len: int, rows_seed: int | None = None) -> tuple[list[Row], PackStats]:
    """First-fit-decreasing packing of `examples` into rows of `seq_len` tokens.

    Examples longer than `seq_len + 1` tokens are truncated; examples with no loss token left are
    dropped (they would only cost compute). With `rows_seed`, the rows are returned in a seeded
    random order so that long examples are not always first.
    """
    stats = PackStats(examples=len(examples))
    pieces = []
    for ex in examples:
        inputs, targets, weights, truncated = shift(ex, seq_len)
        stats.truncated += truncated
        if not weights.any():
            stats.dropped += 1
            continue
        pieces.append((inputs, targets, weights))
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(pieces[i][0])
        for b, room in enumerate(free):
            if room >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    rows = [_fill(seq_len, [pieces[i] for i in members]) for members in bins]
    if rows_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(rows_seed).permutation(len(rows))]
    stats.rows, stats.slots = len(rows), len(rows) * seq_len
    stats.tokens = sum(len(p[0]) for p in pieces)
    return rows, stats


def empty_row(seq_len: int) -> Row:
    """A row of padding only (segment id 0, zero weight): fills out a short final batch."""
    return _fill(seq_len, [])


def _fill(seq_len: int, pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Row:
    row = {name: np.zeros(seq_len, np.float32 if name == "weights" else np.int32) for name in ROW_FIELDS}
    start = 0
    for segment, (inputs, targets, weights) in enumerate(pieces, start=1):
        stop = start + len(inputs)
        row["inputs"][start:stop] = inputs
        row["targets"][start:stop] = targets
        row["weights"][start:stop] = weights
        row["positions"][start:stop] = np.arange(len(inputs))
        row["segment_ids"][start:stop] = segment
        start = stop
    return row


class PackedDataset(grain.IterDataset):
    """Rows packed from a MapDataset of `Example`s, `window` examples at a time.

    The parent may be infinite (a repeated training set) or finite (an eval set, which then ends).
    """

    def __init__(self, parent: grain.MapDataset, seq_len: int, window: int = 256, seed: int = 0):
        super().__init__(parent)
        if seq_len < 1 or window < 1:
            raise ValueError(f"seq_len and window must be positive, got {seq_len} and {window}")
        self.examples, self.seq_len, self.window, self.seed = parent, seq_len, window, seed

    def __iter__(self) -> PackedIterator:
        return PackedIterator(self)


class PackedIterator(grain.DatasetIterator):
    """Iterator whose state is {window, row} plus running packing counts (for reporting)."""

    def __init__(self, dataset: PackedDataset):
        super().__init__()
        self._ds = dataset
        self._window, self._row = 0, 0
        self._rows: list[Row] | None = None
        self.stats = PackStats()

    def _load(self) -> None:
        ds = self._ds
        start = self._window * ds.window
        stop = min(start + ds.window, len(ds.examples))
        if start >= stop:
            raise StopIteration
        self._rows, stats = pack([ds.examples[i] for i in range(start, stop)], ds.seq_len,
                                 rows_seed=ds.seed * 1_000_003 + self._window)
        if self._row == 0:  # count each window once, not again when resuming inside it
            self.stats.add(stats)

    def __next__(self) -> Row:
        while True:
            if self._rows is None:
                self._load()
            if self._row < len(self._rows):
                self._row += 1
                return self._rows[self._row - 1]
            self._window, self._row, self._rows = self._window + 1, 0, None

    def get_state(self) -> dict[str, Any]:
        return {"window": self._window, "row": self._row,
                "stats": dataclasses.asdict(self.stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._window, self._row, self._rows = int(state["window"]), int(state["row"]), None
        self.stats = PackStats(**state.get("stats", {}))
