"""Orbax save/restore of parameter dicts, restoring straight into the requested shardings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from nemotron_jax.errors import CheckpointError

FlatPath = tuple[str | int, ...]


def nest(flat: dict[FlatPath, Any]) -> dict[str, Any]:
    """Flat paths as the nested string-keyed tree Orbax saves."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def unnest(tree: dict[str, Any], paths: list[FlatPath]) -> dict[FlatPath, Any]:
    """The leaves at `paths` of a nested tree as Orbax restores it."""
    out = {}
    for path in paths:
        node = tree
        for key in path:
            node = node[str(key)]
        out[path] = node
    return out


def save_params(path: Path, params: dict[FlatPath, jax.Array]) -> None:
    """Write params with Orbax (every process writes its own shards)."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path.absolute(), nest(params))
        ckpt.wait_until_finished()


def restore_params(path: Path, shapes: dict[FlatPath, jax.ShapeDtypeStruct]) -> dict[FlatPath, jax.Array]:
    """Read params saved by `save_params` into the shardings and dtypes given by `shapes`."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no Orbax parameter directory")
    with ocp.StandardCheckpointer() as ckpt:
        try:
            tree = ckpt.restore(path.absolute(), nest(shapes))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{path}: parameters do not match the saved config ({e})") from None
    return unnest(tree, list(shapes))
