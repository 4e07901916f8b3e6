"""Memory planner: per-device bytes of a training or inference run, before buying the chips.

Parameter, gradient and optimiser bytes are exact: every abstract parameter is sharded by the same
`Layout.spec` the real run uses (including the deliberate fallbacks, e.g. replicated KV heads when
they do not divide the tensor axis). Activations are a model of what `jax.grad` keeps alive per
block under each remat policy, checked against XLA's own memory analysis in tests/test_plan.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from nemotron_jax.config import BlockConfig, ModelConfig
from nemotron_jax.lora import LoRAConfig, add_adapters
from nemotron_jax.model.lora import LoRAParam
from nemotron_jax.model.transformer import Policy, Transformer
from nemotron_jax.quantize import PROJECTIONS, QArray, quantize_module, storage_layout
from nemotron_jax.sharding import MESH_AXES, RULE_PRESETS, Layout, MeshConfig

GiB = 1024**3
# Usable HBM per chip (bytes); what `--device` accepts.
DEVICE_MEMORY = {
    "v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB,
    "a100-80g": 80 * 10**9, "h100": 80 * 10**9, "h200": 141 * 10**9, "b200": 192 * 10**9,
    "cpu": 24 * GiB,
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, plus the sharding fallbacks the layout had to take."""

    num_devices: int
    mesh: dict[str, int]
    params_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    fallbacks: tuple[str, ...]
    reference_bytes: int = 0  # RL: the frozen reference policy (0 with LoRA: the base itself serves)
    adapter_params: int = 0   # LoRA: trained adapter parameters (what gradients and AdamW cover)

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes
                + self.kv_cache_bytes + self.reference_bytes)

    def fits(self, device_bytes: int, headroom: float = 0.9) -> bool:
        """Whether the total fits in `headroom` of a device (the rest: XLA workspace, fragmentation)."""
        return self.total_bytes <= headroom * device_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fallbacks"] = list(self.fallbacks)
        out["total_bytes"] = self.total_bytes
        return out


def plan_memory(cfg: ModelConfig, mesh: MeshConfig, num_devices: int, batch: int, seq: int,
                mode: Literal["train", "infer"] = "train", *, remat: str = "full",
                param_dtype: str | None = None, compute_dtype: str = "bfloat16",
                cache_dtype: str = "bfloat16", attention_impl: str = "pallas",
                loss_chunk_tokens: int = 2048, prefill_chunk: int = 4096, quantize: str | None = None,
                lora_rank: int = 0, lora_targets: tuple[str, ...] = LoRAConfig.targets,
                reference: bool = False, scan_layers: bool = False) -> MemoryPlan:
    """Per-device memory of `mode` at global `batch` x `seq` on `num_devices` laid out by `mesh`.

    train: fp32 master weights (default), fp32 gradients, AdamW moments, activations under `remat`.
    infer: weights in `param_dtype` (default bf16) and a KV cache for batch x seq tokens.
    Inference activations are those of prefilling `prefill_chunk` tokens per row at a time.
    `attention_impl="xla"` counts the [T, T] score matrices the plain-XLA attention materialises;
    the default assumes the flash kernels (Pallas / splash), which keep none.

    `quantize` (int8 | int4) stores the projection weights at 1 / 0.5 bytes plus float32 scales
    (per channel / per 128-row group). `lora_rank` > 0 trains only adapters on `lora_targets`: the
    base is frozen (bf16 by default, no master copy), gradients and AdamW moments cover the adapters
    alone. `reference` adds an RL reference policy: a copy of the weights, none with LoRA.

    Besides the per-block working set, activations count what the compiled TPU steps show live
    (docs/scale.md): under fsdp the largest weight gathered whole (inference: in the compute dtype;
    training: its float32 gradient before the reduce-scatter), and with `scan_layers` one copy of
    every scanned run's weights in the compute dtype (the step stacks the per-layer weights).
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    param_dtype = param_dtype or ("float32" if mode == "train" and not lora_rank else "bfloat16")
    sizes = dict(zip(MESH_AXES, mesh.shape(num_devices), strict=True))
    sizes["data"] *= mesh.dcn_data
    if mesh.rules not in RULE_PRESETS:
        raise ValueError(f"unknown sharding rules {mesh.rules!r}")
    layout = Layout(AbstractMesh(tuple(sizes.values()), MESH_AXES), RULE_PRESETS[mesh.rules])

    pbytes = jnp.dtype(param_dtype).itemsize
    param_elems, params, adapters, adapters_local, fallbacks = 0, 0, 0, 0, []
    lora = LoRAConfig(rank=lora_rank, targets=tuple(lora_targets)) if lora_rank else None
    cbits = 8 * jnp.dtype(compute_dtype).itemsize
    scanned, stacked, gathered = _scanned_layers(cfg) if scan_layers else set(), 0, 0
    for path, shape, axes, kind, bits in _stored_arrays(cfg, quantize, lora):
        spec = layout.spec(axes, shape)
        local = _local_elems(shape, spec, sizes)
        if kind != "adapter":  # gathered whole over the weight-sharding axes for its matmul
            whole = _local_elems(shape, _without(spec, ("fsdp", "data")), sizes)
            if whole > local:
                gathered = max(gathered, whole * (32 if mode == "train" else bits or cbits) // 8)
        parts = path.split(".")
        if parts[0] == "layers" and int(parts[1]) in scanned:
            stacked += -(-local * (bits or cbits) // 8)
        if kind == "adapter":
            adapters += math.prod(shape)
            adapters_local += local
        elif kind != "scale":
            param_elems += local
        params += -(-local * (bits or 8 * pbytes) // 8)  # int4 packs two values a byte
        wanted = layout.spec(axes)
        if kind == "param" and wanted != spec:
            fallbacks.append(f"{path} {shape}: wanted {wanted}, replicated where it does not divide -> {spec}")
    trained = adapters_local if lora_rank else param_elems

    batch_shards = sizes["data"] * sizes["fsdp"]
    local_batch = math.ceil(batch / batch_shards)
    local_seq = math.ceil(seq / sizes["sequence"])
    if mode == "infer":
        kv = _kv_cache_bytes(cfg, local_batch, seq, sizes["tensor"], cache_dtype)
        act = _inference_activation_bytes(cfg, local_batch, min(local_seq, prefill_chunk), sizes["tensor"],
                                          compute_dtype) + stacked + gathered
        return MemoryPlan(num_devices, sizes, params, 0, 0, act, kv, tuple(fallbacks), adapter_params=adapters)
    act = _train_activation_bytes(cfg, local_batch, local_seq, sizes["tensor"], compute_dtype, remat,
                                  attention_impl, loss_chunk_tokens) + stacked + gathered
    ref = params if reference and not lora_rank else 0
    return MemoryPlan(num_devices, sizes, params, trained * 4, 2 * trained * 4, act, 0,
                      tuple(fallbacks), reference_bytes=ref, adapter_params=adapters)


def min_devices(cfg: ModelConfig, device_bytes: int, batch: int, seq: int, mode: Literal["train", "infer"],
                mesh: MeshConfig | None = None, max_devices: int = 65536, **kw) -> MemoryPlan | None:
    """The smallest power-of-two device count whose plan fits (mesh: -1 on one axis absorbs it)."""
    mesh = mesh or MeshConfig(fsdp=-1, rules="fsdp")
    n = 1
    while n <= max_devices:
        try:
            plan = plan_memory(cfg, mesh, n, batch, seq, mode, **kw)
        except ValueError:
            plan = None
        if plan is not None and plan.fits(device_bytes):
            return plan
        n *= 2
    return None


def abstract_run_model(cfg: ModelConfig, policy: Policy, quantize: str | None = None,
                       lora: LoRAConfig | None = None) -> Transformer:
    """The model a run holds, as `ShapeDtypeStruct`s (no memory): projections quantized as
    `Model.quantize` does, then adapters added as the train loop's `ensure_adapters` does. The
    planner counts this tree and `nemotron-jax compile` compiles on it."""

    def build() -> Transformer:
        module = Transformer(cfg, policy, rngs=nnx.Rngs(0))
        if quantize:
            module = quantize_module(module, quantize)  # type: ignore[arg-type]
        if lora is not None and lora.rank:
            add_adapters(module, lora)
        return module

    return nnx.eval_shape(build)


def stored_axes(path: tuple, var: nnx.Variable) -> list[tuple[str, tuple[int, ...], tuple, jnp.dtype]]:
    """(part, shape, logical axes, dtype) of each array one variable stores: the weight itself
    (part ""), or a quantized weight's "values" and "scale" (laid out by `storage_layout`)."""
    value = var.get_value()
    if not isinstance(value, QArray):
        return [("", tuple(var.shape), tuple(var.logical_axes), jnp.dtype(value.dtype))]
    bits = "int4" if value.values.dtype == jnp.int4 else "int8"
    (vshape, vaxes), (sshape, saxes) = storage_layout(tuple(value.shape), tuple(var.logical_axes), bits,
                                                      PROJECTIONS[path[-1]])
    if (vshape, sshape) != (value.values.shape, value.scale.shape):
        raise AssertionError(f"{path}: storage_layout {vshape}/{sshape} != {value.values.shape}/{value.scale.shape}")
    return [("values", vshape, vaxes, jnp.dtype(value.values.dtype)),
            ("scale", sshape, saxes, jnp.dtype(value.scale.dtype))]


@functools.lru_cache(maxsize=8)
def _stored_arrays(cfg: ModelConfig, quantize: str | None, lora: LoRAConfig | None,
                   ) -> tuple[tuple[str, tuple[int, ...], tuple, str, int | None], ...]:
    """(path, shape, logical axes, kind, bits) of every array the run's model stores; kind is param
    | values | scale | adapter; bits None for a float weight (stored in the run's `param_dtype`)."""
    abstract = abstract_run_model(cfg, Policy(), quantize, lora)
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, (nnx.Param, LoRAParam))):
        adapter = isinstance(var, LoRAParam)
        for part, shape, axes, dtype in stored_axes(path, var):
            name = ".".join(map(str, path + ((part,) if part else ())))
            kind = "adapter" if adapter else (part or "param")
            bits = None if kind == "param" else jax.dtypes.itemsize_bits(dtype)
            out.append((name, shape, axes, kind, bits))
    return tuple(out)


def _scanned_layers(cfg: ModelConfig) -> set[int]:
    """Layers in runs of two or more identical consecutive blocks: what `scan_layers` scans."""
    out, start = set(), 0
    for i in range(1, len(cfg.blocks) + 1):
        if i == len(cfg.blocks) or cfg.blocks[i] != cfg.blocks[start]:
            if i - start > 1:
                out.update(range(start, i))
            start = i
    return out


def _without(spec: tuple, axes: tuple[str, ...]) -> tuple:
    """`spec` with the mesh axes `axes` removed (what a weight is once gathered over them)."""
    out = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in names if a not in axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return tuple(out)


def _local_elems(shape: tuple[int, ...], spec: tuple, sizes: dict[str, int]) -> int:
    elems = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        elems *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return elems


def _split(n: int, tensor: int) -> int:
    """Per-device share of a head/width dimension under tensor parallelism (replicated if it won't divide)."""
    return n // tensor if n % tensor == 0 else n


def _kv_cache_bytes(cfg: ModelConfig, local_batch: int, seq: int, tensor: int, dtype: str) -> int:
    per_token = sum(2 * _split(b.attention.num_kv_heads, tensor) * cfg.head_dim
                    for b in cfg.blocks if b.attention.kind == "gqa")
    return local_batch * seq * per_token * jnp.dtype(dtype).itemsize


def _layer_bytes(cfg: ModelConfig, block: BlockConfig, b: int, t: int, tensor: int, c: int) -> int:
    """One block's [B, T, ...] working set (attention scores apart: `_score_bytes`)."""
    d, h = cfg.hidden_size, cfg.head_dim
    n = _split(cfg.num_attention_heads, tensor)
    total = 0
    att, ffn = block.attention, block.ffn
    if att.kind == "gqa":
        k = _split(att.num_kv_heads, tensor)
        total += b * t * (2 * d + 2 * n * h + 2 * k * h) * c  # residual in, normed, q, k, v, attn out
    elif att.kind == "linear":
        total += 2 * b * t * d * c
    if ffn.kind == "swiglu":
        f = _split(ffn.intermediate_size, tensor)
        total += b * t * (2 * d + 4 * f) * c  # residual in, normed, gate, up, sigmoid(gate), product
    elif ffn.kind == "linear":
        total += 2 * b * t * d * c
    return total


def _score_bytes(cfg: ModelConfig, block: BlockConfig, b: int, t: int, tensor: int, c: int,
                 attention_impl: str) -> int:
    """[T, T] buffers of one GQA block. xla: the softmax's float32 output (kept for its backward)
    and its compute-dtype copy that meets V (the f32 logits fuse into the softmax); flash kernels:
    none, but splash's compiled XLA branch (kernels/tpu.py) holds f32 scores of one 512-query chunk."""
    if block.attention.kind != "gqa":
        return 0
    n = _split(cfg.num_attention_heads, tensor)
    if attention_impl == "xla":
        return b * n * t * t * (4 + c)
    return b * n * min(t, 512) * t * 4


def _train_activation_bytes(cfg: ModelConfig, b: int, t: int, tensor: int, dtype: str, remat: str,
                            attention_impl: str, chunk: int) -> int:
    """What `jax.grad` keeps: under remat each block's input, one block's working set live again,
    its cotangents (the [T, T] buffers counted once: the backward consumes them in place), the
    loss chunk's logits; without remat every block's working set."""
    c = jnp.dtype(dtype).itemsize
    dense = [_layer_bytes(cfg, blk, b, t, tensor, c) for blk in cfg.blocks]
    scores = [_score_bytes(cfg, blk, b, t, tensor, c, attention_impl) for blk in cfg.blocks]
    residual = b * t * cfg.hidden_size * c
    if remat == "none":
        stash = sum(dense) + sum(scores)
    else:  # full (or a policy saving little more): each block keeps its input; one block is live again
        stash = residual * cfg.num_layers + max(dense) + max(scores)
    stash += max(dense)  # cotangents of the block being differentiated
    vocab = _split(cfg.vocab_size, tensor)
    logits = 2 * min(chunk, b * t) * vocab * 4  # one chunk of f32 logits and its gradient
    return stash + logits + 2 * residual  # + embedding output and its cotangent


def _inference_activation_bytes(cfg: ModelConfig, b: int, t: int, tensor: int, dtype: str) -> int:
    """Prefill peak: one block's working set plus the residual stream, and the last-token logits."""
    c = jnp.dtype(dtype).itemsize
    per_layer = max(_layer_bytes(cfg, blk, b, t, tensor, c) + _score_bytes(cfg, blk, b, t, tensor, c, "pallas")
                    for blk in cfg.blocks)
    return per_layer + b * t * cfg.hidden_size * c + b * _split(cfg.vocab_size, tensor) * 4
