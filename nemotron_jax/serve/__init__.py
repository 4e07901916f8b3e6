"""`nemotron-jax serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over `Engine`.

    app = create_app(engine, tokenizer, ServerConfig(...))

- `app`: routes and errors; `chat` / `completions`: the two endpoints; `protocol`: the wire
  format; `generation`: one request's choices as engine requests; `text`: detokenizing, stop
  strings and the `<think>` split; `runner`: the thread that owns the engine.
- The package takes a built engine and tokenizer (the CLI loads them): of nemotron_jax it
  imports only `engine`, so it can run beside anything that already holds a model.
"""

from nemotron_jax.serve.app import create_app
from nemotron_jax.serve.generation import ServerConfig
from nemotron_jax.serve.runner import EngineRunner
from nemotron_jax.serve.text import split_reasoning

__all__ = ["EngineRunner", "ServerConfig", "create_app", "split_reasoning"]
