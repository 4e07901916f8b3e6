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
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


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
