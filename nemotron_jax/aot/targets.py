"""Compile targets: a TPU slice (from libtpu's topology descriptions, no TPU needed) or host CPUs.

`tpu:v5e:2x2` names a generation and its chip grid; `cpu:8` the first 8 host devices. The chip
table holds what the roofline needs: dense bf16 peak FLOP/s, HBM bytes and HBM bandwidth per chip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from nemotron_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float | None  # dense bf16 FLOP/s per chip (None: not a roofline target)
    memory_bytes: int  # HBM (or host memory) per chip
    hbm_bandwidth: float | None  # bytes/s per chip


GiB = 1024**3
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1.228e12),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 0.819e12),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2.765e12),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1.64e12),
    # for reference (not compile targets here): dense bf16 without sparsity
    "h100": Chip("H100 SXM", 989e12, 80 * 10**9, 3.35e12),
    "h200": Chip("H200 SXM", 989e12, 141 * 10**9, 4.8e12),
    "cpu": Chip("host CPU", None, 24 * GiB, None),
}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given, e.g. tpu:v5e:2x2
    platform: str  # tpu | cpu
    chip: Chip
    devices: tuple[jax.Device, ...]


def parse_target(spec: str) -> Target:
    """The devices of `spec`; a one-line ConfigError naming the fix for anything else."""
    m = re.fullmatch(r"tpu:(v\d+[a-z]?):(\d+(?:x\d+){1,2})", spec)
    if m:
        gen, grid = m.groups()
        if gen not in TPU_GENERATIONS:
            raise ConfigError(f"--target {spec}: unknown TPU generation {gen!r}; expected one of {TPU_GENERATIONS}")
        return Target(spec, "tpu", CHIPS[gen], tuple(_tpu_devices(gen, grid, spec)))
    m = re.fullmatch(r"cpu:(\d+)", spec)
    if m:
        n = int(m.group(1))
        have = jax.devices("cpu")
        if not 0 < n <= len(have):
            raise ConfigError(f"--target {spec}: this process has {len(have)} CPU devices; run with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (and JAX_PLATFORMS=cpu)")
        return Target(spec, "cpu", CHIPS["cpu"], tuple(have[:n]))
    raise ConfigError(f"--target {spec!r}: expected tpu:GEN:AxB[xC] (GEN in {', '.join(TPU_GENERATIONS)}, "
                      "e.g. tpu:v5e:2x2, tpu:v5p:4x4x4) or cpu:N")


def _tpu_devices(gen: str, grid: str, spec: str) -> list[jax.Device]:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(f"--target {spec}: libtpu is not installed; pip install 'jax[tpu]=={jax.__version__}' "
                          "(compiling for TPU needs no TPU)") from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file when it loads; a compile-only use (and parallel test
    # workers) must not contend for it with each other or with any other JAX process here.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{grid}")
    except Exception as e:  # libtpu rejects shapes a generation does not build
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--target {spec}: libtpu has no such topology ({first[:200]}); "
                          "use a slice shape the generation has, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:2x4") from None
    devices = list(topo.devices)
    if len(devices) != math.prod(int(x) for x in grid.split("x")):
        raise ConfigError(f"--target {spec}: libtpu made {len(devices)} devices for grid {grid}")
    return devices
