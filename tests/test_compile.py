"""`nemotron-jax compile`: a tiny model's steps compile for a TPU slice (libtpu, no TPU) and a CPU
mesh; the report has every key; the planner's parameter + optimiser bytes equal the compiled ones."""

from __future__ import annotations

import json

import pytest

from nemotron_jax.aot import compile_for, count_collectives, parse_target
from nemotron_jax.cli import main
from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.plan import plan_memory
from nemotron_jax.presets import preset
from nemotron_jax.sharding import MeshConfig

try:
    import libtpu  # noqa: F401

    NO_LIBTPU = None
except ImportError as e:
    NO_LIBTPU = f"libtpu is not installed ({e}); pip install 'jax[tpu]' (the test extra) to compile for TPU"
needs_libtpu = pytest.mark.skipif(NO_LIBTPU is not None, reason=NO_LIBTPU or "")
KEYS = {"target", "devices", "task", "per_device_bytes", "device_memory_bytes", "fits", "flops", "bytes_accessed",
        "compile_seconds", "planner_total_bytes"}
FSDP = MeshConfig(fsdp=-1, rules="fsdp")


def _llama(**changes) -> ModelConfig:
    d = {**preset("tiny-llama").to_dict(), "head_dim": None, **changes}
    return ModelConfig.from_dict(d)


def _tiny128() -> ModelConfig:
    """tiny-llama with every dimension a multiple of 128, so TPU tiling pads nothing."""
    return _llama(hidden_size=256, num_attention_heads=2, blocks=["4x gqa:1 swiglu:256"])


def _check_planner(report, cfg: ModelConfig, mesh: MeshConfig, batch: int, seq: int, mode: str,
                   scalar_bytes: int = 8) -> None:
    """Planner params + moments == the compiled ones; the rest of the arguments is the batch and
    6 scalars (step, rng, two counters, two optimiser counts), `scalar_bytes` each at most."""
    plan = plan_memory(cfg, mesh, report.devices, batch, seq, mode,
                       param_dtype="float32" if mode == "train" else "bfloat16")
    assert report.state_bytes == plan.params_bytes + plan.optimizer_bytes
    scalars = report.per_device_bytes["arguments"] - report.batch_bytes - report.state_bytes
    assert 0 <= scalars <= 6 * scalar_bytes, scalars


def test_sft_step_on_cpu_mesh_matches_planner(capsys):
    cfg = preset("tiny-llama")
    rc = main(["compile", "--model", "tiny-llama", "--target", "cpu:8", "--task", "sft", "--batch", "8",
               "--seq", "32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and KEYS <= set(out) and out["devices"] == 8 and out["fits"] is True
    assert set(out["per_device_bytes"]) == {"arguments", "temporaries", "outputs", "aliased", "total"}
    assert out["flops"] > 0 and out["per_device_bytes"]["aliased"] > 0  # the state is donated
    report = compile_for(cfg, "cpu:8", FSDP, "sft", 8, 32)
    _check_planner(report, cfg, FSDP, 8, 32, "train")


@needs_libtpu
def test_sft_step_compiles_for_tpu_slice_and_matches_planner():
    cfg = _tiny128()
    sft = compile_for(cfg, "tpu:v5e:2x2", FSDP, "sft", 8, 128)
    assert sft.devices == 4 and sft.fits and sft.flops > 0 and KEYS <= set(sft.to_dict())
    assert sft.collectives["all-gather"] > 0  # fsdp gathers the weights
    _check_planner(sft, cfg, FSDP, 8, 128, "train", scalar_bytes=512)  # TPU allocates scalars in 512 B


@needs_libtpu
def test_engine_decode_step_compiles_for_tpu_slice():
    decode = compile_for(_tiny128(), "tpu:v5e:2x2", FSDP, "decode", 8, 64)
    assert decode.fits and decode.per_device_bytes["arguments"] > 0
    assert decode.per_device_bytes["total"] <= decode.device_memory_bytes


@needs_libtpu
def test_program_that_does_not_fit_is_a_result():
    """~10B bf16 weights replicated on every 16 GiB chip: the arguments alone exceed it."""
    cfg = _llama(hidden_size=8192, vocab_size=32_768, num_attention_heads=64, blocks=["12x gqa:8 swiglu:28672"])
    r = compile_for(cfg, "tpu:v5e:2x2", MeshConfig(data=4, fsdp=1, rules="dp"), "prefill", 4, 128)
    assert r.fits is False and r.per_device_bytes["arguments"] > r.device_memory_bytes


def test_bad_targets_and_meshes_are_one_line_errors(capsys):
    with pytest.raises(ConfigError, match="expected tpu:GEN"):
        parse_target("gpu:h100:8")
    with pytest.raises(ConfigError, match="unknown TPU generation"):
        parse_target("tpu:v9z:2x2")
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count"):
        parse_target("cpu:4096")
    rc = main(["compile", "--model", "tiny-llama", "--target", "cpu:8", "--mesh", "fsdp=3", "--batch", "8",
               "--seq", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match cpu:8" in err and len(err.strip().splitlines()) == 1


def test_count_collectives_reads_async_and_sync_forms():
    hlo = ("%a = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}\n"
           "%b = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %y)\n"
           "%c = f32[8]{0} all-gather-done(%b)\n%d = f32[2]{0} reduce-scatter(f32[8]{0} %z)\n")
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
                                      "collective-permute": 0}
