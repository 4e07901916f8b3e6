"""POST /v1/completions: raw prompts (text, with BOS added, or token ids as given), raw text out.

No chat template and no reasoning split: the text is what the model wrote. Several prompts in
one request give len(prompts) * n choices, prompt i's at indices i*n .. i*n + n-1 (OpenAI's order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nemotron_jax.serve.generation import (
    Generation,
    ServerConfig,
    new_tokens,
    request_seed,
    sampling_options,
    sse,
    usage,
)
from nemotron_jax.serve.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from nemotron_jax.serve.runner import EngineRunner
from nemotron_jax.serve.text import TokenizerLike


async def start_completion(req: CompletionRequest, runner: EngineRunner, tokenizer: TokenizerLike,
                           config: ServerConfig) -> tuple[Generation, int]:
    """The request's choices queued in the engine; (their generation, prompt tokens over all prompts)."""
    prompts = [tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in req.prompts()]
    seed = request_seed(req.seed)
    gen = Generation(runner, tokenizer, config, "cmpl", req.stop)
    for i, prompt in enumerate(prompts):
        max_tokens = new_tokens(req.new_tokens, len(prompt), config)
        group = (gen.id, i) if req.n > 1 else None
        for j in range(req.n):
            gen.add(prompt, sampling_options(req, None, config, max_tokens, i * req.n + j, seed), group)
    await gen.start()
    return gen, sum(len(p) for p in prompts)


def _logprobs(gen: Generation, tokens: list[int], logprobs: list[float], offset: int) -> CompletionLogprobs:
    texts = [gen.token_text(t) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return CompletionLogprobs(tokens=texts, token_logprobs=logprobs, top_logprobs=None, text_offset=offsets)


async def completion_response(req: CompletionRequest, gen: Generation, prompt_tokens: int) -> Completion:
    want = req.logprobs is not None
    choices = [CompletionChoice(index=out.index, text=out.text, finish_reason=out.finish_reason or "",
                                logprobs=_logprobs(gen, out.tokens, out.logprobs, 0) if want else None)
               for out in await gen.whole()]
    return Completion(id=gen.id, created=gen.created, model=gen.config.model_name, choices=choices,
                      usage=usage(prompt_tokens, gen.completion_tokens))


async def completion_stream(req: CompletionRequest, gen: Generation, prompt_tokens: int) -> AsyncIterator[str]:
    name = gen.config.model_name
    offsets = [0] * len(gen.choices)

    def chunk(choices: list[CompletionChoice], **kw: Any) -> str:
        return sse(Completion(id=gen.id, created=gen.created, model=name, choices=choices, **kw))

    async for updates in gen.updates():
        for up in updates:
            want = req.logprobs is not None and up.tokens
            if not (up.text or up.finish_reason or want):
                continue
            lps = _logprobs(gen, up.tokens, up.logprobs, offsets[up.index]) if want else None
            offsets[up.index] += sum(len(t) for t in lps.tokens) if lps else 0
            yield chunk([CompletionChoice(index=up.index, text=up.text, logprobs=lps, finish_reason=up.finish_reason)])
    if req.include_usage:
        yield chunk([], usage=usage(prompt_tokens, gen.completion_tokens))
