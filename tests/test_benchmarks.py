"""Benchmark graders on hand-written right and wrong answers in each benchmark's own format."""

import json
import os

import pytest

from nemotron_jax import rewards
from nemotron_jax.eval import benchmarks
from nemotron_jax.eval.grade_code import last_code_block, run_sandboxed


def test_get_names_every_benchmark_and_refuses_others():
    for name in benchmarks.NAMES:
        assert benchmarks.get(name).name == name
    with pytest.raises(ValueError, match=r"unknown benchmark 'gpqa'.*gsm8k, math, mcq, ifeval, code"):
        benchmarks.get("gpqa")


# ---------------------------------------------------------------- gsm8k

GSM = {"question": "Natalia sold 48 clips in April and half as many in May. How many altogether?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"}


@pytest.mark.parametrize(("response", "thinking", "expected"), [
    ("She sold 72 clips.", False, 1.0),
    ("48 + 24 = 72, so \\boxed{72}", False, 1.0),
    ("The answer is $72.00.", False, 1.0),
    ("#### 72", False, 1.0),
    ("72,000 clips", False, 0.0),
    ("<think>48 + 24 = 72</think>The answer is 72.", True, 1.0),
    ("<think>48 + 24 = 72</think>The answer is 71.", True, 0.0),
    ("<think>48 + 24 = 72 and still thinking", True, 0.0),  # the thought never closed: no answer
    ("७२", False, 0.0),  # Devanagari digits: Unicode \d matched them, float() parsed them
    ("The total is ७२ ... no, 71", False, 0.0),
])
def test_gsm8k(response, thinking, expected):
    bench = benchmarks.get("gsm8k")
    assert bench.score(response, GSM, thinking=thinking) == expected


def test_gsm8k_unicode_digit_false_positive_is_gone():
    # The random-weights case of the issue: a reference of 5 and a response ending in a Devanagari five.
    assert benchmarks.get("gsm8k").score("x y ५", {"question": "q", "answer": "5"}, thinking=False) == 0.0
    assert rewards.accuracy("x y ५", "5", thinking=False) == 0.0
    assert rewards.accuracy("x y 5", "5", thinking=False) == 1.0


def test_gsm8k_prompt_asks_for_a_box_and_truncation_is_reported():
    bench = benchmarks.get("gsm8k")
    (turn,) = bench.messages(GSM)
    assert turn["role"] == "user" and "\\boxed{}" in turn["content"] and GSM["question"] in turn["content"]
    grade = bench.grade("<think>never ends", GSM, thinking=True)
    assert grade.truncated and grade.answer is None and grade.score == 0.0
    assert bench.score("72", {"question": "q", "answer": 72}, thinking=False) == 1.0  # a bare number answer


# ---------------------------------------------------------------- math (math-verify)

MATH_CASES = [  # (reference, response, right?)
    ("\\frac{1}{2}", "so the answer is \\boxed{\\frac12}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("(3, \\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("\\{1,2,3\\}", "\\boxed{\\{3, 2, 1\\}}", True),
    ("204", "\\boxed{204}", True),
    ("\\frac{1}{2}", "\\boxed{\\frac13}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}}", False),
    ("204", "\\boxed{240}", False),
    ("(3, \\frac{\\pi}{2})", "\\boxed{(\\frac{\\pi}{2}, 3)}", False),
    ("x^2+2x+1", "\\boxed{x^2+1}", False),
]


def test_math_equivalences_graded_by_math_verify_in_worker_processes():
    bench = benchmarks.get("math")
    records = [{"problem": "p", "answer": ref} for ref, _, _ in MATH_CASES]
    grades = bench.grade_many([r for _, r, _ in MATH_CASES], records, thinking=False)
    got = [(case[0], case[1], g.score) for case, g in zip(MATH_CASES, grades, strict=True)]
    assert got == [(ref, resp, float(right)) for ref, resp, right in MATH_CASES]
    assert grades[0].answer == "\\frac12"


def test_math_only_grades_after_the_thought():
    bench = benchmarks.get("math")
    rec = {"problem": "What is 1/2?", "answer": "\\frac{1}{2}"}
    assert bench.score("<think>maybe \\boxed{\\frac12}</think>The answer is \\boxed{0.5}.", rec, thinking=True) == 1.0
    assert bench.score("<think>surely \\boxed{\\frac12}</think>\\boxed{3}", rec, thinking=True) == 0.0
    grade = bench.grade("<think>\\boxed{\\frac12} and on and on", rec, thinking=True)
    assert (grade.score, grade.truncated, grade.answer) == (0.0, True, None)
    assert "\\boxed{}" in bench.messages(rec)[0]["content"]
    assert bench.messages({"question": "What is 1/2?", "answer": "1/2"})[0]["content"].endswith("What is 1/2?")
    with pytest.raises(ValueError, match="no 'problem' key"):
        bench.check({"answer": "1"})


# ---------------------------------------------------------------- multiple choice

MCQ = {"question": "Which planet is largest?", "choices": ["Mars", "Venus", "Jupiter", "Earth"], "answer": "C"}


@pytest.mark.parametrize("response", [
    "\\boxed{C}", "Answer: \\boxed{C}", "Answer: C", "ANSWER: C", "Answer: (C)", "The answer is (C).",
    "the answer is C", "The correct answer is C) Jupiter", "**Answer:** C", "**Answer: C**", "Final answer: C",
    "The best option is C.", "Option C is correct.", "(C) is the correct answer", "C", "(C)", "C.",
    "I first thought B, but the answer is C.", "\\boxed{\\text{C}}", "\\boxed{C. Jupiter}",
])
def test_mcq_letters_in_every_common_phrasing(response):
    assert benchmarks.get("mcq").score(response, MCQ, thinking=False) == 1.0


@pytest.mark.parametrize("response", [
    "\\boxed{B}", "Answer: B", "The answer is (B).", "The answer is a bit unclear.", "Answer: E",  # E: no such option
    "I am not sure.", "Jupiter", "\\boxed{Cat}",
])
def test_mcq_wrong_or_missing_letters(response):
    assert benchmarks.get("mcq").score(response, MCQ, thinking=False) == 0.0


def test_mcq_shuffle_is_seeded_and_the_grader_follows_it():
    plain, shuffled = benchmarks.get("mcq"), benchmarks.get("mcq", shuffle_seed=3)
    assert "C) Jupiter" in plain.messages(MCQ)[0]["content"]
    orders = {tuple(benchmarks.get("mcq", shuffle_seed=s).options(MCQ)[0]) for s in range(8)}
    assert len(orders) > 1  # the seed changes the order
    assert shuffled.options(MCQ) == benchmarks.get("mcq", shuffle_seed=3).options(MCQ)  # and fixes it
    letter = shuffled.reference(MCQ)
    assert f"{letter}) Jupiter" in shuffled.messages(MCQ)[0]["content"]
    assert shuffled.score(f"Answer: {letter}", MCQ, thinking=False) == 1.0
    other = "A" if letter != "A" else "B"
    assert shuffled.score(f"Answer: {other}", MCQ, thinking=False) == 0.0


def test_mcq_index_answers_raw_gpqa_rows_and_schema_errors():
    bench = benchmarks.get("mcq", shuffle_seed=0)
    assert bench.reference({**MCQ, "answer": 2}) == bench.reference(MCQ)
    gpqa = {"Question": "Largest planet?", "Correct Answer": "Jupiter", "Incorrect Answer 1": "Mars",
            "Incorrect Answer 2": "Venus", "Incorrect Answer 3": "Earth"}
    bench.check(gpqa)
    letter = bench.reference(gpqa)
    assert bench.options(gpqa)[0]["ABCD".index(letter)] == "Jupiter"
    assert bench.score(f"\\boxed{{{letter}}}", gpqa, thinking=False) == 1.0
    for bad, match in [({"question": "q", "answer": "A"}, "no 'choices' key"),
                       ({**MCQ, "answer": "F"}, "out of range"), ({**MCQ, "answer": "Jupiter"}, "letter or an index"),
                       ({**MCQ, "choices": ["only"]}, "2 to 26 options")]:
        with pytest.raises(ValueError, match=match):
            bench.check(bad)


# ---------------------------------------------------------------- IFEval

IF_CASES = [  # (instruction, kwargs, a response that follows it, one that does not)
    ("change_case:english_lowercase", {}, "all of this is lower case.", "This Is Not."),
    ("change_case:english_capital", {}, "ALL OF THIS IS UPPER CASE.", "NOT all upper."),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "THIS has TWO capital words.", "only ONE here."),
    ("combination:two_responses", {}, "first answer\n******\nsecond answer", "just one answer"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi!"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear you."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. bye", "Hello. bye"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Sure, why not."),
    ("detectable_format:json_format", {}, '{"a": 1}', "a = 1"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nend", "no sections"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one*"),
    ("detectable_format:title", {}, "<<A Title>>\ntext", "A Title\ntext"),
    ("keywords:existence", {"keywords": ["rust", "iron"]}, "rust eats iron", "rust only"),
    ("keywords:forbidden_words", {"forbidden_words": ["rust"]}, "iron oxide", "rust"),
    ("keywords:frequency", {"keyword": "iron", "frequency": 2, "relation": "at least"}, "iron iron", "iron"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zz top", "top"),
    ("language:response_language", {"language": "en"},
     "This is a long English sentence about the weather in the city today.",
     "Ceci est une longue phrase en français sur le temps qu'il fait aujourd'hui dans la ville."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "first part\n\nthen second", "first part\n\nafter that"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo", "one"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "One. Two.",
     "One. Two. Three. Four."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five", "one"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"all quoted"', "not quoted"),
]


def test_every_ifeval_instruction_family_is_covered():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    assert {c[0] for c in IF_CASES} == set(INSTRUCTION_DICT)


@pytest.mark.parametrize(("instruction", "kwargs", "good", "bad"), IF_CASES, ids=[c[0] for c in IF_CASES])
def test_ifeval_instruction(instruction, kwargs, good, bad):
    bench = benchmarks.get("ifeval")
    record = {"prompt": kwargs.get("prompt_to_repeat", "Write something."), "instruction_id_list": [instruction],
              "kwargs": [kwargs]}
    assert bench.score(good, record, thinking=False) == 1.0
    assert bench.score(bad, record, thinking=False) == 0.0


def test_ifeval_strict_loose_prompt_and_instruction_levels():
    bench = benchmarks.get("ifeval")
    record = {"prompt": "Answer in lower case, ending with 'bye'.",
              "instruction_id_list": ["change_case:english_lowercase", "startend:end_checker"],
              "kwargs": [{}, {"end_phrase": "bye"}]}
    # A chatty first line breaks strict but not loose (loose drops the first line).
    grade = bench.grade("Sure! Here it is:\nhello there, bye", record, thinking=False)
    assert grade.details["prompt_strict"] == 0.0 and grade.details["prompt_loose"] == 1.0
    assert grade.details["instruction_strict"] == 0.5 and grade.details["instruction_loose"] == 1.0
    assert grade.score == 0.0  # score is prompt-level strict
    assert bench.score("<think>Plan: Capitals</think>hello there, bye", record, thinking=True) == 1.0
    assert bench.grade("<think>hello there, bye", record, thinking=True).truncated
    assert bench.messages(record) == [{"role": "user", "content": record["prompt"]}]
    with pytest.raises(ValueError, match="unknown instructions"):
        bench.check({**record, "instruction_id_list": ["made:up", "punctuation:no_comma"]})
    with pytest.raises(ValueError, match="one per instruction"):
        bench.check({**record, "kwargs": [{}]})


# ---------------------------------------------------------------- code

HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
             "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
             "    assert candidate(-1, 1) == 0\n"}
MBPP = {"prompt": "Write a function square(x).", "test": "assert square(3) == 9\nassert square(0) == 0"}


def _answer(code: str) -> str:
    return f"Here is my solution.\n```python\ndef helper():\n    pass\n```\nFinal:\n```python\n{code}\n```\nDone."


def test_code_passes_fails_hangs_and_crashes_in_one_batch(tmp_path):
    bench = benchmarks.get("code", timeout_s=3)
    outside = tmp_path / "outside.txt"
    cases = [  # (response, record, score, status starts with)
        (_answer("def add(a, b):\n    return a + b"), HUMANEVAL, 1.0, "passed"),
        (_answer("def add(a, b):\n    return a - b"), HUMANEVAL, 0.0, "failed"),
        (_answer("def square(x):\n    return x * x"), MBPP, 1.0, "passed"),
        (_answer("def square(x):\n    while True:\n        pass"), MBPP, 0.0, "timed out"),
        (_answer("import os\nos._exit(0) if False else None\ndef square(x):\n    raise SystemExit(3)"), MBPP, 0.0,
         "failed"),
        (_answer(f"open({str(outside)!r}, 'w').write('x')\ndef square(x):\n    return x * x"), MBPP, 0.0, "failed"),
        ("I would write a loop.", MBPP, 0.0, "no code block"),
    ]
    grades = bench.grade_many([c[0] for c in cases], [c[1] for c in cases], thinking=False)
    assert [(g.score, g.details["status"].split(" (")[0].split(" after")[0]) for g in grades] == [
        (c[2], c[3]) for c in cases]
    assert not outside.exists()
    assert grades[0].answer == "def add(a, b):\n    return a + b\n"  # the last fenced block, not the first
    assert bench.score("<think>```python\ndef add(a, b):\n    return a + b\n```", HUMANEVAL, thinking=True) == 0.0


@pytest.mark.parametrize(("program", "why"), [
    ("import shutil\nshutil.rmtree('/tmp')", "rmtree"),
    ("import os\nos.remove('/etc/hostname')", "os.remove"),
    ("import pathlib\npathlib.Path('/tmp/nj-sandbox-escape').write_text('x')", "no writes outside"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", "socket"),
    ("import subprocess\nsubprocess.run(['touch', '/tmp/nj-sandbox-escape'])", "subprocess"),
    ("import os\nos.system('touch /tmp/nj-sandbox-escape')", "os.system"),
    ("import ctypes\nctypes.CDLL(None)", "ctypes"),
    ("x = bytearray(8 << 30)", "MemoryError"),
])
def test_sandbox_refuses_escapes(program, why):
    result = run_sandboxed(program, timeout_s=5, memory_mb=512)
    assert not result["passed"] and why in result["stderr"], result
    assert not os.path.exists("/tmp/nj-sandbox-escape")


def test_sandbox_allows_work_inside_its_directory():
    program = ("import json, tempfile\nopen('a.txt', 'w').write('x')\nassert open('a.txt').read() == 'x'\n"
               "with tempfile.TemporaryFile() as f:\n    f.write(b'y')\n")
    assert run_sandboxed(program, timeout_s=5)["passed"]
    assert last_code_block("```\nfirst\n```\n```py\nsecond\n```") == "second\n"
    assert last_code_block("no code") is None


def test_records_name_the_missing_key():
    cases = [("gsm8k", {"question": "q"}, "answer"), ("ifeval", {"prompt": "p"}, "instruction_id_list"),
             ("code", {"prompt": "p"}, "test")]
    for name, record, key in cases:
        with pytest.raises(ValueError, match=f"no '{key}' key"):
            benchmarks.get(name).check(record)
    assert json.loads(json.dumps(benchmarks.get("gsm8k").grade("5", {"question": "q", "answer": "5"}, False).to_dict()))


def test_math_verifier_timeout_kills_the_worker_and_the_rest_is_still_graded():
    from nemotron_jax.eval import grade_math

    assert grade_math.verify_many([("1", "1", True), ("2", "2", True)], workers=2) == [(True, "1"), (True, "2")]
    slow = ("2", "9^{9^{9^{9}}}", True)  # SymPy grinds on this far longer than the 0.5 s allowed
    pids = {w.proc.pid for w in grade_math._POOL.workers}
    got = grade_math.verify_many([slow, ("\\frac12", "0.5", True), ("3", "4", True)], timeout_s=0.5, workers=2)
    assert got == [(False, None), (True, "\\frac{1}{2}"), (False, "4")]
    assert pids != {w.proc.pid for w in grade_math._POOL.workers}  # the hung worker was replaced
    grade_math._POOL.workers[0].kill()  # a worker that died (e.g. out of memory) is replaced too
    assert grade_math.verify_many([("5", "5", True)], workers=2) == [(True, "5")]
