"""Logical axis names -> mesh axes.

Parameters and activations are annotated with logical names (`embed`, `heads`, `mlp`, `batch`, ...).
A `Layout` (a mesh plus rules) turns a logical name tuple into a `PartitionSpec`. Inside
`use_layout(...)`, `constrain` pins activations to that layout; outside it is a no-op, so the same
modules run unsharded on one CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
MESH_AXES = ("data", "fsdp", "tensor", "sequence")

_BATCH = ("batch", ("data", "fsdp"))
RULE_PRESETS: dict[str, Rules] = {
    # Replicated weights, batch split over every data-like axis.
    "dp": (_BATCH,),
    # ZeRO-3 style: weights split along `embed` over fsdp, gathered per layer by XLA.
    "fsdp": (_BATCH, ("embed", "fsdp"), ("seq", "sequence")),
    # FSDP plus Megatron-style tensor parallelism over heads, FFN width and vocabulary.
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("seq", "sequence"),
                ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"),
                ("act_vocab", "tensor")),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: Rules

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """The PartitionSpec for `logical_axes`; a dim that does not divide its mesh axes is replicated."""
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(logical_axes):
            axes = table.get(name) if name is not None else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            axes = tuple(a for a in axes if a not in used and self.mesh.shape.get(a, 1) > 1)
            size = 1
            for a in axes:
                size *= self.mesh.shape[a]
            if not axes or (shape is not None and shape[i] % size):
                out.append(None)
                continue
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    @property
    def batch_shards(self) -> int:
        """How many ways the batch dimension is split: global batches must be a multiple of this."""
        axes = dict(self.rules).get("batch") or ()
        return math.prod(self.mesh.shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: all remaining devices) and the rules preset that maps names onto them.

    `dcn_data` > 1 splits `data` across slices/hosts over the data-centre network (multi-slice),
    keeping fsdp/tensor/sequence inside a slice's fast interconnect.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    dcn_data: int = 1
    rules: str = "fsdp_tp"

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor, self.sequence]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
        known = math.prod(s for s in sizes if s != -1) * self.dcn_data
        if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} x dcn_data={self.dcn_data} "
                             f"does not fit {num_devices} devices")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) * self.dcn_data != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} x dcn_data={self.dcn_data} "
                             f"uses {math.prod(sizes) * self.dcn_data} devices, but there are {num_devices}")
        return tuple(sizes)

    def layout(self, devices: Sequence[jax.Device] | None = None) -> Layout:
        devices = list(devices if devices is not None else jax.devices())
        if self.rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules {self.rules!r}; expected one of {sorted(RULE_PRESETS)}")
        ici = self.shape(len(devices))
        if self.dcn_data > 1:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_hybrid_device_mesh(ici, (self.dcn_data, 1, 1, 1), devices)
        else:
            grid = np.asarray(devices).reshape(ici)
        return Layout(Mesh(grid, MESH_AXES), RULE_PRESETS[self.rules])


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("nemotron_jax_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout | None) -> Iterator[None]:
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def current_layout() -> Layout | None:
    return _LAYOUT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current layout; identity without one."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(logical_axes, x.shape))
