"""`generate` and `chat`: text in, streamed text out, with the `detailed thinking on/off` toggle.

Generation runs on the engine (`Model.engine`), `--chunk` tokens (default 16) per jitted decode
call, and the text is decoded in Python between calls, so there is one device call per chunk,
never one per token; the whole response's tokens are re-decoded each time and only the new suffix
is printed (a half-finished UTF-8 character is held back). Defaults follow SPEC §3: reasoning on samples at
temperature 0.6, top-p 0.95; reasoning off (or no toggle) is greedy. `chat` re-renders the whole
conversation each turn (earlier turns' `<think>` parts are dropped by the template).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from nemotron_jax.sampling.logits_processing import make_params
from nemotron_jax.sampling.sampler import validate_request

ON_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}
OFF_DEFAULTS = {"temperature": 0.0, "top_p": 1.0}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a response to one prompt (chat template applied)")
    _add_common(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--raw", action="store_true", help="encode --prompt as is, without the chat template")
    p.set_defaults(func=generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat; /think on|off toggles reasoning, /exit quits")
    _add_common(p)
    p.set_defaults(func=chat)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="anything nj.load accepts, or a preset name (random weights, with a warning)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its directory, or 'tiny' (the default for 512-token models)")
    p.add_argument("--thinking", choices=["on", "off"], default=None, help="the reasoning toggle (system prompt)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="force </think> after this many tokens of reasoning")
    p.add_argument("--temperature", type=float, default=None, help="default: 0.6 with thinking on, else 0 (greedy)")
    p.add_argument("--top-p", type=float, default=None, help="default: 0.95 with thinking on, else 1")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                   help="KV-cache dtype (default: the parameter dtype)")
    p.add_argument("--chunk", type=int, default=16, help="tokens per jitted decode call while streaming")
    add_weight_args(p)


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """--quantize and --adapters: how the weights `load_model` reads are stored and extended."""
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the projections quantized (weight-only; int8 per channel, int4 in groups of 128)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="a LoRA adapter directory to attach (ours, or a PEFT adapter)")


def load_model(source: str, dtype: str = "float32", quantize: str | None = None, adapters: str | None = None,
               layout: Any = None) -> Any:
    """A model from a path `nj.load` reads, or a preset name initialised with random weights;
    optionally quantized and with LoRA adapters attached."""
    from nemotron_jax.api import init, load
    from nemotron_jax.lora import load_adapters
    from nemotron_jax.presets import preset_names

    check_adapters(adapters)
    if Path(source).exists():
        return load(source, dtype=dtype, quantize=quantize, adapters=adapters, layout=layout)
    if source in preset_names():
        print(f"warning: {source} is a preset: using random weights (seed 0), output will be gibberish",
              file=sys.stderr)
        model = init(source, seed=0, dtype=dtype, layout=layout)
        model = model if quantize is None else model.quantize(quantize)
        if adapters is not None:
            load_adapters(model.module, adapters, layout)
        return model
    raise ValueError(f"{source}: not a model directory or a preset name")


def check_adapters(adapters: str | None) -> None:
    if adapters is not None and not Path(adapters).is_dir():
        raise ValueError(f"--adapters {adapters}: not a directory")


def load_tokenizer(source: str | None, vocab_size: int) -> Any:
    from nemotron_jax.tokenizer import Tokenizer

    if source is None:
        if vocab_size != 512:
            raise ValueError("pass --tokenizer (the built-in 'tiny' tokenizer only fits 512-token models)")
        source = "tiny"
    tok = Tokenizer.from_file(source)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}")
    return tok


class Session:
    """Model, tokenizer and sampling options of one command line. Everything that can be checked
    without weights (config, tokenizer, options, prompt length) is checked before they are loaded."""

    def __init__(self, args: argparse.Namespace):
        from nemotron_jax.presets import resolve_config

        self.args = args
        if not Path(args.model).exists() and "/" in args.model:
            raise ValueError(f"{args.model}: not a model directory or a preset name")
        try:
            self.config = resolve_config(args.model)
        except ValueError:
            raise ValueError(f"{args.model}: not a model directory or a preset name") from None
        self.tok = load_tokenizer(args.tokenizer, self.config.vocab_size)
        self.stop = sorted(set(self.tok.eos_ids) | set(self.config.eos_token_ids))
        for thinking in (True, False):
            make_params(self.options(thinking)["temperature"], args.top_k, self.options(thinking)["top_p"])
        if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
            raise ValueError(f"--max-thinking-tokens must be >= 0, got {args.max_thinking_tokens}")
        if args.chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
        check_adapters(args.adapters)
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            a = self.args
            self._model = load_model(a.model, a.dtype, a.quantize, a.adapters)
        return self._model

    def options(self, thinking: bool | None) -> dict[str, Any]:
        a = self.args
        defaults = ON_DEFAULTS if thinking else OFF_DEFAULTS
        opts = {"temperature": defaults["temperature"] if a.temperature is None else a.temperature,
                "top_p": defaults["top_p"] if a.top_p is None else a.top_p}
        if a.max_thinking_tokens is not None:
            opts["max_thinking_tokens"] = a.max_thinking_tokens
        return opts

    def respond(self, prompt_ids: list[int], thinking: bool | None, out: Any = None) -> str:
        """Stream the response to `out` (stdout) as the engine emits it; return its text (stop
        token excluded)."""
        from nemotron_jax.engine import SamplingOptions

        out = sys.stdout if out is None else out
        validate_request([prompt_ids], self.args.max_new_tokens, self.config.vocab_size,
                         self.config.max_position_embeddings)
        knobs = self.options(thinking)
        engine = self.engine(prompt_ids, thinking)
        options = SamplingOptions(self.args.max_new_tokens, knobs["temperature"], knobs["top_p"], self.args.top_k,
                                  self.args.seed, 0, tuple(self.stop), knobs.get("max_thinking_tokens"))
        start, printed, text, ids = time.perf_counter(), "", "", []
        for events in engine.stream(prompt_ids, options):
            ids += [e.token for e in events if e.token is not None]
            text = self.tok.decode([t for t in ids if t not in self.stop], skip_special_tokens=True)
            ready = text.rstrip("\ufffd")  # hold back a half-decoded UTF-8 character
            if ready.startswith(printed) and len(ready) > len(printed):
                out.write(ready[len(printed):])
                out.flush()
                printed = ready
        if text != printed:
            out.write(text[len(printed):] if text.startswith(printed) else "\n" + text)
        out.write("\n")
        out.flush()
        seconds = time.perf_counter() - start
        print(f"[{len(ids)} tokens in {seconds:.2f}s]", file=sys.stderr)
        return text

    def engine(self, prompt_ids: list[int], thinking: bool | None) -> Any:
        """The model's engine sized for this turn (kept across turns of the same size bucket)."""
        a = self.args
        options = {"cache_dtype": a.cache_dtype or a.dtype, "decode_steps": a.chunk}
        if a.max_thinking_tokens is not None:
            options["think_tokens"] = self.tok.think_tokens
        return self.model.engine([prompt_ids], a.max_new_tokens, **options)


def _thinking(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def generate(args: argparse.Namespace) -> None:
    session = Session(args)
    thinking = _thinking(args.thinking)
    if args.raw:
        ids = session.tok.encode(args.prompt, add_bos=True)
    else:
        ids = session.tok.apply_chat_template([{"role": "user", "content": args.prompt}], thinking=thinking)
    session.respond(ids, thinking)


def chat(args: argparse.Namespace) -> None:
    session = Session(args)
    thinking = _thinking(args.thinking)
    history: list[dict[str, str]] = []
    print("chat: type a message; /think on|off toggles reasoning, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line.startswith("/think"):
            choice = line.removeprefix("/think").strip()
            if choice not in ("on", "off"):
                print("usage: /think on|off", file=sys.stderr)
                continue
            thinking = choice == "on"
            print(f"[reasoning {choice}]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; commands: /think on|off, /exit", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = session.tok.apply_chat_template(history, thinking=thinking)
        history.append({"role": "assistant", "content": session.respond(ids, thinking)})
