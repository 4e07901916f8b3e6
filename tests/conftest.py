"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and tiny models."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates the suite: share compiled programs across xdist workers and CLI subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_hetero():
    """The tiny heterogeneous preset initialised once per session (float32)."""
    import nemotron_jax as nj

    return nj.init(nj.preset("tiny-hetero"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    import nemotron_jax as nj

    return nj.init(nj.preset("tiny-llama"), seed=0)
