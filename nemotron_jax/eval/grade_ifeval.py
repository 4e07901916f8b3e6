"""IFEval: verifiable instructions, checked by the maintained port of Google's checks in the PyPI
package `if-verifiable` (the instruction registry of the original `instruction_following_eval`).

A record is IFEval's own row `{"prompt", "instruction_id_list", "kwargs"}`. A response gets the
four IFEval metrics: prompt-level strict / loose (every instruction followed) and instruction-level
strict / loose (the fraction followed); loose also accepts the response without its first or last
line or its markdown asterisks, as the original does. `score` is prompt-level strict, the number
the Llama-Nemotron report quotes; the others are in `Grade.details` and in the summary.

The one check that needs NLTK's downloadable Punkt model (`length_constraints:number_sentences`)
uses it when installed (`nltk.download("punkt")`), else NLTK's untrained Punkt tokenizer, which
splits on sentence-final punctuation the same way for ordinary prose; likewise the capital-word
count tokenizes words without Punkt's sentence split when `punkt_tab` is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from nemotron_jax import rewards
from nemotron_jax.eval.grading import Benchmark, Grade, answer_region

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


@functools.cache
def _registry() -> dict[str, Any]:
    import nltk
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    try:
        nltk.data.find("tokenizers/punkt/english.pickle")
    except LookupError:  # no downloaded model and nothing may be downloaded at run time
        instructions_util._get_sentence_tokenizer = lambda: nltk.tokenize.PunktSentenceTokenizer()
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:  # word_tokenize splits sentences with punkt_tab first; words alone need no model
        instructions_util.nltk = _NltkWithoutPunkt()
    return dict(INSTRUCTION_DICT)


class _NltkWithoutPunkt:
    """`nltk` as the checks see it, with `word_tokenize` on the whole text as one line."""

    def __getattr__(self, name: str) -> Any:
        import nltk

        return getattr(nltk, name)

    @staticmethod
    def word_tokenize(text: str, language: str = "english", preserve_line: bool = True) -> list[str]:
        import nltk

        return nltk.word_tokenize(text, language, preserve_line=True)


def _kwargs_list(record: dict[str, Any]) -> list[dict[str, Any]]:
    kwargs = record["kwargs"]
    return [dict(k or {}) for k in kwargs]


class IFEval(Benchmark):
    """IFEval prompts as they are (the prompt is the whole user turn)."""

    name = "ifeval"
    template = "{prompt}"
    keys = ("prompt", "instruction_id_list", "kwargs")
    votes = False

    def check(self, record: dict[str, Any]) -> None:
        super().check(record)
        ids, kwargs = record["instruction_id_list"], record["kwargs"]
        if not isinstance(ids, list | tuple) or not ids:
            raise ValueError("ifeval record key 'instruction_id_list' must be a non-empty list")
        if not isinstance(kwargs, list | tuple) or len(kwargs) != len(ids):
            raise ValueError(f"ifeval record key 'kwargs' must be a list of {len(ids)} objects, one per instruction")
        unknown = sorted(set(ids) - set(_registry()))
        if unknown:
            raise ValueError(f"ifeval record key 'instruction_id_list' has unknown instructions {unknown}")

    def reference(self, record: dict[str, Any]) -> str:
        return ",".join(record["instruction_id_list"])

    def follows(self, text: str, record: dict[str, Any]) -> list[tuple[str, bool, bool]]:
        """(instruction id, followed strictly, followed loosely) per instruction of the record."""
        from if_verifiable.common import evaluate_instructions

        self.check(record)
        results, _ = evaluate_instructions(response=text, instruction_id_list=list(record["instruction_id_list"]),
                                           kwargs_list=_kwargs_list(record), prompt=record["prompt"],
                                           instruction_registry=_registry())
        by_id = {r.instruction_id: (r.strict_pass, r.loose_pass) for r in results}
        return [(i, *by_id.get(i, (False, False))) for i in record["instruction_id_list"]]

    def grade_many(self, responses: Sequence[str], records: Sequence[dict[str, Any]], thinking: bool) -> list[Grade]:
        out = []
        for response, record in zip(responses, records, strict=True):
            formatted = bool(rewards.format(response, thinking))
            text = answer_region(response, thinking)
            if text is None:
                out.append(Grade(None, 0.0, formatted, True, dict.fromkeys(METRICS, 0.0)))
                continue
            checks = self.follows(text, record) if text.strip() else [(i, False, False)
                                                                      for i in record["instruction_id_list"]]
            strict, loose = [c[1] for c in checks], [c[2] for c in checks]
            details = {"prompt_strict": float(all(strict)), "prompt_loose": float(all(loose)),
                       "instruction_strict": sum(strict) / len(strict), "instruction_loose": sum(loose) / len(loose),
                       "followed": {c[0]: [bool(c[1]), bool(c[2])] for c in checks}}
            out.append(Grade(None, details["prompt_strict"], formatted, False, details))
        return out
