"""POST /v1/chat/completions: messages through the chat template, the reasoning toggle, the
`<think>` part of the answer in `reasoning_content` (the vLLM / DeepSeek convention).

The toggle is the system prompt `detailed thinking on|off` (SPEC §3). `thinking: true|false`
writes it; a request that sends both `thinking` and its own system message is refused, since the
model knows no other system prompt. A system message that *is* the toggle sets the defaults just
as `thinking` does.
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
from nemotron_jax.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Delta,
    TokenLogprob,
)
from nemotron_jax.serve.runner import EngineRunner
from nemotron_jax.serve.text import ReasoningSplitter, TokenizerLike

TOGGLES = {"detailed thinking on": True, "detailed thinking off": False}


def chat_prompt(req: ChatCompletionRequest, tokenizer: TokenizerLike) -> tuple[list[int], bool | None]:
    """(prompt ids with the generation prompt, the reasoning toggle: True | False | None unset)."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    thinking = req.thinking
    if messages[0]["role"] == "system":
        if thinking is not None:
            raise APIError(400, "pass either `thinking` or a system message, not both: the reasoning toggle is "
                           "the system prompt ('detailed thinking on|off'); put other instructions in the user "
                           "turn", "thinking")
        thinking = TOGGLES.get(messages[0]["content"].strip())
    try:
        return tokenizer.apply_chat_template(messages, thinking=req.thinking), thinking
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


async def start_chat(req: ChatCompletionRequest, runner: EngineRunner, tokenizer: TokenizerLike,
                     config: ServerConfig) -> tuple[Generation, int]:
    """The request's choices queued in the engine; (their generation, prompt tokens)."""
    prompt, thinking = chat_prompt(req, tokenizer)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = new_tokens(req.new_tokens, len(prompt), config, param)
    seed = request_seed(req.seed)
    gen = Generation(runner, tokenizer, config, "chatcmpl", req.stop)
    group = (gen.id, "prompt") if req.n > 1 else None
    for j in range(req.n):
        gen.add(prompt, sampling_options(req, thinking, config, max_tokens, j, seed, req.max_thinking_tokens), group)
    await gen.start()
    return gen, len(prompt)


def _logprobs(gen: Generation, tokens: list[int], logprobs: list[float]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[TokenLogprob(token=gen.token_text(t), logprob=lp)
                                   for t, lp in zip(tokens, logprobs, strict=True)])


async def chat_response(req: ChatCompletionRequest, gen: Generation, prompt_tokens: int) -> ChatCompletion:
    choices = []
    for out in await gen.whole():
        splitter = ReasoningSplitter()
        r1, c1 = splitter.push(out.text)
        r2, c2 = splitter.flush()
        message = AssistantMessage(content=c1 + c2, reasoning_content=r1 + r2 if splitter.has_reasoning else None)
        choices.append(ChatChoice(index=out.index, message=message, finish_reason=out.finish_reason or "",
                                  logprobs=_logprobs(gen, out.tokens, out.logprobs) if req.logprobs else None))
    return ChatCompletion(id=gen.id, created=gen.created, model=gen.config.model_name, choices=choices,
                          usage=usage(prompt_tokens, gen.completion_tokens))


async def chat_stream(req: ChatCompletionRequest, gen: Generation, prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, then deltas, then (stream_options) usage, [DONE]."""
    name = gen.config.model_name

    def chunk(choices: list[ChatChunkChoice], **kw: Any) -> str:
        return sse(ChatCompletionChunk(id=gen.id, created=gen.created, model=name, choices=choices, **kw))

    splitters = [ReasoningSplitter() for _ in gen.choices]
    for c in gen.choices:
        yield chunk([ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content=""))])
    async for updates in gen.updates():
        for up in updates:
            reasoning, content = splitters[up.index].push(up.text)
            if up.finish_reason is not None:
                r, c = splitters[up.index].flush()
                reasoning, content = reasoning + r, content + c
            if not (reasoning or content or up.finish_reason or (req.logprobs and up.tokens)):
                continue
            delta = Delta(content=content or None, reasoning_content=reasoning or None)
            lps = _logprobs(gen, up.tokens, up.logprobs) if req.logprobs and up.tokens else None
            yield chunk([ChatChunkChoice(index=up.index, delta=delta, logprobs=lps, finish_reason=up.finish_reason)])
    if req.include_usage:
        yield chunk([], usage=usage(prompt_tokens, gen.completion_tokens))
