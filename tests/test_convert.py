"""Loading and saving checkpoints: every bad input gives one clear CheckpointError/ConfigError,
and a failed save leaves nothing behind."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nemotron_jax as nj
from nemotron_jax.convert.hf import write_hf
from nemotron_jax.model.params import flat_params


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_hetero):
    path = tmp_path_factory.mktemp("convert") / "hf"
    tiny_hetero.save_hf(path)
    return path


def copy_with(src, dst, change):
    """A copy of the HF directory `src` whose tensors dict went through `change`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def leftovers(parent, name):
    """Entries beside `name` that a failed write could have left (temp dirs are '.NAME.tmp.*')."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def test_pickle_only_checkpoint(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(nj.CheckpointError, match="pickle"):
        nj.load(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(nj.CheckpointError, match=r"model\.safetensors"):
        nj.load(tmp_path)


def test_missing_tensor(hf_dir, tmp_path):
    path = copy_with(hf_dir, tmp_path / "ckpt", lambda t: t.pop("model.layers.4.mlp.linear_mlp.weight"))
    with pytest.raises(nj.CheckpointError, match="missing") as info:
        nj.load(path)
    assert "model.layers.4.mlp.linear_mlp.weight" in str(info.value)


def test_unexpected_tensor(hf_dir, tmp_path):
    def add(t):  # layer 6 is an identity block: it has no weights at all
        t["model.layers.6.input_layernorm.weight"] = np.ones(64, np.float32)

    with pytest.raises(nj.CheckpointError, match="unexpected") as info:
        nj.load(copy_with(hf_dir, tmp_path / "ckpt", add))
    assert "model.layers.6.input_layernorm.weight" in str(info.value)


def test_rotary_inv_freq_buffers_are_tolerated(hf_dir, tmp_path):
    """Old transformers checkpoints carry non-persistent rotary buffers; they hold no weights."""
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    model = nj.load(copy_with(hf_dir, tmp_path / "ckpt", add))
    np.testing.assert_array_equal(np.asarray(model.module.embed[...]),
                                  load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"])


def test_misshaped_tensor(hf_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"  # 2 KV heads x 16: [32, 64]

    def reshape(t):
        t[name] = np.zeros((64, 64), np.float32)

    with pytest.raises(nj.CheckpointError) as info:
        nj.load(copy_with(hf_dir, tmp_path / "ckpt", reshape))
    message = str(info.value)
    assert name in message and "(64, 64)" in message and "(32, 64)" in message


def test_transposed_linear_replacement_is_not_silently_accepted(hf_dir, tmp_path):
    """A square [hidden, hidden] map has the right shape either way round; only the values differ,
    so the loader cannot catch this, but the layout check below pins which way round it is read."""
    tensors = load_file(hf_dir / "model.safetensors")
    model = nj.load(hf_dir)
    ours = np.asarray(model.module.layers[2].attention.kernel[...])  # [in, out]
    np.testing.assert_array_equal(ours, tensors["model.layers.2.self_attn.linear_attn.weight"].T)
    assert not np.array_equal(ours, ours.T)


def sharded(tiny_hetero, path):
    write_hf(path, tiny_hetero.config, flat_params(tiny_hetero.module), shard_bytes=128 * 1024)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return index


def test_index_names_missing_shard(tiny_hetero, tmp_path):
    index = sharded(tiny_hetero, tmp_path / "ckpt")
    gone = index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    (tmp_path / "ckpt" / gone).unlink()
    with pytest.raises(nj.CheckpointError, match=gone):
        nj.load(tmp_path / "ckpt")


def test_index_points_to_wrong_shard(tiny_hetero, tmp_path):
    index = sharded(tiny_hetero, tmp_path / "ckpt")
    name = "model.norm.weight"
    index["weight_map"][name] = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(nj.CheckpointError, match=name):
        nj.load(tmp_path / "ckpt")


def test_bad_index_and_corrupt_files(hf_dir, tiny_hetero, tmp_path):
    sharded(tiny_hetero, tmp_path / "a")
    (tmp_path / "a" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(nj.CheckpointError, match="index"):
        nj.load(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(nj.CheckpointError, match="weight_map"):
        nj.load(tmp_path / "a")
    # a truncated single file and a file that is not safetensors at all
    path = tmp_path / "b"
    shutil.copytree(hf_dir, path)
    data = (path / "model.safetensors").read_bytes()
    for garbage in (data[: len(data) // 2], b"garbage"):
        (path / "model.safetensors").write_bytes(garbage)
        with pytest.raises(nj.CheckpointError, match=r"model\.safetensors"):
            nj.load(path)


def test_config_that_does_not_match_weights(hf_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(hf_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["block_configs"][1]["ffn"]["ffn_mult"] = 6.0  # file holds width 512, config now says 256
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(nj.CheckpointError) as info:
        nj.load(path)
    assert "model.layers.1.mlp.gate_proj.weight" in str(info.value)
    assert "(512, 64)" in str(info.value) and "(256, 64)" in str(info.value)


def test_load_bad_arguments(hf_dir, tmp_path):
    with pytest.raises(nj.CheckpointError, match="nowhere"):
        nj.load(tmp_path / "nowhere")
    with pytest.raises(nj.CheckpointError):
        nj.load(hf_dir / "config.json")  # a file, not a model directory
    with pytest.raises(nj.ConfigError, match="float16"):
        nj.load(hf_dir, dtype="float16")
    with pytest.raises(nj.ConfigError):
        nj.load(tmp_path)  # an empty directory: no config.json


def test_save_refuses_non_empty_directory(tiny_hetero, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(nj.CheckpointError, match="not an empty directory"):
        tiny_hetero.save_hf(out)
    with pytest.raises(nj.CheckpointError, match="not an empty directory"):
        tiny_hetero.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path, "out") == ["out"]
    # an existing file is refused too; an existing empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(nj.CheckpointError):
        tiny_hetero.save_hf(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    tiny_hetero.save_hf(tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_failed_write_leaves_nothing(tiny_hetero, tmp_path):
    params = flat_params(tiny_hetero.module)
    params.pop(("final_norm", "weight"))  # fails after some tensors are written
    with pytest.raises(KeyError):
        write_hf(tmp_path / "out", tiny_hetero.config, params)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(nj.ConfigError):  # refused before anything is written
        tiny_hetero.save_hf(tmp_path / "out", format="llama")
    assert list(tmp_path.iterdir()) == []


def test_saved_model_round_trip(tiny_hetero, hf_dir, tmp_path):
    tiny_hetero.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_config.json").is_file()
    assert leftovers(tmp_path, "saved") == ["saved"]
    loaded = nj.load(tmp_path / "saved")
    assert loaded.config == tiny_hetero.config
    a, b = flat_params(tiny_hetero.module), flat_params(loaded.module)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 24))
    np.testing.assert_array_equal(loaded.logits(tokens), tiny_hetero.logits(tokens))
    # the saved model writes the same HF checkpoint as the original
    loaded.save_hf(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").read_text() == (hf_dir / "config.json").read_text()
    x, y = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)


def test_saved_model_bf16(hf_dir, tmp_path):
    model = nj.load(hf_dir, dtype="bfloat16")
    model.save(tmp_path / "saved")
    loaded = nj.load(tmp_path / "saved", dtype="bfloat16")
    a, b = flat_params(model.module), flat_params(loaded.module)
    assert all(str(v.dtype) == "bfloat16" for v in b.values())
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_saved_model_keeps_exact_ffn_mult(tmp_path):
    """The saved-model config (compact block strings) must keep an ffn_mult of 7 significant digits."""
    cfg = nj.ModelConfig(vocab_size=32, hidden_size=64, num_attention_heads=4, blocks=[
        nj.BlockConfig(nj.AttentionConfig("gqa", 2), nj.FFNConfig("swiglu", 256, 2.718281))])
    nj.ModelConfig.from_hf(cfg.to_hf()).replace()  # valid DeciLM
    saved = tmp_path / "model_config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    from nemotron_jax.presets import read_saved_config

    back = read_saved_config(tmp_path)
    assert back == cfg
    assert back.to_hf()["block_configs"][0]["ffn"]["ffn_mult"] == 2.718281


def test_saved_model_that_does_not_match_its_config(tiny_hetero, tmp_path):
    tiny_hetero.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "model_config.json").read_text())
    config["blocks"][1] = "gqa:2 swiglu:256"  # the params hold width 512
    (tmp_path / "saved" / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(nj.CheckpointError):
        nj.load(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / "params")
    with pytest.raises(nj.CheckpointError, match="params"):
        nj.load(tmp_path / "saved")
    (tmp_path / "saved" / "model_config.json").write_text("{oops")
    with pytest.raises(nj.ConfigError, match="JSON"):
        nj.load(tmp_path / "saved")


def test_bad_tokens(tiny_hetero):
    with pytest.raises(ValueError, match="512"):
        tiny_hetero.logits([[1, 2, 512]])
    with pytest.raises(ValueError, match="integers"):
        tiny_hetero.logits([[1.0, 2.0]])
