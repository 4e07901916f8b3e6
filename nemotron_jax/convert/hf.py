"""Hugging Face safetensors checkpoints <-> our parameter tree, one tensor at a time.

Loading never materialises a whole checkpoint: every parameter is built with
`jax.make_array_from_callback`, which asks for exactly the slices each local device holds, and
those slices are read from the safetensors file with `pread` (only the rows asked for). So a 253B
checkpoint restores straight into its shards on a pod, and into one array per tensor on a laptop.
Saving streams: each shard file's header first, then its tensors one group at a time, into a
temporary directory renamed into place only when complete. `hf_to_saved` / `saved_to_hf` convert
between HF and `Model.save` directories holding only a few hundred MB at once (`nemotron-jax convert`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemotron_jax.checkpoint import nest, unnest
from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import CheckpointError
from nemotron_jax.fileio import atomic_dir

TensorLayout = Literal["same", "transpose", "heads_in", "heads_out"]
SHARD_BYTES = 4 * 1024**3
READ_BYTES = 256 * 1024**2  # how much a streaming conversion holds at once (plus one tensor)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in our tree.

    layout: `same` (identical), `transpose` (torch Linear [out, in] -> [in, out]), `heads_in`
    (q/k/v: [heads*H, D] -> [D, heads, H]) or `heads_out` (o: [D, N*H] -> [N, H, D]).
    """

    hf_name: str
    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    layout: TensorLayout
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

    def add(name: str, path: tuple, hf_shape: tuple, layout: TensorLayout, heads: int = 0) -> None:
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
        f = _SafetensorsFile(single)  # truncated or not safetensors: one clear CheckpointError
        f.close()
        return dict.fromkeys((k for k in f.header if k != "__metadata__"), single)
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise CheckpointError(f"{path}: holds only pickle (.bin/.pt) weights, which are unsafe to load; "
                              "convert them to safetensors first (e.g. transformers' save_pretrained("
                              "safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_hf_params(path: str | Path, cfg: ModelConfig, shardings: dict[tuple, Any], dtype: jnp.dtype,
                   ) -> dict[tuple, jax.Array]:
    """Our-path -> array for every tensor of `cfg`, each built directly into `shardings[path]`."""
    out: dict[tuple, jax.Array] = {}
    for group in iter_hf_params(path, cfg, shardings, dtype, group_bytes=None):
        out.update(group)
    return out


def iter_hf_params(path: str | Path, cfg: ModelConfig, shardings: dict[tuple, Any], dtype: jnp.dtype,
                   group_bytes: int | None = READ_BYTES) -> Iterator[dict[tuple, jax.Array]]:
    """`read_hf_params` a group of about `group_bytes` at a time (None: all at once), so a
    converter holds only one group: the checkpoint is validated whole before the first group."""
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
    handles: dict[Path, _SafetensorsFile] = {}
    try:
        tensors = {}
        for spec in specs:
            file = files[spec.hf_name]
            tensor = (handles.get(file) or handles.setdefault(file, _SafetensorsFile(file))).get_slice(spec.hf_name)
            shape = tuple(tensor.get_shape())
            if shape != spec.hf_shape:
                raise CheckpointError(f"{path}: tensor {spec.hf_name} has shape {shape}, "
                                      f"expected {spec.hf_shape} from the config")
            tensors[spec.hf_name] = tensor
        groups = [specs] if group_bytes is None else list(_group_by_size(specs, group_bytes, 4))
        for group in tqdm(groups, desc=f"loading {path.name}", unit="group", leave=False, disable=len(groups) < 8):
            out = {}
            for spec in group:
                def cb(index: tuple[slice, ...], spec: TensorSpec = spec, tensor: Any = tensors[spec.hf_name],
                       ) -> np.ndarray:
                    return np.asarray(spec.read(tensor, index)).astype(dtype, copy=False)

                out[spec.path] = jax.make_array_from_callback(spec.shape, shardings[spec.path], cb)
            yield out
    finally:
        for handle in handles.values():
            handle.close()


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}


class _SafetensorsFile:
    """A safetensors file read with `pread`, not mmap: the pages of a memory-mapped checkpoint
    count in the process's resident memory once touched, so mmap reads of a whole model peak at
    the model's size; explicit reads of the rows a slice needs hold only those rows."""

    def __init__(self, file: Path):
        self.file = file
        self._fd = os.open(file, os.O_RDONLY)
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if not 0 < n <= os.fstat(self._fd).st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            self.header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(self.header, dict):
                raise ValueError("the header is not a JSON object")
            ends = [e["data_offsets"][1] for k, e in self.header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > os.fstat(self._fd).st_size:
                raise ValueError("truncated: the header names more data than the file holds")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
            os.close(self._fd)
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        self._data = 8 + n

    def get_slice(self, name: str) -> _LazyTensor:
        entry = self.header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in _NP_DTYPES:
            why = "no such tensor" if entry is None else f"unsupported entry {entry}"
            raise CheckpointError(f"{self.file}: cannot read tensor {name} ({why})")
        (start, end), shape, dtype = entry["data_offsets"], tuple(entry["shape"]), np.dtype(_NP_DTYPES[entry["dtype"]])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.file}: tensor {name} holds {end - start} bytes, not {shape} {dtype}")
        return _LazyTensor(self._fd, self._data + start, shape, dtype)

    def close(self) -> None:
        os.close(self._fd)


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
    """One tensor of a `_SafetensorsFile`: indexing reads only the rows of the first axis asked for."""

    fd: int
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if index and self.shape else slice(None)
        lo, hi, step = rows.indices(self.shape[0]) if self.shape else (0, 1, 1)
        row_elems = math.prod(self.shape[1:])
        nbytes = max(hi - lo, 0) * row_elems * self.dtype.itemsize
        buf = os.pread(self.fd, nbytes, self.offset + lo * row_elems * self.dtype.itemsize) if nbytes else b""
        block = np.frombuffer(buf, self.dtype).reshape((max(hi - lo, 0), *self.shape[1:]))
        if not self.shape:
            return block.reshape(())
        return block[(slice(None, None, step), *index[1:])]


Fetch = Callable[[list[TensorSpec]], dict[tuple, Any]]


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# ---------------------------------------------------------------- writing


def write_hf(path: str | Path, cfg: ModelConfig, params: dict[tuple, jax.Array] | Fetch,
             format: Literal["decilm", "llama"] = "decilm", shard_bytes: int = SHARD_BYTES,
             extra: Callable[[Path], None] | None = None) -> None:
    """Write config.json + safetensors (sharded with an index when large); atomic on success.
    `extra(staging_dir)` adds files inside the same rename (`convert.hf_files.export_writer`).

    `params` is a dict or a `Fetch` (specs -> their arrays), asked for a few tensors at a time, so
    that writing from a checkpoint on disk holds only those tensors: each shard file's header is
    written first (every shape is known from the config) and its tensors are streamed in after it.
    """
    hf_config = cfg.to_hf(format)  # validates the layout before anything is written
    fetch = params if callable(params) else (lambda specs: {s.path: params[s.path] for s in specs})
    dtype = np.dtype(jnp.dtype(cfg.torch_dtype))
    shards = list(_group_by_size(tensor_specs(cfg), shard_bytes, dtype.itemsize))
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if extra is not None and jax.process_index() == 0:
            extra(tmp)
        weight_map: dict[str, str] = {}
        total = 0
        for k, group in enumerate(tqdm(shards, desc=f"writing {Path(path).name}", unit="shard", leave=False,
                                       disable=len(shards) < 2)):
            name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            if jax.process_index() == 0:
                total += _write_safetensors(tmp / name, group, fetch, dtype)
            else:  # every process takes part in the gathers of sharded arrays; only process 0 writes
                for part in _group_by_size(group, READ_BYTES, dtype.itemsize):
                    [_host(x) for x in fetch(part).values()]
            weight_map.update({s.hf_name: name for s in group})
        if len(shards) > 1 and jax.process_index() == 0:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(file: Path, specs: list[TensorSpec], fetch: Fetch, dtype: np.dtype) -> int:
    """One safetensors file: the JSON header, then each tensor's bytes as it is fetched."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        nbytes = math.prod(s.hf_shape) * dtype.itemsize
        header[s.hf_name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(s.hf_shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for part in _group_by_size(specs, READ_BYTES, dtype.itemsize):
            arrays = fetch(part)
            for s in part:
                hf = s.to_hf(_host(arrays.pop(s.path)).astype(dtype, copy=False))
                f.write(np.ascontiguousarray(hf).reshape(-1).view(np.uint8).data)
                del hf
    return offset


def _group_by_size(specs: list[TensorSpec], limit: int, itemsize: int = 4) -> Iterator[list[TensorSpec]]:
    group: list[TensorSpec] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.hf_shape) * itemsize
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


# ---------------------------------------------------------------- streaming conversion


def hf_to_saved(src: str | Path, dst: str | Path, dtype: str, layout: Any = None,
                group_bytes: int = READ_BYTES) -> ModelConfig:
    """HF directory -> a directory `nemotron_jax.load` reads (what `load(src).save(dst)` writes),
    holding about `group_bytes` of weights at a time: each group is read into its shardings (only
    this host's shards with a multi-host `layout`) and appended to the Orbax checkpoint."""
    from nemotron_jax.model.params import abstract_model, param_shardings
    from nemotron_jax.model.transformer import Policy
    from nemotron_jax.presets import SAVED_CONFIG

    cfg = ModelConfig.from_hf(src)
    shardings = param_shardings(abstract_model(cfg, Policy(param_dtype=dtype)), layout)
    groups = iter_hf_params(src, cfg, shardings, jnp.dtype(dtype), group_bytes)
    with atomic_dir(dst) as tmp:
        if jax.process_index() == 0:
            (tmp / SAVED_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        try:
            from orbax.checkpoint.experimental.v1 import partial
        except ImportError:  # an Orbax without partial saves: one save of the whole tree
            from nemotron_jax.checkpoint import save_params

            save_params(tmp / "params", {p: x for g in groups for p, x in g.items()})
            return cfg
        staging = (tmp / "staging").absolute()
        for group in groups:
            partial.save(staging, nest(group))
            del group
        partial.finalize(staging)
        if jax.process_index() == 0:
            (staging / "state").rename(tmp / "params")
            import shutil

            shutil.rmtree(staging)
    return cfg


def saved_to_hf(src: str | Path, dst: str | Path, dtype: str, format: Literal["decilm", "llama"] = "decilm",
                layout: Any = None, shard_bytes: int = SHARD_BYTES, extra: Callable[[Path], None] | None = None,
                ) -> ModelConfig:
    """A `Model.save` directory -> HF, restoring a few tensors at a time straight into the
    safetensors shard being written (never the whole model)."""
    import orbax.checkpoint as ocp

    from nemotron_jax.model.params import abstract_model, param_shardings
    from nemotron_jax.model.transformer import Policy
    from nemotron_jax.presets import read_saved_config

    cfg = read_saved_config(Path(src)).replace(torch_dtype=dtype)
    shardings = param_shardings(abstract_model(cfg, Policy(param_dtype=dtype)), layout)
    ckpt_dir = (Path(src) / "params").absolute()
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no Orbax parameter directory")
    with ocp.PyTreeCheckpointer() as ckpt:
        def fetch(specs: list[TensorSpec]) -> dict[tuple, Any]:
            shapes = {s.path: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=shardings[s.path])
                      for s in specs}
            item = nest(shapes)
            args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                          partial_restore=True)
            try:
                tree = ckpt.restore(ckpt_dir, args=args)
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise CheckpointError(f"{ckpt_dir}: parameters do not match the saved config ({e})") from None
            return unnest(tree, list(shapes))

        write_hf(dst, cfg, fetch, format, shard_bytes, extra)
    return cfg
