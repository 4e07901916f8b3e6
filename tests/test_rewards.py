"""Accuracy and format rewards on real GSM8K answers and on edge cases; safe execution of user rewards."""

import json
import time

import pytest

from nemotron_jax import rewards


def test_gsm8k_answers_score_themselves(shared_data):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]
    for line in lines:
        answer = json.loads(line)["answer"]
        final = answer.rsplit("####", 1)[1].strip()
        # The worked solution itself, thinking off: its '#### N' line is the answer.
        assert rewards.accuracy(answer, answer, thinking=False) == 1.0
        # Thinking on: the worked solution inside the thought, a bare answer after it.
        on = f"<think>{answer.rsplit('####', 1)[0]}</think>The answer is {final}."
        assert rewards.accuracy(on, answer, thinking=True) == 1.0
        assert rewards.format(on, thinking=True) == 1.0
        wrong = f"<think>hmm</think>The answer is {_off_by_one(final)}."
        assert rewards.accuracy(wrong, answer, thinking=True) == 0.0


def _off_by_one(number: str) -> str:
    return str(float(number.replace(",", "")) + 1)


@pytest.mark.parametrize(("response", "answer", "thinking", "expected"), [
    ("The total is \\boxed{1,234}.", "#### 1234", False, 1.0),
    ("so \\boxed{\\frac{3}{4}}", "0.75", False, 1.0),
    ("It costs $18.00 in all.", "#### 18", False, 1.0),
    ("3/4 of them", "#### 0.75", False, 1.0),
    ("No number here.", "#### 5", False, 0.0),  # no answer
    ("First 3, then 4, so 7", "#### 7", False, 1.0),  # several numbers: the last one
    ("\\boxed{5} ... actually \\boxed{6}", "#### 6", False, 1.0),  # several answers: the last boxed
    ("<think>the answer is 6</think>", "#### 6", True, 0.0),  # nothing after the thought
    ("<think>12+1 is 13", "#### 13", True, 0.0),  # thought never closed
    ("<think>x</think>the answer is 13.", "#### 13", True, 1.0),
    ("The answer is Paris.", "paris", False, 1.0),  # non-numeric: normalised text
])
def test_accuracy_edge_cases(response, answer, thinking, expected):
    assert rewards.accuracy(response, answer, thinking) == expected


@pytest.mark.parametrize(("response", "thinking", "expected"), [
    ("<think>work</think>42", True, 1.0),
    ("  <think>work</think>42", True, 1.0),
    ("42", True, 0.0),  # tags missing
    ("<think>work42", True, 0.0),  # not closed
    ("<think>a</think><think>b</think>42", True, 0.0),  # two thoughts
    ("</think>42<think>", True, 0.0),  # wrong order
    ("<think>work</think>   ", True, 0.0),  # no answer after the thought
    ("42", False, 1.0),
    ("<think>work</think>42", False, 0.0),  # thinking off with tags
    ("42 </think>", False, 0.0),
])
def test_format_edge_cases(response, thinking, expected):
    assert rewards.format(response, thinking) == expected


def test_user_reward_that_raises_or_hangs_scores_zero():
    def flaky(response, **_):
        if response == "boom":
            raise RuntimeError("verifier crashed")
        if response == "hang":
            time.sleep(5)
        return 1.0

    samples = [{"response": r} for r in ("ok", "boom", "hang", "ok")]
    start = time.monotonic()
    result = rewards.score_all(flaky, samples, timeout_s=0.3)
    assert time.monotonic() - start < 3
    assert result.scores == [1.0, 0.0, 0.0, 1.0]
    assert result.errors[0] is None and "verifier crashed" in result.errors[1]
    assert "timed out" in result.errors[2]


def test_load_reward_names_a_user_function_and_rejects_bad_names(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(response, **_):\n    return float(len(response) < 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.load_reward("my_rewards:short")
    assert fn(response="ok", answer="", thinking=False) == 1.0
    for spec, match in (("my_rewards", "module:function"), ("my_rewards:missing", "cannot import"),
                        ("no_such_module_xyz:f", "cannot import")):
        with pytest.raises(ValueError, match=match):
            rewards.load_reward(spec)
