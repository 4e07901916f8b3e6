"""Writing output directories so that a failure never leaves half of one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nemotron_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `path` only if the block succeeds.

    In a multi-process job every process must enter together (as for an Orbax save): they share
    one temporary directory, and process 0 renames it once all of them have finished writing."""
    import jax

    from nemotron_jax.distributed import barrier

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: output exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    multi, primary = jax.process_count() > 1, jax.process_index() == 0
    if multi:
        tmp = path.parent / f".{path.name}.tmp"
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(f"atomic_dir start {path}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        yield tmp
        barrier(f"atomic_dir written {path}")
        if primary:
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        barrier(f"atomic_dir renamed {path}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file via a temporary sibling and a rename: readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: hosts may write the same file
    tmp.write_text(text)
    os.replace(tmp, path)
