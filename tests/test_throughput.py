"""Serving throughput through the engine (eval/throughput.py), as the pipeline's report uses it."""

import pytest

import nemotron_jax as nj
from nemotron_jax.eval.throughput import engine_throughput


def test_every_model_serves_the_same_workload_and_is_compared_to_the_first(tiny_llama):
    cfg = tiny_llama.config
    blocks = [b if i % 2 else nj.BlockConfig(nj.AttentionConfig("none"), b.ffn) for i, b in enumerate(cfg.blocks)]
    child = nj.init(cfg.replace(blocks=tuple(blocks)), seed=1)
    out = engine_throughput({"parent": tiny_llama, "child": child}, requests=4, prompt_tokens=24, new_tokens=6,
                            rounds=2)
    assert list(out) == ["parent", "child"]
    assert out["parent"]["engine_speedup"] == 1.0
    assert all(v["engine_tokens_per_s"] > 0 and v["engine_speedup"] > 0 for v in out.values())


def test_a_workload_longer_than_the_models_is_refused(tiny_llama):
    limit = tiny_llama.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine_throughput({"m": tiny_llama}, prompt_tokens=limit, new_tokens=1)
