"""`create_app`: the FastAPI application of `nemotron-jax serve`.

    app = create_app(engine, tokenizer, config)   # the lifespan starts and stops the engine thread
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health and
GET /stats (the engine's counters, pages and the runner's batching figures; not OpenAI). Every
error, FastAPI's own validation errors included, is OpenAI-shaped JSON with a 4xx/5xx status.
A client that goes away (a closed stream, a dropped connection while waiting) has its requests
aborted, so their pages return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nemotron_jax.engine import Engine
from nemotron_jax.serve.chat import chat_response, chat_stream, start_chat
from nemotron_jax.serve.completions import completion_response, completion_stream, start_completion
from nemotron_jax.serve.generation import Generation, ServerConfig, sse
from nemotron_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from nemotron_jax.serve.runner import EngineRunner
from nemotron_jax.serve.text import TokenizerLike

DISCONNECT_POLL_S = 0.5


def create_app(engine: Engine, tokenizer: TokenizerLike, config: ServerConfig) -> FastAPI:
    """The app over `engine` (which it now owns: nothing else may call it while the app runs)."""
    runner = EngineRunner(engine)
    config = dataclasses.replace(config, pool_tokens=(engine.num_pages - 1) * engine.page_size)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="nemotron-jax", description="OpenAI-compatible API over the nemotron-jax engine",
                  lifespan=lifespan)
    app.state.runner, app.state.engine, app.state.config = runner, engine, config
    _install_error_handlers(app)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{config.model_name}`",
                           "model", "model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "nemotron-jax",
                "max_model_len": config.max_model_len}

    @app.get("/health")
    async def health() -> dict[str, str]:
        if not runner.alive:
            raise APIError(503, "the engine thread is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return runner.stats

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        gen, prompt_tokens = await start_chat(req, runner, tokenizer, config)
        if req.stream:
            return _EventStream(chat_stream(req, gen, prompt_tokens), gen)
        return await _unless_disconnected(request, chat_response(req, gen, prompt_tokens), gen)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        gen, prompt_tokens = await start_completion(req, runner, tokenizer, config)
        if req.stream:
            return _EventStream(completion_stream(req, gen, prompt_tokens), gen)
        return await _unless_disconnected(request, completion_response(req, gen, prompt_tokens), gen)

    return app


class _EventStream(StreamingResponse):
    """Server-sent events ending in `data: [DONE]`; the generation is aborted however the response
    ends (Starlette cancels the stream when the client disconnects)."""

    def __init__(self, events: AsyncIterator[str], gen: Generation):
        super().__init__(self._body(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    @staticmethod
    async def _body(events: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as e:  # mid-stream: the status is sent already, so an error event
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


async def _unless_disconnected(request: Request, work: Awaitable[Any], gen: Generation) -> Any:
    """`work`'s result, or (client gone) its generation aborted and an empty 499."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()
        gen.close()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        """Pydantic's errors as one OpenAI 400 naming the first bad field (not FastAPI's 422)."""
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = f"{param}: {msg}{more}" if param else f"{msg}{more}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {e!r}", "server_error"), status_code=500)
