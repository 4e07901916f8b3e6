"""Where records come from: JSONL / JSON-lines files and globs, Parquet, and TFDS, as Grain sources.

Each source is a Grain `RandomAccessDataSource` (`__len__`, `__getitem__`) of dict records.
Local files are scanned once when opened: every line is parsed and handed to an optional `check`
so that a bad record is reported by file and line number before training starts (or, with
`on_error="skip"`, counted, skipped and summarised) instead of crashing a run hours later.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nemotron_jax.data import synthetic
from nemotron_jax.errors import DataError

Record = dict[str, Any]
Check = Callable[[Record], None]  # raises ValueError(reason) for a record it cannot use
OnError = Literal["raise", "skip"]


class _Skips:
    """Bad records seen while opening a source: a count and the first few reasons."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def _handle(where: str, reason: str, on_error: OnError, skips: _Skips) -> None:
    if on_error == "raise":
        raise DataError(f"{where}: {reason} (set data.on_error=skip to skip bad records)")
    skips.add(where, reason)


def _checked(record: Any, check: Check | None) -> Record:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if check is not None:
        check(record)
    return record


class JsonlSource:
    """JSON-lines files; keeps only byte offsets of the good lines and re-parses on access."""

    def __init__(self, paths: Sequence[Path], on_error: OnError = "raise", check: Check | None = None):
        self.paths = [Path(p) for p in paths]
        self.skips = _Skips()
        self.total = 0
        file_ids, offsets = [], []
        for i, path in enumerate(self.paths):
            with path.open("rb") as f:
                offset = 0
                for line_no, line in enumerate(f, start=1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    self.total += 1
                    where = f"{path}:{line_no}"
                    try:
                        _checked(json.loads(line), check)
                    except json.JSONDecodeError as e:
                        _handle(where, f"not valid JSON ({e.msg} at column {e.colno})", on_error, self.skips)
                        continue
                    except (ValueError, TypeError, KeyError) as e:
                        _handle(where, str(e), on_error, self.skips)
                        continue
                    file_ids.append(i)
                    offsets.append(start)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Record:
        with self.paths[self._file_ids[index]].open("rb") as f:
            f.seek(int(self._offsets[index]))
            return json.loads(f.readline())

    def __repr__(self) -> str:
        return f"JsonlSource({[str(p) for p in self.paths]}, {len(self)} records)"


class ParquetSource:
    """Parquet files read into one Arrow table; rows come back as dicts."""

    def __init__(self, paths: Sequence[Path], on_error: OnError = "raise", check: Check | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.paths = [Path(p) for p in paths]
        self.skips = _Skips()
        tables, self.total = [], 0
        for path in self.paths:
            try:
                table = pq.read_table(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            keep = []
            for row, record in enumerate(table.to_pylist()):
                self.total += 1
                try:
                    _checked(record, check)
                    keep.append(row)
                except (ValueError, TypeError, KeyError) as e:
                    _handle(f"{path}: row {row}", str(e), on_error, self.skips)
            tables.append(table.take(keep) if len(keep) != table.num_rows else table)
        self._table = pa.concat_tables(tables, promote_options="default") if tables else None

    def __len__(self) -> int:
        return 0 if self._table is None else self._table.num_rows

    def __getitem__(self, index: int) -> Record:
        return self._table.slice(int(index), 1).to_pylist()[0]

    def __repr__(self) -> str:
        return f"ParquetSource({[str(p) for p in self.paths]}, {len(self)} records)"


class TfdsSource:
    """A TFDS dataset through `tfds.data_source` (random access, no TensorFlow graph); bytes -> str.

    Records are not pre-scanned (TFDS datasets are large); `check` runs on access instead.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, check: Check | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError(f"tfds:{name}:{split} needs tensorflow_datasets; install it with "
                            "`pip install tensorflow-datasets` or use a JSONL/Parquet path") from None
        self.name, self.split, self.check = name, split, check
        self.skips, self.total = _Skips(), 0
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # TFDS raises many types for a missing dataset or split
            raise DataError(f"tfds:{name}:{split}: cannot open ({e})") from None
        self.total = len(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        record = {k: v.decode() if isinstance(v, bytes) else v for k, v in dict(self._source[index]).items()}
        try:
            return _checked(record, self.check)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"tfds:{self.name}:{self.split}[{index}]: {e}") from None

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}:{self.split}, {len(self)} records)"


class ConcatSource:
    """Several sources read as one, in order."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources])
        self.total = sum(s.total for s in self.sources)

    @property
    def skips(self) -> _Skips:
        merged = _Skips()
        for s in self.sources:
            merged.count += s.skips.count
            merged.examples.extend(s.skips.examples[:5 - len(merged.examples)])
        return merged

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> Record:
        i = int(np.searchsorted(self._ends, index, side="right"))
        return self.sources[i][index - (int(self._ends[i - 1]) if i else 0)]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources})"


def expand_paths(spec: str) -> list[Path]:
    """Comma-separated paths and globs, each glob sorted, in the order given."""
    out: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part, recursive=True)) if glob.has_magic(part) else [part]
        if not matches or not all(Path(m).is_file() for m in matches):
            missing = part if not matches else next(m for m in matches if not Path(m).is_file())
            raise DataError(f"{missing}: no such data file")
        out.extend(Path(m) for m in matches)
    if not out:
        raise DataError(f"data path {spec!r} names no files")
    return out


def open_source(spec: str, on_error: OnError = "raise", check: Check | None = None) -> Any:
    """A source from `spec`: `tfds:NAME:SPLIT`, or files/globs ending .jsonl/.json/.parquet.

    Raises DataError when nothing usable is left (no files, or every record empty or bad).
    """
    if spec.startswith("tfds:"):
        name, _, split = spec[5:].rpartition(":")
        if not name:
            raise DataError(f"{spec}: expected tfds:NAME:SPLIT, e.g. tfds:gsm8k:train")
        source: Any = TfdsSource(name, split, check=check)
    else:
        parts = []
        for path in expand_paths(spec):
            if path.suffix in (".jsonl", ".json", ".ndjson"):
                parts.append(JsonlSource([path], on_error, check))
            elif path.suffix == ".parquet":
                parts.append(ParquetSource([path], on_error, check))
            else:
                raise DataError(f"{path}: unknown data file type {path.suffix!r} "
                                "(expected .jsonl, .json, .parquet or tfds:NAME:SPLIT)")
        source = parts[0] if len(parts) == 1 else ConcatSource(parts)
    if len(source) == 0:
        why = f" ({source.skips.count} bad records skipped)" if source.skips.count else ""
        raise DataError(f"{spec}: no usable records{why}")
    return source


def skip_summary(source: Any) -> str | None:
    """One line about the records skipped while opening `source`, or None when none were."""
    skips = source.skips
    if not skips.count:
        return None
    return (f"skipped {skips.count} of {source.total} records as malformed; first: "
            + "; ".join(skips.examples))


def eval_records(spec: str, limit: int | None = None, seed: int = 0, check: Check | None = None) -> list[Record]:
    """Records to evaluate on: `synthetic:KIND` is `limit` (default 256) problems of that task's
    held-out split (never generated for training); anything else is opened as a source (records
    checked by `check`) and its first `limit` records are read."""
    kind = synthetic.kind_of(spec)
    if kind is not None:
        return synthetic.heldout_records(kind, 256 if limit is None else limit, seed)
    source = open_source(spec, check=check)
    return [source[i] for i in range(len(source) if limit is None else min(limit, len(source)))]
