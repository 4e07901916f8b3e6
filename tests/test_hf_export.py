"""HF exports that load where users load Nemotron.

- DeciLM: `config.json` against the published Nemotron configs (../shared/data/configs): the same
  keys, architectures, model_type, block_configs schema and an `auto_map` that transformers'
  remote-code path resolves to NVIDIA's repo (checked by asking transformers itself); what vLLM's
  `DeciLMForCausalLM` reads from it.
- Llama: the export directory as a new user loads it with the Auto classes: model, tokenizer
  (ids equal ours) and generation config (greedy continuation equal ours, stopping at the same eos).
- The extra files appear with the weights or not at all.
"""

import dataclasses
import json

import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.convert.hf_config import DECILM_CODE_REPO, compact_to_hf, ecosystem_warnings
from nemotron_jax.convert.hf_files import REASONING_SAMPLING

PUBLISHED_DECILM = {"ln-super-49b": "llama-3_3-nemotron-super-49b-v1",
                    "ln-ultra-253b": "llama-3_1-nemotron-ultra-253b-v1"}
# Written by transformers' save_pretrained, not part of the model.
NOT_OURS = {"_name_or_path", "transformers_version"}
CHAT = [{"role": "user", "content": "What is 17 + 25?"}]


def published(shared_data, name):
    path = shared_data / "configs" / f"{PUBLISHED_DECILM.get(name, name)}.config.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED_DECILM))
def test_decilm_config_is_the_published_one(shared_data, name):
    original = published(shared_data, name)
    ours = nj.ModelConfig.from_hf(original).to_hf()
    assert set(ours) == set(original) - NOT_OURS
    for key in set(ours) - {"auto_map"}:
        assert ours[key] == original[key], key
    assert ours["architectures"] == ["DeciLMForCausalLM"] and ours["model_type"] == "nemotron-nas"
    # the published auto_map points into its own repo; ours points at the same module.Class in NVIDIA's repo
    assert set(ours["auto_map"]) == set(original["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    for auto, ref in ours["auto_map"].items():
        assert ref == f"{DECILM_CODE_REPO}--{original['auto_map'][auto]}"
    for mine, theirs in zip(ours["block_configs"], original["block_configs"], strict=True):
        assert set(mine) == set(theirs) == {"attention", "ffn"}
        assert set(mine["attention"]) == set(theirs["attention"]) and set(mine["ffn"]) == set(theirs["ffn"])
    assert ecosystem_warnings(ours) == []


def test_transformers_resolves_the_remote_code_from_nvidias_repo(shared_data, tmp_path, monkeypatch):
    """AutoConfig(trust_remote_code=True) on an export asks the Hub for NVIDIA's configuration_decilm.py."""
    transformers = pytest.importorskip("transformers")
    from transformers import dynamic_module_utils

    (tmp_path / "config.json").write_text(json.dumps(nj.ModelConfig.from_hf(published(shared_data, "ln-super-49b"))
                                                     .to_hf()))
    asked = []

    def fetch(repo, module_file, **kwargs):
        asked.append((repo, module_file))
        raise OSError("offline test: stop here")

    monkeypatch.setattr(dynamic_module_utils, "get_cached_module_file", fetch)
    with pytest.raises(OSError, match="offline test"):
        transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert asked == [(DECILM_CODE_REPO, "configuration_decilm.py")]


@pytest.mark.parametrize("name", sorted(PUBLISHED_DECILM))
def test_decilm_config_reads_as_vllm_reads_it(shared_data, name):
    """vLLM's nemotron_nas.py: KV heads from the first attention block, each block's width from
    `ffn_mult` (its own rounding), no-op flags; it has no linear blocks (ecosystem_warnings)."""
    cfg = nj.ModelConfig.from_hf(published(shared_data, name))
    hf = cfg.to_hf()
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    first = next(b["attention"] for b in hf["block_configs"] if not b["attention"]["no_op"])
    assert heads // first["n_heads_in_group"] == next(b.attention.num_kv_heads for b in cfg.blocks
                                                       if b.attention.kind == "gqa")
    for block, ours in zip(hf["block_configs"], cfg.blocks, strict=True):
        assert block["attention"]["no_op"] == (ours.attention.kind == "none")
        if not block["ffn"]["no_op"]:
            n = int(2 * block["ffn"]["ffn_mult"] * hidden / 3)
            assert n + (-n % 256) == ours.ffn.intermediate_size
    assert hf["rope_scaling"]["rope_type"] == "llama3" and hf["tie_word_embeddings"] is False


def test_linear_blocks_warn_that_vllm_cannot_load_them(tiny_hetero, tmp_path):
    hf = tiny_hetero.config.to_hf()
    linear = [i for i, b in enumerate(tiny_hetero.config.blocks) if "linear" in (b.attention.kind, b.ffn.kind)]
    assert linear and ecosystem_warnings(hf) and str(linear) in ecosystem_warnings(hf)[0]
    with pytest.warns(UserWarning, match="vLLM"):
        tiny_hetero.save_hf(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == hf
    for bad in ("nvidia/x--y", "nemotron"):
        with pytest.raises(nj.ConfigError, match="owner/name"):
            compact_to_hf(dataclasses.asdict(tiny_hetero.config), code_repo=bad)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("export") / "hf"
    tiny_llama.save_hf(path, format="llama", tokenizer="tiny")
    return path


def test_llama_export_loads_with_the_auto_classes(llama_export, tiny_llama):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    files = sorted(p.name for p in llama_export.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    tok, ours = transformers.AutoTokenizer.from_pretrained(llama_export), nj.Tokenizer.tiny()
    for thinking in (True, False):
        system = {"role": "system", "content": f"detailed thinking {'on' if thinking else 'off'}"}
        out = tok.apply_chat_template([system, *CHAT], add_generation_prompt=True, tokenize=True)
        assert list(out["input_ids"] if hasattr(out, "keys") else out) == ours.apply_chat_template(CHAT, thinking)
    assert tok.encode("Héllo 12 + 7", add_special_tokens=False) == ours.encode("Héllo 12 + 7")
    assert tok.bos_token_id == ours.bos_id and tok.convert_tokens_to_ids(tok.eos_token) in ours.eos_ids

    gen = transformers.GenerationConfig.from_pretrained(llama_export)
    cfg = tiny_llama.config
    assert (gen.bos_token_id, gen.eos_token_id) == (cfg.bos_token_id, list(cfg.eos_token_ids))
    assert (gen.do_sample, gen.temperature, gen.top_p) == tuple(REASONING_SAMPLING.values())

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_export, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.generation_config.eos_token_id == gen.eos_token_id
    prompt = ours.apply_chat_template(CHAT, thinking=False)
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, top_p=None,
                                temperature=None)[0, len(prompt):].tolist()
    mine = tiny_llama.generate([prompt], max_new_tokens=24)[0]
    assert hf_out[: len(mine)] == list(mine)  # greedy, and it stops where ours does (an eos of the config)
    assert len(mine) == 24 or mine[-1] in cfg.eos_token_ids


def test_decilm_export_with_tokenizer_and_cli(tiny_hetero, tmp_path, capsys):
    from nemotron_jax.cli import main

    with pytest.warns(UserWarning, match="vLLM"):
        tiny_hetero.save_hf(tmp_path / "api", tokenizer=nj.Tokenizer.tiny())
    tiny_hetero.save(tmp_path / "saved")
    with pytest.warns(UserWarning, match="vLLM"):
        assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "cli"), "--tokenizer", "tiny"]) == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (tmp_path / "api" / name).read_text() == (tmp_path / "cli" / name).read_text(), name
    config = json.loads((tmp_path / "api" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == nj.Tokenizer.tiny().chat_template
    special = json.loads((tmp_path / "api" / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                       "pad_token": "<|finetune_right_pad_id|>"}
    back = nj.load(tmp_path / "cli")
    tokens = np.arange(12)[None] % 512
    np.testing.assert_array_equal(back.logits(tokens), tiny_hetero.logits(tokens))
    assert nj.Tokenizer.from_file(tmp_path / "cli").apply_chat_template(CHAT, True) == \
        nj.Tokenizer.tiny().apply_chat_template(CHAT, True)
    assert main(["convert", str(tmp_path / "cli"), str(tmp_path / "back"), "--tokenizer", "tiny"]) == 2
    assert "--tokenizer is for writing HF" in capsys.readouterr().err


def test_a_tokenizer_that_does_not_fit_writes_nothing(tiny_llama, shared_data, tmp_path):
    llama = shared_data / "tokenizers" / "llama-3.1"
    if not (llama / "tokenizer.json").is_file():
        pytest.skip("Llama-3.1 tokenizer not present")
    with pytest.raises(nj.ConfigError, match="128256 tokens, more than the model's vocab_size 512"):
        tiny_llama.save_hf(tmp_path / "out", format="llama", tokenizer=llama)
    bos = nj.Tokenizer.tiny()
    bos.bos_id = 0
    with pytest.raises(nj.ConfigError, match="bos id 0"):
        tiny_llama.save_hf(tmp_path / "out", format="llama", tokenizer=bos)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_extra_files(tiny_llama, tmp_path, monkeypatch):
    """The extra files are written into the weights' staging directory, so a failure removes them too."""
    from nemotron_jax.convert import hf

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "_write_safetensors", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_llama.save_hf(tmp_path / "out", format="llama", tokenizer="tiny")
    assert list(tmp_path.iterdir()) == []
