"""`nemotron-jax compile`: a tiny model's steps compile for a TPU slice (libtpu, no TPU) and a CPU
mesh; the report has every key; the planner's parameter + optimiser bytes equal the compiled ones,
quantized and with LoRA too; TPU targets get the TPU kernels; a program too big is a result."""

from __future__ import annotations

import json

import pytest

from nemotron_jax.aot import abstract_step, compile_for, count_collectives, parse_target
from nemotron_jax.aot.report import needed_bytes
from nemotron_jax.aot.steps import decode_state
from nemotron_jax.cli import main
from nemotron_jax.config import ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.transformer import Policy
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


def _tiny512() -> ModelConfig:
    """Every array's per-chip shard on 4 chips (adapters, int4 groups and scales included) a whole
    TPU tile, so the compiled arguments are the logical bytes plus the scalars, nothing padded."""
    return _llama(hidden_size=512, num_attention_heads=4, blocks=["2x gqa:1 swiglu:512"])


def _check_planner(report, cfg: ModelConfig, mesh: MeshConfig, batch: int, seq: int, mode: str,
                   scalar_bytes: int = 8, quantize: str | None = None, lora_rank: int = 0) -> None:
    """Planner params + moments == the compiled ones; the rest of the arguments is the batch and
    6 scalars (step, rng, two counters, two optimiser counts; inference: the sampling knobs and
    key), `scalar_bytes` each at most."""
    plan = plan_memory(cfg, mesh, report.devices, batch, seq, mode, quantize=quantize, lora_rank=lora_rank,
                       param_dtype="float32" if mode == "train" and not lora_rank else "bfloat16")
    assert report.state_bytes == plan.params_bytes + plan.optimizer_bytes == report.planner_state_bytes
    scalars = report.per_device_bytes["arguments"] - report.batch_bytes - report.state_bytes
    assert 0 <= scalars <= (6 if mode == "train" else 12) * scalar_bytes, scalars


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
    """The default attention for a TPU target is the TPU kernel (splash, per shard), as a TPU run's."""
    cfg = _tiny128()
    sft = compile_for(cfg, "tpu:v5e:2x2", FSDP, "sft", 8, 128)
    assert sft.devices == 4 and sft.fits and sft.flops > 0 and KEYS <= set(sft.to_dict())
    assert sft.collectives["all-gather"] > 0  # fsdp gathers the weights
    assert sft.attention_impl == "pallas" and sft.kernel_calls > 0  # Mosaic custom calls: splash fwd + bwd
    _check_planner(sft, cfg, FSDP, 8, 128, "train", scalar_bytes=512)  # TPU allocates scalars in 512 B


@needs_libtpu
def test_attention_impl_xla_overrides_the_tpu_kernel(capsys, tmp_path):
    (tmp_path / "model_config.json").write_text(json.dumps(_tiny512().to_dict()))
    assert main(["compile", "--model", str(tmp_path), "--target", "tpu:v5e:2x2", "--task", "sft", "--batch", "4",
                 "--seq", "128", "--attention-impl", "xla", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention_impl"] == "xla" and out["kernel_calls"] == 0 and out["fits"]


ADAPTED = [("prefill", "int8", 0), ("prefill", "int4", 0), ("sft", None, 8), ("sft", "int4", 8)]


@pytest.mark.parametrize(("task", "quantize", "rank"), ADAPTED, ids=["int8", "int4", "lora8", "qlora-int4"])
@pytest.mark.parametrize("target", ["cpu:8", pytest.param("tpu:v5e:2x2", marks=needs_libtpu)])
def test_quantized_and_lora_steps_match_planner(target, task, quantize, rank):
    """int8 / int4 weights (inference) and LoRA rank 8 (train, on a bf16 or int4 base): the
    compiled per-chip parameter + optimiser bytes are the planner's, byte for byte."""
    cfg, seq = _tiny512(), 128 if task == "sft" else 64
    lora = LoRAConfig(rank=rank) if rank else None
    r = compile_for(cfg, target, FSDP, task, 8, seq, quantize=quantize, lora=lora)
    assert r.fits and r.quantize == quantize and r.lora_rank == rank
    mode = "train" if task == "sft" else "infer"
    _check_planner(r, cfg, FSDP, 8, seq if mode == "train" else 2 * seq, mode,
                   scalar_bytes=512 if target.startswith("tpu") else 8, quantize=quantize, lora_rank=rank)
    if rank:  # only the adapters are optimised: two float32 moments of each adapter weight, none of the base
        plan = plan_memory(cfg, FSDP, r.devices, 8, seq, "train", quantize=quantize, lora_rank=rank)
        full = plan_memory(cfg, FSDP, r.devices, 8, seq, "train")
        assert plan.optimizer_bytes == 2 * plan.gradient_bytes < 0.2 * full.optimizer_bytes


def test_lora_and_quantize_flags(capsys, tmp_path):
    """`compile --lora 8 --lora-targets q,v` trains adapters on q and v only; --quantize for training
    without --lora is a one-line error (QLoRA needs adapters)."""
    args = ["compile", "--model", "tiny-llama", "--target", "cpu:8", "--task", "sft", "--batch", "8", "--seq", "32"]
    assert main([*args, "--lora", "8", "--lora-targets", "q,v", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = preset("tiny-llama")
    per_layer = 8 * (cfg.hidden_size + cfg.num_attention_heads * cfg.head_dim) + 8 * (cfg.hidden_size + 2 * 16)
    plan = plan_memory(cfg, FSDP, 8, 8, 32, "train", lora_rank=8, lora_targets=("q", "v"))
    assert plan.adapter_params == cfg.num_layers * per_layer
    assert out["lora_rank"] == 8 and out["state_bytes"] == out["planner_state_bytes"]
    assert out["planner_state_bytes"] == plan.params_bytes + plan.optimizer_bytes
    assert main([*args, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "needs --lora" in err and len(err.strip().splitlines()) == 1


@needs_libtpu
def test_engine_decode_step_compiles_for_tpu_slice():
    decode = compile_for(_tiny128(), "tpu:v5e:2x2", FSDP, "decode", 8, 64)
    assert decode.fits and decode.per_device_bytes["arguments"] > 0
    assert decode.per_device_bytes["total"] <= decode.device_memory_bytes


@needs_libtpu
def test_decode_state_is_placed_where_a_compiled_prefill_leaves_the_cache():
    """decode is built without compiling prefill: its cache shardings are the compiled prefill's."""
    target, mesh = parse_target("tpu:v5e:2x2"), MeshConfig(fsdp=2, tensor=2)
    layout = mesh.layout(list(target.devices))
    policy = Policy(param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True)
    lowered = abstract_step("prefill", _tiny128(), policy, layout, 8, 64).lower()
    compiled, derived = lowered.compile().output_shardings.cache, decode_state(lowered.out_info, layout).cache
    pairs = [(c, d) for cs, ds in zip(compiled, derived, strict=True) if ds is not None
             for c, d in zip(cs, ds, strict=True)]
    assert pairs and all(c.is_equivalent_to(d.sharding, d.ndim) for c, d in pairs)


@needs_libtpu
def test_program_that_does_not_fit_is_a_result(capsys, tmp_path):
    """~10B bf16 weights replicated on every 16 GiB chip: the arguments alone exceed it. The decode
    step (built without compiling a prefill first) comes back as `fits: false` with what the
    compiler says it needed, exit status 0, as JSON; nothing is allocated."""
    cfg = _llama(hidden_size=8192, vocab_size=32_768, num_attention_heads=64, blocks=["12x gqa:8 swiglu:28672"])
    (tmp_path / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    rc = main(["compile", "--model", str(tmp_path), "--target", "tpu:v5e:2x2", "--mesh", "data=4", "--rules", "dp",
               "--task", "decode", "--batch", "4", "--seq", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is False and "RESOURCE_EXHAUSTED" in out["error"]
    assert out["per_device_bytes"]["arguments"] > out["device_memory_bytes"]
    assert out["required_bytes"] >= 0.99 * out["per_device_bytes"]["arguments"]


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


def test_needed_bytes_read_from_the_compilers_message():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(20.14G) exceeds available HBM (15.75G).")
    assert needed_bytes(msg) == int(20.14 * 1024**3)
    assert needed_bytes("Used 125.7G of 95.74G hbm. Exceeded hbm capacity by 30G.") == int(125.7 * 1024**3)
    assert needed_bytes("RESOURCE_EXHAUSTED: something else") is None


def test_count_collectives_reads_async_and_sync_forms():
    hlo = ("%a = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}\n"
           "%b = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %y)\n"
           "%c = f32[8]{0} all-gather-done(%b)\n%d = f32[2]{0} reduce-scatter(f32[8]{0} %z)\n")
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
                                      "collective-permute": 0}
