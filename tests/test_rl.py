"""Rollouts, batches, prompt schedules and preference pairs of the RL recipes."""

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import nemotron_jax as nj
from nemotron_jax.rl.config import PromptConfig
from nemotron_jax.rl.preference import encode_pair, pair_batch
from nemotron_jax.rl.prompts import PromptSchedule
from nemotron_jax.rl.rollout import Prompt, advantages_for, informative_rows, policy_batch, rollout
from nemotron_jax.rl.strategies import target_logprobs

PROMPTS = [Prompt("What is 2 + 3?", "#### 5", True), Prompt("What is 4 + 4?", "#### 8", False)]


@pytest.fixture(scope="module")
def tokenizer():
    return nj.Tokenizer.tiny()


@pytest.fixture(scope="module")
def sampled(tiny_hetero, tokenizer):
    return rollout(tiny_hetero, tokenizer, PROMPTS, 3, 12, temperature=1.0, seed=3)


def test_rollout_logprobs_equal_the_trainers_recomputed_ones(tiny_hetero, sampled):
    batch = policy_batch(sampled, advantages_for(sampled, "grpo", True), "token")
    logp, _ = target_logprobs(tiny_hetero.module, jax.device_put(batch))
    mask = batch.weights > 0
    assert mask.sum() == sum(len(r) for r in sampled.responses)
    np.testing.assert_allclose(np.asarray(logp)[mask], batch.old_logprobs[mask], atol=2e-4)


def test_policy_batch_weights_only_response_tokens(sampled):
    batch = policy_batch(sampled, np.ones((2, 3), np.float32), "sequence")
    for i, (prompt, response) in enumerate(zip(sampled.prompt_ids, sampled.responses, strict=True)):
        row = batch.weights[i]
        assert (row[: len(prompt) - 1] == 0).all()  # prompt targets
        assert (row[len(prompt) + len(response) - 1:] == 0).all()  # padding
        np.testing.assert_allclose(row.sum(), 1.0, rtol=1e-6)  # sequence-level: one unit per row
        assert batch.targets[i, len(prompt) - 1] == response[0]


def test_a_raising_or_hanging_user_reward_scores_zero(tiny_hetero, tokenizer):
    calls = []

    def flaky(response, answer, thinking, prompt, **_):
        calls.append(prompt)
        if "2 + 3" in prompt:
            raise RuntimeError("judge unavailable")
        time.sleep(2.0)
        return 1.0

    r = rollout(tiny_hetero, tokenizer, PROMPTS, 2, 4, seed=0, reward_fn=flaky, reward_timeout_s=0.2)
    assert r.rewards.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert sum("judge unavailable" in e for e in r.reward_errors) == 2
    assert sum("timed out" in e for e in r.reward_errors) == 2


def test_prompt_schedule_is_deterministic_filters_and_moves_its_centre():
    prompts = [Prompt(f"q{i}", f"#### {i}", i % 2 == 0) for i in range(40)]
    rates = np.linspace(0, 1, 40, dtype=np.float32)
    cfg = PromptConfig(max_pass_rate=0.75, curriculum=True, curriculum_start=0.7, curriculum_end=0.0,
                       curriculum_width=0.1)
    a = PromptSchedule(prompts, 8, seed=1, iterations=10, cfg=cfg, pass_rates=rates)
    b = PromptSchedule(prompts, 8, seed=1, iterations=10, cfg=cfg, pass_rates=rates)
    assert a.batch(3) == b.batch(3)
    assert a.dropped == int((rates >= 0.75).sum())
    mean_rate = lambda batch: np.mean([rates[int(p.question[1:])] for p in batch])
    assert mean_rate(a.batch(0)) > 0.5 > 0.2 > mean_rate(a.batch(9))
    plain = PromptSchedule(prompts, 8, seed=1, iterations=10, cfg=PromptConfig())
    seen = [p.question for i in range(5) for p in plain.batch(i)]
    assert sorted(seen) == sorted(p.question for p in prompts)  # one epoch covers every prompt once


def test_pair_batch_interleaves_and_weights_each_pair_once(tokenizer):
    record = {"question": "What is 2 + 3?", "reasoning": "off", "chosen": "5", "rejected": "The answer is 7.",
              "chosen_reward": 2.0, "rejected_reward": 0.5}
    batch = pair_batch([encode_pair(tokenizer, record)] * 2)
    assert batch.inputs.shape[0] == 4
    np.testing.assert_allclose(batch.weights.sum(), 2.0, rtol=1e-6)  # two pairs
    chosen = tokenizer.decode(batch.targets[0][batch.response_mask[0] > 0])
    rejected = tokenizer.decode(batch.targets[1][batch.response_mask[1] > 0])
    assert chosen.startswith("5") and rejected.startswith("The answer is 7.")
    assert batch.reward_gap[0, 0] == pytest.approx(1.5)


def test_policy_batch_keeps_informative_groups_and_pads_with_weightless_rows(sampled):
    r = dataclasses.replace(sampled, rewards=np.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]], np.float32))
    rows = informative_rows(r)
    assert rows == [3, 4, 5]  # the first group's rewards are all equal: no signal
    adv = np.arange(6, dtype=np.float32).reshape(2, 3) + 1.0
    batch = policy_batch(r, adv, "sequence", seq_len=64, rows=rows, num_rows=4)
    assert batch.inputs.shape == (4, 64)
    full = policy_batch(r, adv, "sequence", seq_len=64)
    for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(got[:3], want[3:])  # the same rows, in order
    assert not batch.weights[3].any() and not batch.segment_ids[3].any()


def test_benchmark_prompts_are_rendered_and_graded_as_in_evaluation(tmp_path, tiny_hetero, tokenizer):
    """prompts.benchmark: records in a benchmark's schema get its template and its grader, so an RL
    accuracy reward and `nemotron-jax eval` score a response the same way."""
    from nemotron_jax.eval import benchmarks
    from nemotron_jax.rl.prompts import load_prompts

    records = [{"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": "C"},
               {"question": "Which is even?", "choices": ["3", "8", "5", "1"], "answer": 1}]
    path = tmp_path / "mcq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = load_prompts(PromptConfig(path=str(path), benchmark="mcq", thinking_ratio=1.0), 0, tmp_path)
    bench = benchmarks.get("mcq")
    assert [p.messages() for p in prompts] == [bench.messages(r) for r in records]
    right, wrong, unclosed = "<think>7 is prime.</think>The answer is (C).", "<think>hm</think>Answer: A", "<think>7"
    assert [prompts[0].accuracy(t) for t in (right, wrong, unclosed)] == [1.0, 0.0, 0.0]
    assert prompts[1].accuracy("<think>8</think>\\boxed{B}") == bench.score("<think>8</think>\\boxed{B}", records[1])
    r = rollout(tiny_hetero, tokenizer, prompts, 2, 6, seed=0)
    owners = [p for p in prompts for _ in range(2)]
    assert r.prompt_ids[0] == tokenizer.apply_chat_template(bench.messages(records[0]), thinking=True)
    assert r.accuracy.reshape(-1).tolist() == [bench.score(t, p.record, p.thinking) for t, p in zip(
        r.texts, owners, strict=True)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no choices", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="choices"):
        load_prompts(PromptConfig(path=str(bad), benchmark="mcq"), 0, tmp_path)


def test_rollout_prefills_each_groups_prompt_once(tiny_hetero, tokenizer):
    """A group's G samples share its prompt's full pages: prefill work is about one prompt per group,
    not G (only the partial last page is recomputed per sample)."""
    group = 4
    rollout(tiny_hetero, tokenizer, PROMPTS, group, 3, seed=1)  # the engine for this size, warm
    ids = [tokenizer.apply_chat_template(p.messages(), thinking=p.thinking) for p in PROMPTS]
    engine = tiny_hetero.engine(ids, 3, group)  # the one the rollout used (same size bucket)
    before = engine.stats["prefill_tokens"]
    r = rollout(tiny_hetero, tokenizer, PROMPTS, group, 3, seed=1)
    assert tiny_hetero.engine(ids, 3, group) is engine
    page = engine.page_size
    lengths = [len(ids) - 1 for ids in r.prompt_ids[::group]]  # KV positions a prompt needs
    shared = sum(n + (group - 1) * (n % page) for n in lengths)
    assert engine.stats["prefill_tokens"] - before <= shared < group * sum(lengths)
    assert engine.free_pages == engine.num_pages - 1  # every page returned


def test_reshard_for_a_rollout_mesh_moves_base_and_adapters(tiny_hetero):
    """sampling.rollout_mesh: the policy's weights, LoRA adapters included, land on the rollout
    layout by their own logical axes, values unchanged."""
    from nemotron_jax.rl.rollout import reshard_params
    from nemotron_jax.train.config import MeshConfig

    model = nj.init(tiny_hetero.config, seed=0).add_adapters(rank=4)
    graphdef, params = nnx.split(model.module)
    layout = MeshConfig(fsdp=4, tensor=2).layout()
    moved = reshard_params(params, graphdef, layout)
    flat, before = dict(nnx.to_flat_state(moved)), dict(nnx.to_flat_state(params))
    adapters = [p for p in flat if "lora" in p]
    assert adapters and flat.keys() == before.keys()
    for path, var in flat.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(before[path].get_value()))
        assert var.get_value().sharding == layout.sharding(var.logical_axes, var.get_value().shape), path


def test_rollout_mesh_with_quantized_weights_is_refused():
    from nemotron_jax.errors import ConfigError
    from nemotron_jax.recipes import load_recipe

    with pytest.raises(ConfigError, match=r"rollout_mesh with model\.quantize"):
        load_recipe(Path(__file__).parents[1] / "configs" / "recipes" / "grpo-tiny.yaml",
                    ["model.quantize=int8", "lora.rank=4", "sampling.rollout_mesh.fsdp=2"])
