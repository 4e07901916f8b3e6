"""`nemotron-jax info | convert | demo`: results, and one-line errors that leave nothing behind."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nemotron_jax as nj
from nemotron_jax.cli import main
from nemotron_jax.convert.hf import tensor_specs

# tiny-hetero's parameter count worked out by hand from configs/models/tiny-hetero.yaml
# (hidden 64, 4 heads x 16, vocab 512): one term per block, norms included.
H = 64
GQA = {4: H + 2 * H * 64 + 2 * H * 64, 2: H + 2 * H * 64 + 2 * H * 32, 1: H + 2 * H * 64 + 2 * H * 16}
LINEAR = H + H * H
TINY_HETERO_PARAMS = (2 * 512 * H + H                          # embed, lm_head, final norm
                      + GQA[4] + (H + 3 * H * 256)              # gqa:4 swiglu:256
                      + GQA[2] + (H + 3 * H * 512)              # gqa:2 swiglu:512
                      + LINEAR + (H + 3 * H * 256)              # linear swiglu:256
                      + (H + 3 * H * 256)                       # none swiglu:256
                      + GQA[1] + LINEAR                         # gqa:1 linear
                      + GQA[2]                                  # gqa:2 none
                      + 0                                       # none none
                      + 2 * (GQA[2] + H + 3 * H * 256))         # 2x gqa:2 swiglu:256
TINY_HETERO_KV = (4 + 2 + 1 + 2 + 2 + 2) * 16 * 2 * 2


def run(capsys, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("nemotron-jax "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def nothing_written(parent, name):
    return not [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_hetero):
    path = tmp_path_factory.mktemp("cli") / "hf"
    tiny_hetero.save_hf(path)
    return path


# ---------------------------------------------------------------- info


def test_info_preset_json(capsys):
    rc, out, _ = run(capsys, "info", "ln-super-49b", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["num_params"] == 49_867_145_216
    assert info["kv_cache_bytes_per_token"] == 49 * 8 * 128 * 2 * 2
    assert len(info["layers"]) == 80
    assert sum(r["kv_bytes_per_token_bf16"] for r in info["layers"]) == info["kv_cache_bytes_per_token"]
    assert [r["attention"] for r in info["layers"]].count("none") == 31
    assert info["layers"][0]["ffn"] == "swiglu(14336)" and info["layers"][1]["ffn"] == "swiglu(28672)"


def test_info_table(capsys):
    rc, out, _ = run(capsys, "info", "ln-ultra-253b")
    assert rc == 0
    assert "253,401,268,224" in out and f"{64 * 8 * 128 * 4:,}" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) >= 162


def test_info_published_config_file(capsys, shared_data):
    path = shared_data / "configs" / "llama-3_1-nemotron-nano-8b-v1.config.json"
    rc, out, _ = run(capsys, "info", path, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["num_params"] == 8_030_261_248 and info["kv_cache_bytes_per_token"] == 32 * 8 * 128 * 4


def test_info_hf_dir_and_saved_model(capsys, hf_dir, tiny_hetero, tmp_path):
    tiny_hetero.save(tmp_path / "saved")
    for source in (hf_dir, hf_dir / "config.json", tmp_path / "saved", "tiny-hetero"):
        rc, out, _ = run(capsys, "info", source, "--json")
        assert rc == 0, source
        info = json.loads(out)
        assert info["num_params"] == TINY_HETERO_PARAMS, source
        assert info["kv_cache_bytes_per_token"] == TINY_HETERO_KV, source
        assert [r["attention"] for r in info["layers"]] == [
            "gqa(kv=4)", "gqa(kv=2)", "linear", "none", "gqa(kv=1)", "gqa(kv=2)", "none", "gqa(kv=2)", "gqa(kv=2)"]
        assert [r["ffn"] for r in info["layers"]] == [
            "swiglu(256)", "swiglu(512)", "swiglu(256)", "swiglu(256)", "linear", "none", "none", "swiglu(256)",
            "swiglu(256)"]
        assert info["layers"][6]["params"] == 0 and info["layers"][4]["kv_bytes_per_token_bf16"] == 16 * 2 * 2


def test_info_errors(capsys, tmp_path):
    rc, _, err = run(capsys, "info", "no-such-preset")
    assert_one_line_error(rc, err, "no-such-preset", "tiny-hetero")
    (tmp_path / "config.json").write_text("{broken")
    rc, _, err = run(capsys, "info", tmp_path / "config.json")
    assert_one_line_error(rc, err, "JSON")


# ---------------------------------------------------------------- convert


def test_convert_round_trip(capsys, hf_dir, tmp_path):
    rc, out, _ = run(capsys, "convert", hf_dir, tmp_path / "saved")
    assert rc == 0 and "wrote" in out
    assert (tmp_path / "saved" / "model_config.json").is_file()
    rc, out, _ = run(capsys, "convert", tmp_path / "saved", tmp_path / "hf")
    assert rc == 0 and "wrote" in out
    assert (tmp_path / "hf" / "config.json").read_text() == (hf_dir / "config.json").read_text()
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 24))
    np.testing.assert_array_equal(nj.load(tmp_path / "hf").logits(tokens), nj.load(hf_dir).logits(tokens))
    # bf16 on request, and the HF copy says so
    rc, _, _ = run(capsys, "convert", tmp_path / "saved", tmp_path / "bf16", "--dtype", "bfloat16")
    assert rc == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_convert_llama_format(capsys, tmp_path):
    """A plain Llama checkpoint (weights written here with numpy) -> saved model -> Llama layout."""
    src = tmp_path / "llama"
    src.mkdir()
    cfg = nj.preset("tiny-llama")
    (src / "config.json").write_text(json.dumps(cfg.to_hf("llama")))
    rng = np.random.default_rng(0)
    tensors = {s.hf_name: rng.standard_normal(s.hf_shape).astype(np.float32) for s in tensor_specs(cfg)}
    save_file(tensors, src / "model.safetensors")
    assert run(capsys, "convert", src, tmp_path / "saved")[0] == 0
    rc, _, _ = run(capsys, "convert", tmp_path / "saved", tmp_path / "hf", "--format", "llama")
    assert rc == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == cfg.to_hf("llama")
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_convert_missing_source_subprocess(tmp_path):
    """The real entry point: exit status 2, one line on stderr, no traceback, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "nemotron_jax", "convert", str(tmp_path / "missing"),
                           str(tmp_path / "dst")], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "convert", "missing")
    assert nothing_written(tmp_path, "dst")


def test_convert_bad_checkpoints(capsys, hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    save_file(tensors, bad / "model.safetensors")
    rc, _, err = run(capsys, "convert", bad, tmp_path / "dst")
    assert_one_line_error(rc, err, "model.layers.1.self_attn.k_proj.weight", "(64, 64)", "(32, 64)")
    assert nothing_written(tmp_path, "dst")

    (bad / "model.safetensors").write_bytes(b"not safetensors")
    rc, _, err = run(capsys, "convert", bad, tmp_path / "dst")
    assert_one_line_error(rc, err, "model.safetensors")
    assert nothing_written(tmp_path, "dst")

    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    rc, _, err = run(capsys, "convert", bad, tmp_path / "dst")
    assert_one_line_error(rc, err, "pickle")
    assert nothing_written(tmp_path, "dst")


def test_convert_refusals_leave_nothing(capsys, hf_dir, tiny_hetero, tmp_path):
    tiny_hetero.save(tmp_path / "saved")
    # a heterogeneous model has no Llama layout
    rc, _, err = run(capsys, "convert", tmp_path / "saved", tmp_path / "dst", "--format", "llama")
    assert_one_line_error(rc, err, "homogeneous")
    assert nothing_written(tmp_path, "dst")
    # an existing, non-empty destination is left alone
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    rc, _, err = run(capsys, "convert", hf_dir, tmp_path / "dst")
    assert_one_line_error(rc, err, "dst")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst.")] == []


# ---------------------------------------------------------------- demo


def test_demo(capsys, tmp_path):
    rc, out, err = run(capsys, "demo", "--output", tmp_path / "demo")
    assert rc == 0, err
    assert "max |logits difference| = 0.0e+00" in out
    assert f"parameters: {TINY_HETERO_PARAMS:,}" in out
    assert nj.ModelConfig.from_hf(tmp_path / "demo" / "hf").num_params() == TINY_HETERO_PARAMS
