"""The memory planner against XLA's own memory analysis of the compiled step on an 8-device mesh."""

import json

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.cli import main
from nemotron_jax.plan import plan_memory
from nemotron_jax.sharding import MeshConfig, use_layout

CFG = nj.ModelConfig.from_dict({
    "vocab_size": 512, "hidden_size": 256, "num_attention_heads": 8, "rope_scaling": None,
    "blocks": ["2x gqa:2 swiglu:768", "none swiglu:512", "gqa:1 none", "linear linear"]})
B, T = 16, 256


def compiled_memory(mesh: MeshConfig, remat: str):
    layout = mesh.layout()
    model = nj.init(CFG, layout=layout, compute_dtype="float32", remat=remat)
    graphdef, state = nnx.split(model.module)
    opt = optax.adamw(1e-3)
    opt_state = jax.jit(opt.init)(state)

    def step(state, opt_state, tokens):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        grads = jax.grad(loss)(state)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state

    tokens = jax.device_put(jnp.zeros((B, T), jnp.int32), layout.sharding(("batch", None)))
    with use_layout(layout):
        return jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, tokens).compile().memory_analysis()


@pytest.mark.parametrize("mesh", [MeshConfig(data=2, fsdp=4, rules="fsdp"), MeshConfig(fsdp=4, tensor=2),
                                  MeshConfig(data=8, fsdp=1, rules="dp")], ids=["fsdp", "fsdp_tp", "dp"])
def test_plan_matches_compiled_memory(mesh):
    analysis = compiled_memory(mesh, remat="none")
    plan = plan_memory(CFG, mesh, 8, B, T, "train", remat="none", compute_dtype="float32",
                       attention_impl="xla", loss_chunk_tokens=B * T)
    # Weights + AdamW state are the step's arguments: exact up to the scalar step counters.
    assert abs(analysis.argument_size_in_bytes - plan.params_bytes - plan.optimizer_bytes) < 64 * 1024
    # Activations (plus gradients) are XLA's temporaries: within the stated 25 % tolerance.
    ratio = analysis.temp_size_in_bytes / (plan.activation_bytes + plan.gradient_bytes)
    assert 0.75 < ratio < 1.25, ratio


def test_tensor_parallel_fallbacks_are_reported():
    plan = plan_memory(CFG, MeshConfig(fsdp=2, tensor=4), 8, B, T, "train")
    assert any("layers.3.attention.k" in f for f in plan.fallbacks)  # 1 KV head cannot split 4 ways
    assert not any("layers.0.attention.q" in f for f in plan.fallbacks)


def test_remat_and_sharding_reduce_memory():
    full = plan_memory(CFG, MeshConfig(fsdp=8, rules="fsdp"), 8, B, T, "train", remat="full")
    none = plan_memory(CFG, MeshConfig(fsdp=8, rules="fsdp"), 8, B, T, "train", remat="none")
    assert full.activation_bytes < none.activation_bytes
    one = plan_memory(CFG, MeshConfig(fsdp=1, rules="fsdp"), 1, B, T, "train")
    assert one.params_bytes == CFG.num_params() * 4
    assert full.params_bytes < one.params_bytes / 4


def test_cli_answers_the_capacity_questions(capsys):
    assert main(["plan", "--model", "ln-ultra-253b", "--mesh", "tensor=8", "--batch", "1", "--seq", "32768",
                 "--mode", "infer", "--device", "h100", "--json"]) == 0
    ultra = json.loads(capsys.readouterr().out)
    assert ultra["fits"] and ultra["params_bytes"] == pytest.approx(253.4e9 * 2 / 8, rel=0.01)
    assert {"params_bytes", "optimizer_bytes", "activation_bytes", "kv_cache_bytes", "total_bytes"} <= set(ultra)
    assert main(["plan", "--model", "ln-super-49b", "--batch", "16", "--seq", "16384", "--device", "v5p",
                 "--find-devices", "--json"]) == 0
    super_ = json.loads(capsys.readouterr().out)
    assert super_["fits"] and super_["num_devices"] == 16


def test_cli_rejects_bad_mesh(capsys):
    assert main(["plan", "--model", "tiny-hetero", "--mesh", "pipeline=2", "--batch", "1", "--seq", "8"]) == 2
    assert "pipeline" in capsys.readouterr().err


def test_cli_lora_targets_and_sharded_adapters(capsys):
    """`plan --lora R --lora-targets ...` (the flags `compile` has): adapters only on the named
    projections, sharded like the weights they adapt (A [in, r] splits with `embed` over fsdp)."""
    args = ["plan", "--model", "tiny-llama", "--batch", "8", "--seq", "64", "--lora", "8", "--json"]
    assert main([*args, "--lora-targets", "q,v", "--devices", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    cfg = nj.preset("tiny-llama")
    kv = cfg.blocks[0].attention.num_kv_heads * cfg.head_dim
    assert one["adapter_params"] == cfg.num_layers * 8 * (2 * cfg.hidden_size + cfg.num_attention_heads * cfg.head_dim
                                                          + kv)
    assert main([*args, "--lora-targets", "q,v", "--devices", "8", "--mesh", "fsdp=8", "--rules", "fsdp"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert eight["optimizer_bytes"] < one["optimizer_bytes"]  # A's embed rows split 8 ways
    assert main([*args, "--lora-targets", "q,nope", "--devices", "1"]) == 2
    assert "lora.targets" in capsys.readouterr().err
