"""Hugging Face safetensors checkpoints <-> our parameter tree, one tensor at a time.

Loading never materialises a whole checkpoint: every parameter is built with
`jax.make_array_from_callback`, which asks for exactly the slices each local device holds, and
those slices are read lazily from the safetensors file (`get_slice`). So a 253B checkpoint restores
straight into its shards on a pod, and into one array per tensor on a laptop. Saving writes one
shard file at a time into a temporary directory renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import CheckpointError
from nemotron_jax.fileio import atomic_dir

Layout = Literal["same", "transpose", "heads_in", "heads_out"]
SHARD_BYTES = 4 * 1024**3


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in our tree.

    layout: `same` (identical), `transpose` (torch Linear [out, in] -> [in, out]), `heads_in`
    (q/k/v: [heads*H, D] -> [D, heads, H]) or `heads_out` (o: [D, N*H] -> [N, H, D]).
    """

    hf_name: str
    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    layout: Layout
    heads: int = 0  # for heads_in / heads_out: how many heads the fused axis holds

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.hf_shape
        if self.layout == "same":
            return s
        if self.layout == "transpose":
            return (s[1], s[0])
        if self.layout == "heads_in":
            return (s[1], self.heads, s[0] // self.heads)
        return (self.heads, s[1] // self.heads, s[0])

    def read(self, tensor: Any, index: tuple[slice, ...]) -> np.ndarray:
        """Our-layout slice `index` read from a lazily sliceable HF tensor."""
        shape = self.shape
        idx = [slice(*s.indices(n)) for s, n in zip(index, shape, strict=True)]
        if self.layout == "same":
            return tensor[tuple(idx)]
        if self.layout == "transpose":
            return tensor[idx[1], idx[0]].T
        if self.layout == "heads_in":
            d, n, h = idx
            head_dim = shape[2]
            rows = slice(n.start * head_dim, n.stop * head_dim)
            block = tensor[rows, d].T.reshape(d.stop - d.start, n.stop - n.start, head_dim)
            return block[:, :, h]
        n, h, d = idx
        head_dim = shape[1]
        cols = slice(n.start * head_dim, n.stop * head_dim)
        block = tensor[d, cols].T.reshape(n.stop - n.start, head_dim, d.stop - d.start)
        return block[:, h, :]

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.layout == "same":
            return ours
        if self.layout == "transpose":
            return np.ascontiguousarray(ours.T)
        if self.layout == "heads_in":
            return np.ascontiguousarray(ours.reshape(ours.shape[0], -1).T)
        return np.ascontiguousarray(ours.reshape(-1, ours.shape[-1]).T)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor an HF checkpoint of `cfg` must hold, in file order."""
    d, v, n, h = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.head_dim
    specs: list[TensorSpec] = [TensorSpec("model.embed_tokens.weight", ("embed",), (v, d), "same")]

    def add(name: str, path: tuple, hf_shape: tuple, layout: Layout, heads: int = 0) -> None:
        specs.append(TensorSpec(name, path, hf_shape, layout, heads))

    for i, block in enumerate(cfg.blocks):
        pre, att, ffn = f"model.layers.{i}.", block.attention, block.ffn
        if att.kind != "none":
            add(pre + "input_layernorm.weight", ("layers", i, "attention", "norm", "weight"), (d,), "same")
        if att.kind == "gqa":
            k = att.num_kv_heads
            for name, heads in (("q", n), ("k", k), ("v", k)):
                add(f"{pre}self_attn.{name}_proj.weight", ("layers", i, "attention", name), (heads * h, d),
                    "heads_in", heads)
            add(f"{pre}self_attn.o_proj.weight", ("layers", i, "attention", "o"), (d, n * h), "heads_out", n)
        elif att.kind == "linear":
            add(f"{pre}self_attn.linear_attn.weight", ("layers", i, "attention", "kernel"), (d, d), "transpose")
        if ffn.kind != "none":
            add(pre + "post_attention_layernorm.weight", ("layers", i, "ffn", "norm", "weight"), (d,), "same")
        if ffn.kind == "swiglu":
            f = ffn.intermediate_size
            add(f"{pre}mlp.gate_proj.weight", ("layers", i, "ffn", "gate"), (f, d), "transpose")
            add(f"{pre}mlp.up_proj.weight", ("layers", i, "ffn", "up"), (f, d), "transpose")
            add(f"{pre}mlp.down_proj.weight", ("layers", i, "ffn", "down"), (d, f), "transpose")
        elif ffn.kind == "linear":
            add(f"{pre}mlp.linear_mlp.weight", ("layers", i, "ffn", "kernel"), (d, d), "transpose")
    add("model.norm.weight", ("final_norm", "weight"), (d,), "same")
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", ("lm_head",), (v, d), "transpose")
    return specs


# ---------------------------------------------------------------- reading


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {file.name}, which does not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(single, "numpy") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as e:  # truncated or not safetensors: one clear error, not a traceback
            raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path}: holds only pickle (.bin/.pt) weights, which are unsafe to load; "
                              "convert them to safetensors first (e.g. transformers' save_pretrained("
                              "safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_hf_params(path: str | Path, cfg: ModelConfig, shardings: dict[tuple, Any], dtype: jnp.dtype,
                   ) -> dict[tuple, jax.Array]:
    """Our-path -> array for every tensor of `cfg`, each built directly into `shardings[path]`."""
    path = Path(path)
    files = _weight_files(path)
    specs = tensor_specs(cfg)
    expected = {s.hf_name for s in specs}
    missing = sorted(expected - set(files))
    unexpected = sorted(n for n in set(files) - expected if not n.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {_few(missing)} (the config expects them)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {_few(unexpected)} (not in the config)")
    out: dict[tuple, jax.Array] = {}
    with _OpenFiles() as handles:
        for spec in tqdm(specs, desc=f"loading {path.name}", unit="tensor", leave=False,
                         disable=len(specs) < 64):
            try:
                tensor = handles.get(files[spec.hf_name]).get_slice(spec.hf_name)
            except SafetensorError as e:  # e.g. an index naming the wrong shard for a tensor
                raise CheckpointError(f"{files[spec.hf_name]}: cannot read tensor {spec.hf_name} ({e})") from None
            shape = tuple(tensor.get_shape())
            if shape != spec.hf_shape:
                raise CheckpointError(f"{path}: tensor {spec.hf_name} has shape {shape}, "
                                      f"expected {spec.hf_shape} from the config")

            def cb(index: tuple[slice, ...], spec: TensorSpec = spec, tensor: Any = tensor) -> np.ndarray:
                return np.asarray(spec.read(tensor, index)).astype(dtype)

            out[spec.path] = jax.make_array_from_callback(spec.shape, shardings[spec.path], cb)
    return out


class _OpenFiles:
    """Keeps each shard file open once while its tensors are read."""

    def __enter__(self) -> _OpenFiles:
        self._handles: dict[Path, Any] = {}
        return self

    def get(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(file, "numpy").__enter__()
        return self._handles[file]

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# ---------------------------------------------------------------- writing


def write_hf(path: str | Path, cfg: ModelConfig, params: dict[tuple, jax.Array],
             format: Literal["decilm", "llama"] = "decilm", shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json + safetensors (sharded with an index when large); atomic on success."""
    hf_config = cfg.to_hf(format)  # validates the layout before anything is written
    specs = tensor_specs(cfg)
    dtype = jnp.dtype(cfg.torch_dtype)
    shards = list(_group_by_size(specs, shard_bytes))
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        total = 0
        for k, group in enumerate(tqdm(shards, desc=f"writing {Path(path).name}", unit="shard", leave=False,
                                       disable=len(shards) < 2)):
            name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {s.hf_name: s.to_hf(_host(params[s.path]).astype(dtype)) for s in group}
            total += sum(t.nbytes for t in tensors.values())
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in tensors})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _group_by_size(specs: list[TensorSpec], limit: int) -> Iterator[list[TensorSpec]]:
    group: list[TensorSpec] = []
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * 4
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(spec)
        size += nbytes
    if group:
        yield group


def _host(x: jax.Array) -> np.ndarray:
    """The full array on this host (gathered across processes when sharded over several)."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
