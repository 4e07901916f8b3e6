"""The data pipeline: source -> examples -> host shard -> shuffle by seed -> repeat -> pack -> batch.

Everything is a Grain `MapDataset` up to packing (random access, so shuffling is an index
permutation by seed and costs no buffer), then a `PackedDataset` (`IterDataset`) and a batch.
The iterator's state is a few integers, saved with every checkpoint: resuming replays the same
rows in the same order. Each host reads the records `shard_index::shard_count` and makes its
own `batch_size / shard_count` rows.

Held-out evaluation data is either `eval_path` or the first `eval_examples` records of `path`
(those are then excluded from training).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import grain
import jax

from nemotron_jax.data import synthetic
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.data.examples import ExampleFormat, Kind, Reasoning, checker, make_example
from nemotron_jax.data.packing import PackedDataset, PackStats, empty_row, pack
from nemotron_jax.data.sources import open_source, skip_summary
from nemotron_jax.errors import DataError
from nemotron_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes batches of packed rows.

    `path`: files/globs (.jsonl/.json/.parquet, comma-separated) relative to the working
    directory, `tfds:NAME:SPLIT`, or `synthetic:KIND` (`text`, `gsm8k`, `arith`, ...:
    `data.synthetic.GENERATORS`): `synthetic_examples` records generated once under
    `{output_dir}/data/`. Synthetic data is used only when `path` asks for it; a path that does
    not exist is an error naming it.
    `batch_size` is the global number of rows per step; `max_examples` keeps only the first N
    training records (a small slice).
    """

    path: str = ""
    eval_path: str | None = None
    eval_examples: int = 0
    max_examples: int | None = None
    format: Kind = "auto"
    text_field: str = "text"
    reasoning: Reasoning = "auto"
    tokenizer: str = "tiny"
    seq_len: int = 512
    batch_size: int = 8
    pack_window: int = 256
    shuffle: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    synthetic_examples: int = 512


def resolve_path(cfg: DataConfig, output_dir: str | Path) -> str:
    """The data path to read (synthetic data generated first when `path` is `synthetic:KIND`)."""
    if not cfg.path:
        raise DataError("data.path is empty: set it to data files, tfds:NAME:SPLIT or synthetic:KIND "
                        "(e.g. data.path=synthetic:gsm8k)")
    kind = synthetic.kind_of(cfg.path)
    out = Path(output_dir) / "data" / f"synthetic-{kind}.jsonl"
    return synthetic.materialize(cfg.path, out, cfg.synthetic_examples)


class DataPipeline:
    """Train iterator and eval batches for one host."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, seed: int, path: str | None = None,
                 shard_index: int | None = None, shard_count: int | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.shard_count = jax.process_count() if shard_count is None else shard_count
        if cfg.batch_size % self.shard_count:
            raise DataError(f"data.batch_size={cfg.batch_size} must divide evenly over {self.shard_count} hosts")
        self.rows = cfg.batch_size // self.shard_count
        fmt = ExampleFormat(cfg.format, cfg.text_field, cfg.reasoning)
        path = path or cfg.path
        source = open_source(path, cfg.on_error, checker(fmt))
        self.messages = [m for m in [skip_summary(source)] if m]
        records = grain.MapDataset.source(source)
        if cfg.eval_path:
            eval_source = open_source(cfg.eval_path, cfg.on_error, checker(fmt))
            self.messages += [m for m in [skip_summary(eval_source)] if m]
            eval_records = grain.MapDataset.source(eval_source)
        else:
            if cfg.eval_examples >= len(records):
                raise DataError(f"{path}: data.eval_examples={cfg.eval_examples} leaves no training records "
                                f"(the data has {len(records)})")
            eval_records, records = records[:cfg.eval_examples], records[cfg.eval_examples:]
        if cfg.max_examples is not None:
            records = records[:cfg.max_examples]
        to_example = lambda i, r: make_example(tokenizer, fmt, r, i)
        self.train_examples = records.map_with_index(to_example)
        self.eval_examples = eval_records.map_with_index(to_example)
        shard = self.train_examples[self.shard_index::self.shard_count]
        if len(shard) == 0:
            raise DataError(f"{path}: no training records for host {self.shard_index} of {self.shard_count}")
        if cfg.shuffle:
            shard = shard.shuffle(seed=seed)
        self.dataset = PackedDataset(shard.repeat(), cfg.seq_len, cfg.pack_window, seed).batch(
            self.rows, drop_remainder=True).map(lambda rows: TokenBatch(**rows))

    def train_iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        """An endless iterator of local batches, positioned at `state` when given."""
        it = iter(self.dataset)
        if state is not None:
            it.set_state(state)
        return it

    def eval_batches(self, max_batches: int | None = None) -> list[TokenBatch]:
        """The held-out examples of this host, packed and batched; the last batch is padded with
        empty rows (weights 0). Empty when there is no held-out data."""
        examples = self.eval_examples[self.shard_index::self.shard_count]
        rows, _ = pack([examples[i] for i in range(len(examples))], self.cfg.seq_len)
        batches = []
        for start in range(0, len(rows), self.rows):
            chunk = rows[start:start + self.rows]
            chunk += [empty_row(self.cfg.seq_len) for _ in range(self.rows - len(chunk))]
            batches.append(TokenBatch.stack(chunk))
        return batches[:max_batches] if max_batches else batches

    @staticmethod
    def packing_stats(iterator: grain.DatasetIterator) -> PackStats:
        return PackStats(**iterator.get_state()["stats"])


