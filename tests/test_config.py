"""ModelConfig against the published Llama-Nemotron configs and every validation error path.

The reference figures (parameter counts) are the published ones; KV-cache bytes are recomputed
here straight from the JSON, independently of `ModelConfig`.
"""

import copy
import json

import pytest

import nemotron_jax as nj
from nemotron_jax.config import ffn_mult_for_width, ffn_width

PUBLISHED = {  # preset -> (file in shared/data/configs, published parameter count)
    "ln-nano-8b": ("llama-3_1-nemotron-nano-8b-v1.config.json", 8_030_261_248),
    "ln-super-49b": ("llama-3_3-nemotron-super-49b-v1.config.json", 49_867_145_216),
    "ln-ultra-253b": ("llama-3_1-nemotron-ultra-253b-v1.config.json", 253_401_268_224),
}
# bf16 KV bytes/token worked out by hand: GQA blocks x 8 KV heads x 128 x (K and V) x 2 bytes
PRESET_KV_BF16 = {"ln-nano-8b": 32 * 8 * 128 * 4, "ln-super-49b": 49 * 8 * 128 * 4,
                  "ln-ultra-253b": 64 * 8 * 128 * 4}
# auto_map: ours names NVIDIA's repo for the remote code ("repo--module.Class"; tests/test_hf_export.py)
BOOKKEEPING = {"_name_or_path", "transformers_version", "use_cache", "initializer_range", "pretraining_tp",
               "attention_dropout", "auto_map"}


def _published(shared_data, name):
    return json.loads((shared_data / "configs" / PUBLISHED[name][0]).read_text())


def _kv_bytes_from_json(data: dict, bytes_per_value: int = 2) -> int:
    """Independent of ModelConfig: count the GQA blocks' KV heads in the raw JSON."""
    heads = data["num_attention_heads"]
    head_dim = data.get("head_dim") or data["hidden_size"] // heads
    if data.get("block_configs") is None:
        kv_heads = data["num_hidden_layers"] * (data.get("num_key_value_heads") or heads)
    else:
        kv_heads = sum(heads // b["attention"]["n_heads_in_group"] for b in data["block_configs"]
                       if not b["attention"]["no_op"] and not b["attention"]["replace_with_linear"])
    return kv_heads * head_dim * 2 * bytes_per_value


# ---------------------------------------------------------------- published configs and presets


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_counts(shared_data, name):
    data = _published(shared_data, name)
    cfg = nj.ModelConfig.from_hf(shared_data / "configs" / PUBLISHED[name][0])
    assert cfg.num_params() == PUBLISHED[name][1]
    assert cfg.kv_cache_bytes_per_token("bfloat16") == _kv_bytes_from_json(data, 2)
    assert cfg.kv_cache_bytes_per_token("float32") == _kv_bytes_from_json(data, 4)
    assert cfg.num_layers == data["num_hidden_layers"]
    # the per-layer table adds up to the totals (embeddings + final norm + head are not in layers)
    table = cfg.layer_table()
    embed_head_norm = 2 * data["vocab_size"] * data["hidden_size"] + data["hidden_size"]
    assert sum(r["params"] for r in table) + embed_head_norm == PUBLISHED[name][1]
    assert sum(r["kv_bytes_per_token_bf16"] for r in table) == _kv_bytes_from_json(data, 2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_counts(name):
    cfg = nj.preset(name)
    assert cfg.num_params() == PUBLISHED[name][1]
    assert cfg.kv_cache_bytes_per_token("bfloat16") == PRESET_KV_BF16[name]
    assert cfg.kv_cache_bytes_per_token() == PRESET_KV_BF16[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_equals_published(shared_data, name):
    published = nj.ModelConfig.from_hf(_published(shared_data, name))
    assert nj.preset(name) == published
    # and it exports to the very same block list (ffn_mult included, e.g. Ultra's 31.40625)
    if published.is_homogeneous:
        assert nj.preset(name).to_hf("llama") == published.to_hf("llama")
    else:
        assert nj.preset(name).to_hf()["block_configs"] == _published(shared_data, name)["block_configs"]


def test_released_shapes_match_spec(shared_data):
    """SPEC §2 'Released shapes' as read by ModelConfig."""
    super_ = nj.ModelConfig.from_hf(_published(shared_data, "ln-super-49b"))
    assert (super_.num_layers, super_.hidden_size, super_.num_attention_heads, super_.head_dim) == (80, 8192, 64, 128)
    kinds = [b.attention.kind for b in super_.blocks]
    assert kinds.count("gqa") == 49 and kinds.count("none") == 31
    assert {b.attention.num_kv_heads for b in super_.blocks if b.attention.kind == "gqa"} == {8}
    assert {b.ffn.ffn_mult for b in super_.blocks} == {0.5, 1.0, 1.3125, 2.625, 3.28125, 5.25}

    ultra = nj.ModelConfig.from_hf(_published(shared_data, "ln-ultra-253b"))
    assert ultra.num_layers == 162 and ultra.rope_scaling.factor == 16.0
    identity = [i for i, b in enumerate(ultra.blocks) if b.attention.kind == "none" and b.ffn.kind == "none"]
    ffn_only = [i for i, b in enumerate(ultra.blocks) if b.attention.kind == "none" and b.ffn.kind == "swiglu"]
    gqa = [i for i, b in enumerate(ultra.blocks) if b.attention.kind == "gqa"]
    assert (len(identity), len(gqa), len(ffn_only)) == (81, 64, 17)
    fused = [i for i, b in enumerate(ultra.blocks) if b.ffn.ffn_mult and b.ffn.ffn_mult > 20]
    assert fused == [125, 134, 143, 149]
    assert ultra.blocks[143].ffn.intermediate_size == 343040  # 2 * 31.40625 * 16384 / 3 exactly

    nano = nj.ModelConfig.from_hf(_published(shared_data, "ln-nano-8b"))
    assert nano.is_homogeneous and nano.blocks[0].ffn.intermediate_size == 14336
    assert nano.blocks[0].attention.num_kv_heads == 8 and nano.num_layers == 32


@pytest.mark.parametrize("name", ["ln-super-49b", "ln-ultra-253b"])
def test_hf_round_trip_decilm(shared_data, name):
    original = _published(shared_data, name)
    written = nj.ModelConfig.from_hf(original).to_hf()
    for key, value in original.items():
        if key in BOOKKEEPING:
            continue
        assert key in written, key
        assert written[key] == value, key
    assert written["block_configs"] == original["block_configs"]
    assert json.loads(json.dumps(written)) == written  # plain JSON types only
    # and reading our own output back gives the same config
    assert nj.ModelConfig.from_hf(written) == nj.ModelConfig.from_hf(original)


def test_hf_round_trip_llama(shared_data):
    original = _published(shared_data, "ln-nano-8b")
    cfg = nj.ModelConfig.from_hf(original)
    written = cfg.to_hf("llama")
    assert {k: v for k, v in written.items()} == {k: v for k, v in original.items() if k not in BOOKKEEPING}
    # the DeciLM spelling of the same model reads back to the same model (it gains ffn_mult 5.25)
    as_decilm = nj.ModelConfig.from_hf(cfg.to_hf("decilm"))
    assert as_decilm.to_hf("llama") == written
    assert as_decilm.blocks[0].ffn.ffn_mult == 5.25
    assert all(b["attention"]["n_heads_in_group"] == 4 for b in cfg.to_hf()["block_configs"])


def test_transformers5_spelling(shared_data):
    """`rope_parameters` (rope_theta inside), `dtype` and an explicit head_dim are read."""
    v4 = _published(shared_data, "ln-super-49b")
    v5 = copy.deepcopy(v4)
    v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_theta": v5.pop("rope_theta")}
    v5["dtype"] = v5.pop("torch_dtype")
    v5["head_dim"] = 128
    assert nj.ModelConfig.from_hf(v5) == nj.ModelConfig.from_hf(v4)

    # a different rope_theta inside rope_parameters is honoured, and default rope means no scaling
    v5["rope_parameters"]["rope_theta"] = 1234.0
    assert nj.ModelConfig.from_hf(v5).rope_theta == 1234.0
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = nj.ModelConfig.from_hf(v5)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0
    v5["dtype"] = "float32"
    assert nj.ModelConfig.from_hf(v5).torch_dtype == "float32"


def test_explicit_head_dim_is_honoured():
    base = _tiny_hf()
    base["head_dim"] = 32  # 4 heads x 32 = 128 != hidden 64
    cfg = nj.ModelConfig.from_hf(base)
    assert cfg.head_dim == 32
    # q,k,v,o of block 0 (4 query heads, 2 KV heads) and block 1 (4 KV heads), by hand
    h, d = 64, 32
    attn = (2 * h * 4 * d + 2 * h * 2 * d) + (2 * h * 4 * d + 2 * h * 4 * d)
    ffn = 3 * h * 256 + 3 * h * 256
    norms = 4 * h + h
    assert cfg.num_params() == 2 * 512 * h + attn + ffn + norms
    assert cfg.kv_cache_bytes_per_token("bfloat16") == (2 + 4) * d * 2 * 2
    assert cfg.to_hf()["head_dim"] == 32
    assert nj.ModelConfig.from_hf(cfg.to_hf()) == cfg
    # the default head_dim is not written (so 4.x readers derive it)
    assert "head_dim" not in nj.ModelConfig.from_hf(_tiny_hf()).to_hf()


def test_tied_embeddings_counted_once():
    data = _tiny_hf()
    untied = nj.ModelConfig.from_hf(data)
    data["tie_word_embeddings"] = True
    tied = nj.ModelConfig.from_hf(data)
    assert untied.num_params() - tied.num_params() == 512 * 64
    assert tied.to_hf()["tie_word_embeddings"] is True


def test_kv_cache_dtype():
    cfg = nj.ModelConfig.from_hf(_tiny_hf())
    assert cfg.kv_cache_bytes_per_token("float32") == 2 * cfg.kv_cache_bytes_per_token("bfloat16")
    with pytest.raises(nj.ConfigError, match="float64"):
        cfg.kv_cache_bytes_per_token("float64")


@pytest.mark.parametrize(("mult", "hidden", "width"), [
    (2.625, 4096, 7168), (5.25, 4096, 14336), (5.25, 8192, 28672), (1.3125, 8192, 7168),
    (0.4875, 16384, 5376),   # 5324 -> next multiple of 256
    (31.40625, 16384, 343040), (39.0, 16384, 425984),
    (1.0, 64, 256), (3.0, 128, 256), (3.03, 128, 512),  # 258 -> 512
])
def test_ffn_width(mult, hidden, width):
    assert ffn_width(mult, hidden) == width
    assert width % 256 == 0


def test_ffn_mult_for_width():
    assert ffn_mult_for_width(14336, 4096) == 5.25
    assert ffn_width(ffn_mult_for_width(343040, 16384), 16384) == 343040
    with pytest.raises(nj.ConfigError, match="300"):
        ffn_mult_for_width(300, 64)


def test_preset_names_and_unknown_preset():
    assert {"ln-nano-8b", "ln-super-49b", "ln-ultra-253b", "tiny-hetero", "tiny-llama"} <= set(nj.preset_names())
    with pytest.raises(nj.ConfigError, match="tiny-hetero"):
        nj.preset("no-such-model")


def test_tiny_presets_are_what_they_say():
    hetero = nj.preset("tiny-hetero")
    kinds = {(b.attention.kind, b.ffn.kind) for b in hetero.blocks}
    assert {"gqa", "linear", "none"} == {a for a, _ in kinds}
    assert {"swiglu", "linear", "none"} == {f for _, f in kinds}
    assert ("none", "none") in kinds
    assert not hetero.is_homogeneous and nj.preset("tiny-llama").is_homogeneous
    with pytest.raises(nj.ConfigError, match="homogeneous"):
        hetero.to_hf("llama")


def test_native_dict_round_trip_keeps_ffn_mult_exactly():
    """to_dict/from_dict (presets, saved models) must not round ffn_mult (was `:g`, 6 digits)."""
    data = _tiny_hf()
    data["block_configs"][1]["ffn"]["ffn_mult"] = 2.718281
    cfg = nj.ModelConfig.from_hf(data)
    back = nj.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.to_hf()["block_configs"] == data["block_configs"]


# ---------------------------------------------------------------- validation errors


def _tiny_hf() -> dict:
    """A valid 2-block DeciLM config.json dict: hidden 64, 4 heads (16 each)."""
    block = {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False,
                           "sparsify": None, "num_sink_tokens": None, "window_length": None,
                           "unshifted_sink": False, "use_prefill_window_in_sink_attention": False},
             "ffn": {"ffn_mult": 3.0, "no_op": False, "replace_with_linear": False, "sparsify": None}}
    second = copy.deepcopy(block)
    second["attention"]["n_heads_in_group"] = 1
    return {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": 512,
            "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": None,
            "num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": None, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "block_configs": [block, second]}


def test_tiny_hf_is_valid():
    cfg = nj.ModelConfig.from_hf(_tiny_hf())
    assert [b.attention.num_kv_heads for b in cfg.blocks] == [2, 4]
    assert cfg.eos_token_ids == (2,)


def _error(mutate, *fragments, exc=nj.ConfigError):
    data = _tiny_hf()
    mutate(data)
    with pytest.raises(exc) as info:
        nj.ModelConfig.from_hf(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError)
    return message


@pytest.mark.parametrize("part", ["attention", "ffn"])
def test_no_op_and_linear_are_exclusive(part):
    def mutate(d):
        d["block_configs"][1][part].update(no_op=True, replace_with_linear=True)
        d["block_configs"][1]["attention"]["n_heads_in_group"] = None
        d["block_configs"][1]["ffn"]["ffn_mult"] = None

    _error(mutate, "block 1", f"{part}.no_op", "replace_with_linear")


def test_n_heads_in_group_must_divide_heads():
    _error(lambda d: d["block_configs"][1]["attention"].update(n_heads_in_group=3), "block 1", "n_heads_in_group")
    _error(lambda d: d["block_configs"][0]["attention"].update(n_heads_in_group=0), "block 0", "n_heads_in_group")
    _error(lambda d: d["block_configs"][0]["attention"].update(n_heads_in_group=None), "block 0", "n_heads_in_group")


def test_n_heads_in_group_must_be_null_when_no_op():
    _error(lambda d: d["block_configs"][1]["attention"].update(no_op=True), "block 1", "n_heads_in_group")
    _error(lambda d: d["block_configs"][0]["ffn"].update(replace_with_linear=True), "block 0", "ffn_mult")


@pytest.mark.parametrize(("key", "value"), [
    ("window_length", 4096), ("num_sink_tokens", 4), ("sparsify", {"type": "2:4"}),
    ("unshifted_sink", True), ("use_prefill_window_in_sink_attention", True),
])
def test_unsupported_attention_options(key, value):
    _error(lambda d: d["block_configs"][1]["attention"].update({key: value}), "block 1", key)


def test_unsupported_ffn_sparsify():
    _error(lambda d: d["block_configs"][0]["ffn"].update(sparsify={"type": "2:4"}), "block 0", "sparsify")


def test_unknown_keys():
    _error(lambda d: d.update(my_new_feature=True), "my_new_feature")
    _error(lambda d: d["block_configs"][1]["attention"].update(banana=1), "block 1", "banana")
    _error(lambda d: d["block_configs"][0]["ffn"].update(gated=False), "block 0", "gated")
    _error(lambda d: d["block_configs"][1].update(extra={}), "block_configs[1]")


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"])
def test_missing_key(key):
    _error(lambda d: d.pop(key), key)


def test_missing_ffn_mult_and_wrong_block_count():
    _error(lambda d: d["block_configs"][1]["ffn"].update(ffn_mult=None), "block 1", "ffn_mult")
    _error(lambda d: d["block_configs"][1]["ffn"].update(ffn_mult=-1.0), "block 1", "ffn_mult")
    _error(lambda d: d.update(num_hidden_layers=3), "block_configs", "3")


def test_llama_layout_missing_intermediate_size():
    def mutate(d):
        del d["block_configs"], d["intermediate_size"]
        d["num_key_value_heads"] = 2

    _error(mutate, "intermediate_size")


def test_bad_types():
    _error(lambda d: d.update(hidden_size="64"), "hidden_size")
    _error(lambda d: d.update(num_attention_heads=True), "num_attention_heads")


def test_hidden_act_and_biases():
    _error(lambda d: d.update(hidden_act="gelu"), "hidden_act", "gelu")
    _error(lambda d: d.update(attention_bias=True), "attention_bias")
    _error(lambda d: d.update(mlp_bias=True), "mlp_bias")


def test_rope_scaling_errors():
    _error(lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn")
    _error(lambda d: d.update(rope_scaling={"rope_type": "llama3"}), "factor")


def test_bad_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,')
    with pytest.raises(nj.ConfigError, match="JSON") as info:
        nj.ModelConfig.from_hf(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(nj.ConfigError, match="JSON"):
        nj.ModelConfig.from_hf(tmp_path)  # a directory holding the bad config.json
    bad.write_text("[1, 2]")
    with pytest.raises(nj.ConfigError, match="object"):
        nj.ModelConfig.from_hf(bad)
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(nj.ConfigError, match="nowhere"):
        nj.ModelConfig.from_hf(missing)
    with pytest.raises(nj.ConfigError):
        nj.ModelConfig.from_hf(tmp_path / "empty_dir_that_does_not_exist")


def test_export_errors():
    hetero = nj.ModelConfig.from_hf(_tiny_hf())  # 2 and 4 KV heads: not one Llama shape
    assert not hetero.is_homogeneous
    with pytest.raises(nj.ConfigError, match="homogeneous"):
        hetero.to_hf("llama")
    with pytest.raises(nj.ConfigError, match="bogus"):
        hetero.to_hf("bogus")
    # a width that no ffn_mult produces cannot be written in DeciLM layout (but can as Llama)
    odd = nj.ModelConfig(vocab_size=16, hidden_size=64, num_attention_heads=4,
                         blocks=[nj.BlockConfig(nj.AttentionConfig("gqa", 4), nj.FFNConfig("swiglu", 200))])
    with pytest.raises(nj.ConfigError, match="200"):
        odd.to_hf()
    assert odd.to_hf("llama")["intermediate_size"] == 200


def test_direct_construction_errors():
    gqa = nj.AttentionConfig("gqa", 4)
    swiglu = nj.FFNConfig("swiglu", 256)

    def make(*blocks, **kw):
        return nj.ModelConfig(vocab_size=16, hidden_size=64, num_attention_heads=4, blocks=blocks, **kw)

    with pytest.raises(nj.ConfigError, match="block 1"):
        make(nj.BlockConfig(gqa, swiglu), nj.BlockConfig(nj.AttentionConfig("gqa", 3), swiglu))
    with pytest.raises(nj.ConfigError, match="block 0"):
        make(nj.BlockConfig(nj.AttentionConfig("none", 2), swiglu))
    with pytest.raises(nj.ConfigError, match="block 0"):
        make(nj.BlockConfig(gqa, nj.FFNConfig("linear", 256)))
    with pytest.raises(nj.ConfigError, match="at least one block"):
        make()
    with pytest.raises(nj.ConfigError, match="head_dim"):
        make(nj.BlockConfig(gqa, swiglu), head_dim=15)


def test_from_dict_errors():
    good = nj.preset("tiny-hetero").to_dict()
    assert nj.ModelConfig.from_dict(good) == nj.preset("tiny-hetero")
    with pytest.raises(nj.ConfigError, match="colour"):
        nj.ModelConfig.from_dict({**good, "colour": "green"})
    with pytest.raises(nj.ConfigError, match=r"blocks\[1\]"):
        nj.ModelConfig.from_dict({**good, "blocks": ["gqa:4 swiglu:256", "mamba swiglu:256"]})
    with pytest.raises(nj.ConfigError, match=r"blocks\[0\]"):
        nj.ModelConfig.from_dict({**good, "blocks": ["gqa:4"]})
