"""LoRA: adapters in the projections, PEFT files both ways (peft + transformers as the reference),
merging, the adapter-only train step, and GRPO with one copy of the base."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax import lora
from nemotron_jax.data.pipeline import DataPipeline, resolve_path
from nemotron_jax.errors import ConfigError
from nemotron_jax.lora import LoRAConfig
from nemotron_jax.model.lora import LoRAParam
from nemotron_jax.recipes import load_recipe, run_recipe
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.loop import run
from nemotron_jax.train.sources import PipelineSource
from nemotron_jax.train.strategies import LMStrategy

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-4  # float32 logits, ours vs torch (max abs, logits of size ~5)


def _tokens(vocab: int, shape=(2, 12), seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _randomise_adapters(model: nj.Model, seed: int = 0, scale: float = 0.05) -> None:
    """B is zero after init (outputs unchanged): give every adapter weight a random value."""
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model.module, LoRAParam))):
        var.set_value(scale * jax.random.normal(jax.random.key(seed * 1000 + i), var.shape))


@pytest.fixture(scope="module")
def hetero():
    return nj.init("tiny-hetero", seed=1)


def test_fresh_adapters_change_nothing_and_count(hetero):
    m = nj.init("tiny-hetero", seed=1)
    tokens = _tokens(m.config.vocab_size)
    before = m.logits(tokens)
    added = lora.add_adapters(m.module, LoRAConfig(rank=2), seed=0)
    kinds = {(b.attention.kind, b.ffn.kind) for b in m.config.blocks}
    assert ("linear" in {a for a, _ in kinds}) or ("linear" in {f for _, f in kinds})  # the linear blocks too
    assert added > 0 and lora.has_adapters(m.module)
    np.testing.assert_array_equal(m.logits(tokens), before)
    # Adapters are not nnx.Params: everything keyed on Params (save, HF export) sees only the base.
    assert len(nnx.to_flat_state(nnx.state(m.module, nnx.Param))) == len(nnx.to_flat_state(nnx.state(hetero.module,
                                                                                                      nnx.Param)))


def test_every_target_changes_the_output_and_merge_equals_adapter_forward(hetero):
    tokens = _tokens(hetero.config.vocab_size)
    base = hetero.logits(tokens)
    for target in ("q", "k", "v", "o", "gate", "up", "down", "linear_attn", "linear_mlp"):
        m = nj.Model(lora._clone(hetero.module))
        if not lora.add_adapters(m.module, LoRAConfig(rank=3, alpha=6.0, targets=(target,)), seed=2):
            continue
        _randomise_adapters(m, seed=5)
        out = m.logits(tokens)
        assert np.abs(out - base).max() > 1e-3, target
        merged = m.merge_adapters()
        assert not merged.has_adapters
        np.testing.assert_allclose(merged.logits(tokens), out, atol=2e-5, err_msg=target)
    np.testing.assert_array_equal(hetero.logits(tokens), base)  # the original is untouched


def test_base_view_shares_the_arrays(hetero):
    m = nj.Model(lora._clone(hetero.module)).add_adapters(rank=2)
    _randomise_adapters(m)
    view = lora.base_view(m.module)
    ids = lambda mod: {id(x) for x in jax.tree.leaves(nnx.state(mod, nnx.Param))}
    assert ids(view) == ids(m.module)
    tokens = _tokens(m.config.vocab_size)
    np.testing.assert_array_equal(nj.Model(view).logits(tokens), hetero.logits(tokens))


def test_config_validation():
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(rank=4, targets=("qq",)).validate()
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(rank=4, dropout=1.0).validate()
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", ["model.quantize=int8"])
    load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", ["model.quantize=int4", "lora.rank=4",
                                                        "lora.targets=[q,v]"]).validate()


# ---------------------------------------------------------------- PEFT + transformers

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """tiny-llama (random weights) exported in the Llama layout: (model, dir)."""
    model = nj.init("tiny-llama", seed=4)
    path = tmp_path_factory.mktemp("llama")
    model.save_hf(path / "hf", format="llama")
    return model, path / "hf"


def _hf(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                         dtype=torch.float32).eval()


def _torch_logits(hf, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def test_our_adapter_loads_in_peft_with_equal_logits(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base, hf_dir = llama_dir
    m = nj.load(hf_dir).add_adapters(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    _randomise_adapters(m, seed=1)
    m.save_adapters(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    tokens = _tokens(m.config.vocab_size)
    ours = m.logits(tokens)
    assert np.abs(ours - base.logits(tokens)).max() > 1e-2  # the adapters matter
    peft_model = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(peft_model, tokens), ours, atol=TOL)
    # ...and back: nj.load(base, adapters=ours) is the same model.
    np.testing.assert_allclose(nj.load(hf_dir, adapters=tmp_path / "adapter").logits(tokens), ours, atol=1e-5)


def test_peft_adapter_from_pytorch_loads_with_equal_logits(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    _, hf_dir = llama_dir
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                          lora_dropout=0.1, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(_hf(hf_dir), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval().save_pretrained(tmp_path / "torch-adapter")
    tokens = _tokens(512)
    ref = _torch_logits(peft_model, tokens)
    m = nj.load(hf_dir, adapters=tmp_path / "torch-adapter")
    np.testing.assert_allclose(m.logits(tokens), ref, atol=TOL)
    # merged (ours) equals peft's own merge_and_unload
    merged_ref = _torch_logits(peft_model.merge_and_unload(), tokens)
    np.testing.assert_allclose(m.merge_adapters().logits(tokens), merged_ref, atol=TOL)


def test_foreign_adapter_is_refused(llama_dir, hetero, tmp_path):
    m = nj.load(llama_dir[1]).add_adapters(rank=2)
    m.save_adapters(tmp_path / "a")
    with pytest.raises(Exception, match=r"names no projection|do not fit"):
        lora.load_adapters(lora._clone(hetero.module), tmp_path / "a")


# ---------------------------------------------------------------- training

def test_train_step_updates_only_adapters(tmp_path):
    """One LoRA run: the base is bit-identical afterwards, the adapters moved, and model/ holds the
    merged model that equals the adapter forward; adapter/ is a PEFT adapter."""
    model = nj.init("tiny-llama", seed=0)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model.module, nnx.Param))}
    recipe = load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", [
        f"output_dir={tmp_path}", "steps=3", "data.seq_len=128", "data.batch_size=8",
        "data.synthetic_examples=64", "eval_every=0",
        "lora.rank=2", "lora.dropout=0.1", "progress=false", "checkpoint_every=3"])
    tok = Tokenizer.from_file(recipe.data.tokenizer)
    pipe = DataPipeline(recipe.data, tok, 0, resolve_path(recipe.data, recipe.output_dir))
    result = run(recipe, model, LMStrategy(), PipelineSource(pipe))
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(result.model.module, nnx.Param))}
    assert before.keys() == after.keys() and all(np.array_equal(before[p], after[p]) for p in before)
    assert all(float(jnp.abs(v[...]).max()) > 0 for p, v in nnx.to_flat_state(nnx.state(result.model.module,
                                                                                         LoRAParam)) if p[-1] == "b")
    # the train state holds the adapters only (and so does the optimiser)
    n_state = sum(x.size for x in jax.tree.leaves(result.state.params))
    assert n_state == lora.adapter_count(result.model.module)
    tokens = _tokens(512)
    np.testing.assert_allclose(nj.load(tmp_path / "model").logits(tokens), result.model.logits(tokens), atol=2e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_sft_reaches_full_finetune_loss(tmp_path):
    """From one SFT'd base (60 steps), 30 more steps of full fine-tuning vs of LoRA (rank 2 on every
    projection: 3.6 % of the parameters): LoRA's held-out loss is within 5 % of full fine-tuning's
    (measured: base 1.035, full 0.914, LoRA 0.931) and below the base's."""
    over = ["data.seq_len=256", "data.batch_size=8", "progress=false", "log_every=10", "eval_every=0",
            "eval_batches=2", "checkpoint_every=100", "data.synthetic_examples=256", "data.max_examples=256"]
    base = run_recipe(load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", [*over, f"output_dir={tmp_path}/base",
                                                                          "steps=60"]))
    cont = [*over, f"model.source={tmp_path}/base/model", "steps=30"]
    full = run_recipe(load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", [*cont, f"output_dir={tmp_path}/full",
                                                                          "optimizer.lr=1e-3"]))
    lo = run_recipe(load_recipe(ROOT / "configs/recipes/sft-tiny.yaml", [
        *cont, f"output_dir={tmp_path}/lora", "lora.rank=2", "lora.alpha=4", "optimizer.lr=3e-2",
        "lora.targets=[q,k,v,o,gate,up,down]"]))
    trained = lora.adapter_count(lo.model.module)
    assert trained / lo.model.config.num_params() <= 0.05
    b, f, la = base.eval_metrics["eval_loss"], full.eval_metrics["eval_loss"], lo.eval_metrics["eval_loss"]
    print(f"held-out loss: base {b:.4f}, full FT {f:.4f}, LoRA {la:.4f} ({trained} of "
          f"{lo.model.config.num_params()} params)")
    assert f < b and la < b - 0.5 * (b - f)
    assert la <= 1.05 * f


@pytest.mark.slow
def test_grpo_with_lora_holds_one_copy_of_the_base(tmp_path, monkeypatch):
    """During a LoRA GRPO run the live device buffers hold each base weight once (the reference is
    the base without adapters, not a copy; the optimiser holds adapter moments only); without LoRA
    the reference copy shows as a second buffer."""
    from nemotron_jax.rl import grpo

    seen: list[int] = []
    real = grpo.GRPOSource.next_batch
    embedding = lambda x: x.shape == (512, 64) and x.dtype == jnp.float32
    before = [x for x in jax.live_arrays() if embedding(x)]  # other tests' models in this process: not counted

    def counting(self, step, params):
        seen.append(sum(1 for x in jax.live_arrays() if embedding(x) and not any(x is b for b in before)))
        return real(self, step, params)

    monkeypatch.setattr(grpo.GRPOSource, "next_batch", counting)
    over = ["start.sft_steps=0", "log_every=1", "sampling.group_size=4", "sampling.max_new_tokens=8",
            "progress=false", "grpo.prompts_per_iteration=2", "grpo.kl_coef=0.01", "steps=2", "checkpoint_every=2",
            "model.source=tiny-llama"]
    run_recipe(load_recipe(ROOT / "configs/recipes/grpo-tiny.yaml", [*over, f"output_dir={tmp_path}/lora",
                                                                    "lora.rank=2"]))
    with_lora, seen[:] = list(seen), []
    assert with_lora and max(with_lora) == 1, with_lora  # the embedding [512, 64] lives once
    run_recipe(load_recipe(ROOT / "configs/recipes/grpo-tiny.yaml", [*over, f"output_dir={tmp_path}/full"]))
    assert min(seen) >= 2, seen  # full fine-tuning: the trained weights and the reference copy


def test_convert_merge_adapters_cli(llama_dir, tmp_path):
    """`nemotron-jax convert SRC DST --merge-adapters DIR`: HF in -> saved model out, merged."""
    from nemotron_jax.cli import main

    m = nj.load(llama_dir[1]).add_adapters(rank=2, targets=("q", "down"))
    _randomise_adapters(m, seed=3)
    m.save_adapters(tmp_path / "adapter")
    main(["convert", str(llama_dir[1]), str(tmp_path / "merged"), "--merge-adapters", str(tmp_path / "adapter")])
    tokens = _tokens(512)
    out = nj.load(tmp_path / "merged")
    assert not out.has_adapters
    np.testing.assert_allclose(out.logits(tokens), m.logits(tokens), atol=2e-5)


@pytest.mark.slow
def test_lora_notebook(tmp_path):
    """colab/05_lora.ipynb top to bottom on tiny settings (QLoRA int4, rank 4)."""
    from test_notebooks import outputs, run_notebook

    params = "\n".join([
        'SOURCE = "tiny-llama"', 'PLAN_MODEL = "tiny-llama"', 'TOKENIZER = "tiny"', 'DATA = "synthetic:gsm8k"',
        'QUANTIZE = "int4"', "RANK, ALPHA = 4, 8.0", "SEQ, BATCH, STEPS, LR = 128, 8, 6, 1e-2", 'OUTPUT = "out"',
        'OVERRIDES = ["data.synthetic_examples=64", "progress=false", "eval_every=0", "checkpoint_every=6"]'])
    text = outputs(run_notebook("05_lora", tmp_path, params))
    assert "LoRA r4 + int4 base" in text and "adapter forward vs merged model" in text
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
