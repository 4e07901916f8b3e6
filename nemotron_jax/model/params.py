"""Parameter trees: flat path dicts, shardings from logical axes, and sharded initialisation."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from nemotron_jax.config import ModelConfig
from nemotron_jax.model.transformer import Policy, Transformer
from nemotron_jax.sharding import Layout

Path = tuple[str | int, ...]


def abstract_model(cfg: ModelConfig, policy: Policy) -> Transformer:
    """The model with `ShapeDtypeStruct`s for weights: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, policy, rngs=nnx.Rngs(0)))


def param_shardings(abstract: Transformer, layout: Layout | None) -> dict[Path, Any]:
    """Path -> sharding for every parameter, from its logical axes (one device without a layout)."""
    device = SingleDeviceSharding(jax.devices()[0])
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        out[path] = device if layout is None else layout.sharding(var.logical_axes, var.shape)
    return out


def init_sharded(cfg: ModelConfig, policy: Policy, seed: int, layout: Layout | None) -> Transformer:
    """Initialise under `jit` with out_shardings, so every weight is born in its own shard."""
    graphdef, make = _jitted_init(cfg, policy, layout)
    return nnx.merge(graphdef, make(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg: ModelConfig, policy: Policy, layout: Layout | None) -> tuple[nnx.GraphDef, Any]:
    """The compiled initialiser of one (config, policy, layout), the seed's key its argument: compiling
    it takes seconds even for a toy model, so a second `init` of the same model (any seed) reuses it."""
    abstract = abstract_model(cfg, policy)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract, layout)
    out_shardings = nnx.from_flat_state(
        [(p, v.replace(shardings[p])) for p, v in nnx.to_flat_state(abstract_state)])

    def make(key: jax.Array) -> nnx.State:
        return nnx.state(Transformer(cfg, policy, rngs=nnx.Rngs(key)))

    return graphdef, jax.jit(make, out_shardings=out_shardings)


def flat_params(module: Transformer) -> dict[Path, jax.Array]:
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assemble(cfg: ModelConfig, policy: Policy, flat: dict[Path, jax.Array]) -> Transformer:
    """A model whose weights are exactly `flat` (no initialisation is run)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, policy))
    state = nnx.from_flat_state([(p, v.replace(flat[p])) for p, v in nnx.to_flat_state(abstract_state)])
    return nnx.merge(graphdef, state)

