"""Saving and loading a block library: `manifest.json` (what each candidate is) + Orbax weights.

    library/manifest.json   parent config, and per layer and slot the candidates:
                            {name, variant, origin, bld_loss, shapes}
    library/params/         Orbax tree keyed layer / slot / name / weight path

Written atomically (temp dir renamed into place), so a directory that exists is complete.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.checkpoint import restore_params, save_params
from nemotron_jax.config import AttentionConfig, FFNConfig, ModelConfig
from nemotron_jax.errors import CheckpointError
from nemotron_jax.fileio import atomic_dir
from nemotron_jax.puzzle.library import Candidate, Library

MANIFEST = "manifest.json"


def _variant_dict(c: Candidate) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(c.variant).items() if v is not None}


def save_library(path: str | Path, library: Library) -> None:
    flat: dict[tuple[str, ...], np.ndarray] = {}
    layers = []
    for i, layer in enumerate(library.layers):
        entry: dict[str, list[dict[str, Any]]] = {}
        for kind in ("attention", "ffn"):
            entry[kind] = []
            for c in layer[kind].values():
                entry[kind].append({"name": c.name, "variant": _variant_dict(c), "origin": c.origin,
                                    "bld_loss": c.bld_loss,
                                    "shapes": {"/".join(p): list(np.shape(v)) for p, v in c.params.items()}})
                for p, v in c.params.items():
                    flat[(str(i), kind, c.name, *p)] = np.asarray(v)
        layers.append(entry)
    manifest = {"parent": library.parent.to_dict(), "layers": layers}
    with atomic_dir(path) as tmp:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if flat:
            save_params(tmp / "params", {k: jnp.asarray(v) for k, v in flat.items()})


def load_library(path: str | Path) -> Library:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path}: not a block library (no {MANIFEST})")
    manifest = json.loads(file.read_text())
    parent = ModelConfig.from_dict(manifest["parent"], where=str(file))
    shapes: dict[tuple[str, ...], jax.ShapeDtypeStruct] = {}
    for i, entry in enumerate(manifest["layers"]):
        for kind in ("attention", "ffn"):
            for c in entry[kind]:
                for p, shape in c["shapes"].items():
                    shapes[(str(i), kind, c["name"], *p.split("/"))] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    flat = restore_params(path / "params", shapes) if shapes else {}
    layers = []
    for i, entry in enumerate(manifest["layers"]):
        out: dict[str, dict[str, Candidate]] = {}
        for kind, cls in (("attention", AttentionConfig), ("ffn", FFNConfig)):
            out[kind] = {}
            for c in entry[kind]:
                params = {tuple(p.split("/")): np.asarray(flat[(str(i), kind, c["name"], *p.split("/"))])
                          for p in c["shapes"]}
                out[kind][c["name"]] = Candidate(cls(**c["variant"]), params, c["origin"], c["bld_loss"])
        layers.append(out)
    return Library(parent, layers)
