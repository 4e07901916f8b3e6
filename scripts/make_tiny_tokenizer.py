"""Build `configs/tokenizers/tiny/`: the 512-token byte-level BPE of the tiny presets.

It is a miniature Llama-3 tokenizer: the same pre-tokenizer regex and byte-level alphabet, the
Llama-3 special tokens the chat template needs at fixed low ids, and 250 merges learned from a
small synthetic corpus (English-ish words, arithmetic, `<think>` blocks, GSM8K-style `####`
answers) generated from a fixed seed, so the output is identical on every run:

    0 <|finetune_right_pad_id|>  1 <|begin_of_text|>  2 <|eot_id|>  3 <|end_of_text|>
    4 <|start_header_id|>        5 <|end_header_id|>  6..261 the 256 bytes  262..511 merges

Run: `.venv/bin/python scripts/make_tiny_tokenizer.py [--check]` (`--check` verifies the files
in the repository are what this script produces, without writing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 512
SPECIAL = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
OUT = Path(__file__).resolve().parents[1] / "configs" / "tokenizers" / "tiny"
CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
          "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}

WORDS = ("the a an is are was of to and in that it for on with as at by from this be or have not but what all "
         "were when we there can one how many much more each if then so do total left has had apples books "
         "students cost dollars hours minutes day week money buy sell pay she he they her his their number "
         "answer question first second third half twice times less than per sum equal find let step think "
         "okay wait check hello thanks sure here assistant user system detailed thinking on off yes no").split()


def corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    """Deterministic synthetic text in the shapes the tiny models see in tests and demos."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        return " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])

    def arithmetic() -> str:
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b} = {value}"

    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.4:
            out.append(" ".join(sentence() for _ in range(rng.randint(1, 3))))
        elif kind < 0.7:
            out.append(f"{sentence()} {arithmetic()}\n#### {rng.randint(0, 9999)}")
        else:
            steps = "\n".join(arithmetic() for _ in range(rng.randint(1, 3)))
            out.append(f"<think>\n{sentence()}\n{steps}\n</think>\n\n{sentence()} #### {rng.randint(0, 999)}")
    return out


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"trained {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}: enlarge the corpus")
    for i, name in enumerate(SPECIAL):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def write(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    build().save(str(dst / "tokenizer.json"), pretty=True)
    (dst / "tokenizer_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def _digest(d: Path) -> str:
    files = ("tokenizer.json", "tokenizer_config.json")
    return hashlib.sha256(b"".join((d / f).read_bytes() for f in files)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files instead of writing")
    args = parser.parse_args()
    if not args.check:
        write(OUT)
        print(f"wrote {OUT} (sha256 {_digest(OUT)[:16]})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        same = _digest(Path(tmp)) == _digest(OUT)
    print("up to date" if same else f"{OUT} differs from what this script builds")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
