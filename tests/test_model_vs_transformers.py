"""The forward pass and the HF checkpoint format against transformers' own Llama code.

(a) a transformers `LlamaForCausalLM` with Llama-3 RoPE scaling, loaded by nemotron-jax;
(b) a heterogeneous model against a reference assembled by hand from transformers' Llama pieces;
(c) the Llama-layout export loaded by transformers; (d) bit-exact HF -> nemotron-jax -> HF;
(e) sharded checkpoints; (f) scanned layers and bf16 compute.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

import nemotron_jax as nj  # noqa: E402
from nemotron_jax.convert.hf import tensor_specs, write_hf  # noqa: E402
from nemotron_jax.model.params import flat_params  # noqa: E402

TOL = 1e-4  # max |ours - reference| relative to max |reference|
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def tokens_for(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def llama_config(cfg: nj.ModelConfig, kv_heads=None, width=None, **kw):
    """A transformers LlamaConfig carrying cfg's globals (and one block's KV heads / FFN width)."""
    s = cfg.rope_scaling
    rope = ({"rope_type": "default", "rope_theta": cfg.rope_theta} if s is None else
            {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
             "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
             "original_max_position_embeddings": s.original_max_position_embeddings})
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=kv_heads or cfg.num_attention_heads, head_dim=cfg.head_dim,
        intermediate_size=width or 1, num_hidden_layers=1, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope, **kw)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def reference_logits(cfg: nj.ModelConfig, tensors: dict, tokens, positions=None) -> np.ndarray:
    """The SPEC §1 forward, built from transformers' LlamaAttention / LlamaMLP / LlamaRMSNorm /
    LlamaRotaryEmbedding, with weights looked up by their SPEC §2 names. Every tensor must be used."""
    used: set[str] = set()

    def take(name):
        used.add(name)
        return tensors[name].to(torch.float32)

    def load(module, prefix):
        names = [n for n in tensors if n.startswith(prefix)]
        module.load_state_dict({n.removeprefix(prefix): take(n) for n in names}, strict=True)
        return module.eval()

    def rmsnorm(name):
        norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norm.weight.copy_(take(name))
        return norm

    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    b, t = tokens.shape
    positions = torch.arange(t)[None].expand(b, t) if positions is None else torch.as_tensor(
        np.asarray(positions), dtype=torch.long)
    x = torch.nn.functional.embedding(tokens, take("model.embed_tokens.weight"))
    cos, sin = LlamaRotaryEmbedding(llama_config(cfg))(x, positions)
    # causal by token index (positions below are increasing within each row)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    for i, block in enumerate(cfg.blocks):
        pre = f"model.layers.{i}."
        att, ffn = block.attention, block.ffn
        if att.kind != "none":
            h = rmsnorm(pre + "input_layernorm.weight")(x)
            if att.kind == "gqa":
                module = load(LlamaAttention(llama_config(cfg, kv_heads=att.num_kv_heads), layer_idx=i),
                              pre + "self_attn.")
                x = x + module(h, position_embeddings=(cos, sin), attention_mask=mask)[0]
            else:
                x = x + h @ take(pre + "self_attn.linear_attn.weight").T
        if ffn.kind != "none":
            h = rmsnorm(pre + "post_attention_layernorm.weight")(x)
            if ffn.kind == "swiglu":
                x = x + load(LlamaMLP(llama_config(cfg, width=ffn.intermediate_size)), pre + "mlp.")(h)
            else:
                x = x + h @ take(pre + "mlp.linear_mlp.weight").T
    x = rmsnorm("model.norm.weight")(x)
    head = take("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    assert used == set(tensors), f"tensors the reference did not use: {sorted(set(tensors) - used)}"
    return (x @ head.T).numpy()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights of realistic scale (logits O(1)), and RMSNorm gains that are not all ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


def perturb_norms(tensors: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: (t * (1 + 0.3 * torch.randn(t.shape, generator=gen)) if n.endswith("norm.weight") else t)
            for n, t in tensors.items()}


def file_tensors(path) -> dict:
    """Every tensor of an HF directory (single file or sharded)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ---------------------------------------------------------------- (a) transformers Llama -> nemotron-jax

HOMOGENEOUS = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                   max_position_embeddings=1024, rope_parameters=LLAMA3_ROPE, bos_token_id=1, eos_token_id=[2, 3])


LLAMA_SHAPE = (3, 176)
LLAMA_POSITIONS = np.stack([np.arange(176), np.arange(176) + 100, 3 * np.arange(176) + 7])


def make_hf_llama(tmp_path, tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**HOMOGENEOUS, tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    randomize_(model, seed)
    model.save_pretrained(tmp_path)
    return model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A float32 transformers Llama (head_dim 32 != 64/4, FFN 96, llama3 RoPE from 64 positions)."""
    path = tmp_path_factory.mktemp("hf_llama")
    return make_hf_llama(path), path


@torch.no_grad()
def torch_logits(model, tokens, positions=None) -> np.ndarray:
    kw = {} if positions is None else {"position_ids": torch.as_tensor(np.asarray(positions), dtype=torch.long)}
    return model(torch.as_tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def test_llama3_inv_freq_matches_transformers():
    for theta, factor, head_dim, orig in ((500000.0, 8.0, 128, 8192), (500000.0, 16.0, 128, 8192),
                                          (10000.0, 8.0, 32, 64)):
        cfg = nj.ModelConfig(vocab_size=8, hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                             rope_theta=theta, rope_scaling=nj.RopeScaling(factor, 1.0, 4.0, orig),
                             blocks=[nj.BlockConfig(nj.AttentionConfig("gqa", 2), nj.FFNConfig("swiglu", 256))])
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](llama_config(cfg))
        np.testing.assert_allclose(cfg.rope_inv_freq(), ref.numpy(), rtol=1e-6)
        # scaling really changes something here (low frequencies are divided by the factor)
        assert not np.allclose(cfg.replace(rope_scaling=None).rope_inv_freq(), ref.numpy(), rtol=1e-3)


def test_transformers_llama_logits(hf_llama, tmp_path):
    """Batch of 3 rows at different positions, up to 7x past original_max_position_embeddings."""
    model, path = hf_llama
    ours = nj.load(path)
    cfg = ours.config
    assert cfg.head_dim == 32 and cfg.rope_scaling.original_max_position_embeddings == 64
    assert cfg.blocks[0].ffn.intermediate_size == 96 and cfg.blocks[0].attention.num_kv_heads == 2
    tokens = tokens_for(cfg.vocab_size, LLAMA_SHAPE)
    ref = torch_logits(model, tokens, LLAMA_POSITIONS)
    assert np.abs(ref).max() > 1.0  # logits of a meaningful scale
    got = ours.logits(tokens, positions=LLAMA_POSITIONS)
    assert got.dtype == np.float32
    assert rel_err(got, ref) < TOL
    # the positions are honoured: row 2's spread-out positions are not the default ones (row 1's
    # constant offset is invisible to RoPE, which only sees relative positions)
    np.testing.assert_allclose(ref[1], torch_logits(model, tokens[1:2])[0], atol=TOL * np.abs(ref).max())
    assert rel_err(got[2], torch_logits(model, tokens[2:3])[0]) > 100 * TOL

    # the comparison is sensitive to RoPE scaling: the same weights without it disagree
    unscaled = tmp_path / "unscaled"
    shutil.copytree(path, unscaled)
    config = json.loads((unscaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (unscaled / "config.json").write_text(json.dumps(config))
    assert rel_err(nj.load(unscaled).logits(tokens, positions=LLAMA_POSITIONS), ref) > 100 * TOL


def test_transformers_llama_tied_embeddings(tmp_path):
    model = make_hf_llama(tmp_path, tie=True, seed=1)
    ours = nj.load(tmp_path)
    assert ours.config.tie_word_embeddings
    tokens = tokens_for(ours.config.vocab_size, (1, 40), seed=1)
    assert rel_err(ours.logits(tokens), torch_logits(model, tokens)) < TOL


# ---------------------------------------------------------------- (b) heterogeneous vs a hand-built reference


# One token shape and one set of positions for every forward of tiny-hetero, so it compiles once.
HET_SHAPE = (3, 160)
HET_POSITIONS = np.stack([np.arange(160), np.arange(160) + 70, 2 * np.arange(160)])


@pytest.fixture(scope="module")
def hetero_hf(tmp_path_factory, tiny_hetero):
    path = tmp_path_factory.mktemp("hetero") / "hf"
    tiny_hetero.save_hf(path)
    return path


@pytest.fixture(scope="module")
def hetero_tokens(tiny_hetero):
    return tokens_for(tiny_hetero.config.vocab_size, HET_SHAPE, seed=3)


@pytest.fixture(scope="module")
def hetero_logits(tiny_hetero, hetero_tokens):
    return tiny_hetero.logits(hetero_tokens, positions=HET_POSITIONS)


def test_hetero_every_block_kind(tiny_hetero, hetero_hf, hetero_tokens, hetero_logits):
    cfg = tiny_hetero.config
    kinds = {(b.attention.kind, b.ffn.kind) for b in cfg.blocks}
    assert {a for a, _ in kinds} == {"gqa", "linear", "none"} and {f for _, f in kinds} == {"swiglu", "linear", "none"}
    assert len({b.attention.num_kv_heads for b in cfg.blocks if b.attention.kind == "gqa"}) >= 2
    tensors = load_file(hetero_hf / "model.safetensors")
    ref = reference_logits(cfg, tensors, hetero_tokens, HET_POSITIONS)
    assert np.abs(ref).max() > 0.5
    assert rel_err(hetero_logits, ref) < TOL
    # every row on its own equals its row of the batch (no mixing across the batch)
    row = reference_logits(cfg, tensors, hetero_tokens[2:], HET_POSITIONS[2:])
    np.testing.assert_allclose(ref[2:], row, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_hetero_loaded_with_norm_gains(hetero_hf, hetero_tokens, hetero_logits, tmp_path):
    """Norm gains that are not ones (init leaves them at one) go to the right sublayers."""
    tensors = perturb_norms(load_file(hetero_hf / "model.safetensors"), seed=4)
    shutil.copy(hetero_hf / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = nj.load(tmp_path)
    ref = reference_logits(ours.config, tensors, hetero_tokens, HET_POSITIONS)
    assert rel_err(ours.logits(hetero_tokens, positions=HET_POSITIONS), ref) < TOL
    # and the gains matter: the model with unit gains disagrees with this reference
    assert rel_err(hetero_logits, ref) > 100 * TOL


def test_hetero_packed_segments(tiny_hetero, hetero_hf, hetero_tokens, hetero_logits):
    """Row 0 packs two sequences (segment ids, positions restarting): each equals the sequence alone."""
    cfg = tiny_hetero.config
    tensors = load_file(hetero_hf / "model.safetensors")
    positions = HET_POSITIONS.copy()
    positions[0] = np.concatenate([np.arange(40), np.arange(120)])
    segments = np.zeros(HET_SHAPE, int)
    segments[0, 40:] = 1
    got = tiny_hetero.logits(hetero_tokens, positions=positions, segment_ids=segments)
    first = reference_logits(cfg, tensors, hetero_tokens[:1, :40])
    second = reference_logits(cfg, tensors, hetero_tokens[:1, 40:])
    assert rel_err(got[:1, :40], first) < TOL
    assert rel_err(got[:1, 40:], second) < TOL
    np.testing.assert_allclose(got[1:], hetero_logits[1:], rtol=1e-5, atol=1e-5 * np.abs(got).max())
    # without segment ids the second sequence would see the first
    unsegmented = tiny_hetero.logits(hetero_tokens, positions=positions)
    assert rel_err(unsegmented[:1, 40:], second) > 100 * TOL


def test_hetero_file_layout_is_spec(tiny_hetero, hetero_hf):
    """Tensor names and torch [out, in] shapes of SPEC §2, written out by hand for tiny-hetero."""
    h, v, n, d = 64, 512, 4, 16
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}

    def gqa(i, kv):
        expected.update({f"model.layers.{i}.input_layernorm.weight": (h,),
                         f"model.layers.{i}.self_attn.q_proj.weight": (n * d, h),
                         f"model.layers.{i}.self_attn.k_proj.weight": (kv * d, h),
                         f"model.layers.{i}.self_attn.v_proj.weight": (kv * d, h),
                         f"model.layers.{i}.self_attn.o_proj.weight": (h, n * d)})

    def swiglu(i, f):
        expected.update({f"model.layers.{i}.post_attention_layernorm.weight": (h,),
                         f"model.layers.{i}.mlp.gate_proj.weight": (f, h),
                         f"model.layers.{i}.mlp.up_proj.weight": (f, h),
                         f"model.layers.{i}.mlp.down_proj.weight": (h, f)})

    gqa(0, 4), swiglu(0, 256)
    gqa(1, 2), swiglu(1, 512)
    expected.update({"model.layers.2.input_layernorm.weight": (h,),
                     "model.layers.2.self_attn.linear_attn.weight": (h, h)})
    swiglu(2, 256)
    swiglu(3, 256)                                       # attention no-op: no input_layernorm
    gqa(4, 1)
    expected.update({"model.layers.4.post_attention_layernorm.weight": (h,),
                     "model.layers.4.mlp.linear_mlp.weight": (h, h)})
    gqa(5, 2)                                            # FFN no-op: no post_attention_layernorm
    # layer 6 is an identity block: no tensors at all
    gqa(7, 2), swiglu(7, 256)
    gqa(8, 2), swiglu(8, 256)
    tensors = load_file(hetero_hf / "model.safetensors")
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    blocks = json.loads((hetero_hf / "config.json").read_text())["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [1, 2, None, None, 4, 2, None, 2, 2]
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [6.0, 12.0, 6.0, 6.0, None, None, None, 6.0, 6.0]
    # the q projection is laid out head after head: head 1 of layer 0 is rows 16..31 of q_proj
    q = np.asarray(tiny_hetero.module.layers[0].attention.q[...])  # [D, N, H]
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"][16:32].numpy(), q[:, 1, :].T)


# ---------------------------------------------------------------- (c) Llama-layout export -> transformers


TINY_LLAMA_SHAPE = (2, 150)


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    """tiny-llama with numpy-drawn weights (norm gains != 1), written as DeciLM and loaded: (model, dir)."""
    cfg = nj.preset("tiny-llama")
    path = tmp_path_factory.mktemp("homogeneous")
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    rng = np.random.default_rng(12)
    tensors = {}
    for spec in tensor_specs(cfg):
        noise = rng.standard_normal(spec.hf_shape).astype(np.float32)
        tensors[spec.hf_name] = torch.from_numpy(
            1 + 0.3 * noise if spec.hf_name.endswith("norm.weight") else
            noise if spec.hf_name == "model.embed_tokens.weight" else noise * spec.hf_shape[1] ** -0.5)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return nj.load(path), path


def test_llama_export_loads_in_transformers(homogeneous, tmp_path):
    llama, _ = homogeneous
    llama.save_hf(tmp_path / "llama", format="llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "block_configs" not in config
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager",
                                                       dtype=torch.float32).eval()
    np.testing.assert_allclose(hf.model.rotary_emb.inv_freq.numpy(), llama.config.rope_inv_freq(), rtol=1e-6)
    tokens = tokens_for(llama.config.vocab_size, TINY_LLAMA_SHAPE, seed=7)
    ref = torch_logits(hf, tokens)
    assert rel_err(llama.logits(tokens), ref) < TOL


def test_llama_export_of_heterogeneous_is_refused(tiny_hetero, tmp_path):
    with pytest.raises(nj.ConfigError, match="homogeneous"):
        tiny_hetero.save_hf(tmp_path / "out", format="llama")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir


# ---------------------------------------------------------------- (d) bit-exact round trips


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_transformers_fp32(hf_llama, tmp_path):
    _, path = hf_llama
    nj.load(path).save_hf(tmp_path / "out", format="llama")
    assert_same_tensors(file_tensors(path), file_tensors(tmp_path / "out"))
    assert nj.ModelConfig.from_hf(tmp_path / "out") == nj.ModelConfig.from_hf(path)


def test_round_trip_transformers_bf16(hf_llama, tmp_path):
    model, _ = hf_llama
    src = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(src)
    model.to(torch.float32)
    original = file_tensors(src)
    assert all(t.dtype == torch.bfloat16 for t in original.values())
    loaded = nj.load(src, dtype="bfloat16")
    assert str(loaded.module.embed[...].dtype) == "bfloat16"
    loaded.save_hf(tmp_path / "out", format="llama")
    assert_same_tensors(original, file_tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_decilm(dtype, tiny_hetero, hetero_hf, tmp_path):
    src = hetero_hf
    if dtype == "bfloat16":  # a bf16 DeciLM checkpoint written by us
        nj.load(hetero_hf, dtype="bfloat16").save_hf(src := tmp_path / "bf16")
    nj.load(src, dtype=dtype).save_hf(tmp_path / "out")
    a, b = file_tensors(src), file_tensors(tmp_path / "out")
    assert_same_tensors(a, b)
    assert {t.dtype for t in a.values()} == {getattr(torch, dtype)}
    assert (src / "config.json").read_text() == (tmp_path / "out" / "config.json").read_text()
    assert json.loads((src / "config.json").read_text())["torch_dtype"] == dtype
    # and the tensors are the model's own weights (rounded to the dtype)
    embed = np.array(tiny_hetero.module.embed[...])
    np.testing.assert_array_equal(a["model.embed_tokens.weight"].float().numpy(),
                                  torch.from_numpy(embed).to(getattr(torch, dtype)).float().numpy())


# ---------------------------------------------------------------- (e) sharded checkpoints


def test_sharded_checkpoint(tiny_hetero, hetero_tokens, hetero_logits, tmp_path):
    path = tmp_path / "sharded"
    write_hf(path, tiny_hetero.config, flat_params(tiny_hetero.module), shard_bytes=128 * 1024)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = file_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in index["weight_map"].items():
        assert name in load_file(path / shard)
    np.testing.assert_array_equal(nj.load(path).logits(hetero_tokens, positions=HET_POSITIONS), hetero_logits)


def test_sharded_llama_loads_in_transformers(homogeneous, tmp_path):
    llama, _ = homogeneous
    path = tmp_path / "sharded"
    write_hf(path, llama.config, flat_params(llama.module), "llama", shard_bytes=64 * 1024)
    assert (path / "model.safetensors.index.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    tokens = tokens_for(llama.config.vocab_size, TINY_LLAMA_SHAPE, seed=7)
    assert rel_err(llama.logits(tokens), torch_logits(hf.eval(), tokens)) < TOL


# ---------------------------------------------------------------- (f) scan_layers and bf16


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-hetero"])
def test_scan_layers_equals_unrolled(preset, homogeneous, hetero_hf, hetero_tokens, hetero_logits):
    """tiny-llama is one run of 4 identical blocks (scanned entirely); tiny-hetero ends in a run of 2
    identical blocks and the rest stays unrolled. Same weights, loaded with scan_layers=True."""
    if preset == "tiny-llama":
        llama, path = homogeneous
        tokens, positions = tokens_for(llama.config.vocab_size, TINY_LLAMA_SHAPE, seed=7), None
        ref = llama.logits(tokens)
    else:
        tokens, positions, ref, path = hetero_tokens, HET_POSITIONS, hetero_logits, hetero_hf
    scanned = nj.load(path, scan_layers=True)
    assert scanned.policy.scan_layers
    assert rel_err(scanned.logits(tokens, positions=positions), ref) < 1e-5


def test_bf16_close_to_fp32(hetero_hf, hetero_tokens, hetero_logits):
    model = nj.load(hetero_hf, dtype="bfloat16")  # bf16 weights, bf16 matmuls
    assert {str(v.dtype) for v in flat_params(model.module).values()} == {"bfloat16"}
    got = model.logits(hetero_tokens, positions=HET_POSITIONS)
    assert got.dtype == np.float32
    err = rel_err(got, hetero_logits)
    assert 0 < err < 5e-2, err  # bf16 really is used, and stays close
