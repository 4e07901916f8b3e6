"""The generation engine: continuous batching over a paged KV cache shaped by the architecture.

    engine = nj.Engine(model, max_batch=32, page_size=16, num_pages=None)  # None: sized from memory
    outs = engine.generate(prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                           stop_tokens=None, n=1, return_logprobs=False)

Request-level interface (what a server or an RL rollout drives; `generate` is built on it):

    rid = engine.add_request(prompt_ids, SamplingOptions(max_new_tokens=64, temperature=0.6, top_p=0.95,
                             seed=7, stop_tokens=None, max_thinking_tokens=None), request_id=None,
                             group=None)    # ValueError if invalid or too long for the pool
    while engine.has_work():
        for ev in engine.step():   # TokenEvent(request_id, token, logprob, finished, finish_reason)
            ...                    # finish_reason: "stop" (stop token, included) | "length"
    engine.abort(rid)              # e.g. on client disconnect: frees its pages at once

- `step()` runs at most one prefill call (chunks of waiting prompts, `prefill_tokens` per step) and
  one decode call (`decode_steps` tokens per running request), then one device->host transfer.
  Requests join and leave between steps; nothing waits for the longest sequence.
- A request's tokens depend only on its prompt, its options (`seed`, `sample_index`) and the
  weights, never on what else is running: its key is fold_in(fold_in(key(seed), sample_index),
  token_index). `generate` gives sample j of prompt i the index i * n + j.
- Requests passed with the same `group` (generate's n samples) have the same prompt: it is prefilled
  once and its full pages are shared by reference count; identical full-page prompt prefixes of
  any requests alive at the same time are shared too (`pages.PageAllocator`).
- When pages run out, requests wait (admission) or the newest is preempted and later recomputed;
  a request that could never fit raises at `add_request`. `engine.free_pages` returns to
  `num_pages - 1` when the engine is idle. `engine.stats` counts prefill tokens, calls and
  preemptions; `step.TRACES` counts compilations.

Modules: `pages` (pools per KV geometry, allocator, prefix table), `scheduler` (admission,
chunking, preemption), `step` (the jitted prefill / decode over the paged cache), `engine`.
"""

from nemotron_jax.engine.engine import Engine, SamplingOptions, TokenEvent
from nemotron_jax.engine.step import TRACES

__all__ = ["TRACES", "Engine", "SamplingOptions", "TokenEvent"]
