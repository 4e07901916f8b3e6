"""Generation: a batched prefill plus one jitted `while_loop` decode over a heterogeneous KV cache.

`generate` / `stream` are pure in the weights (`graphdef, state`) so trainers can sample with
their current parameters; `Model.generate` is the convenient front end.
"""

from nemotron_jax.sampling.cache import abstract_cache_bytes, cache_bytes
from nemotron_jax.sampling.sampler import TRACES, DecodeState, GenerationResult, collect, generate, stream
from nemotron_jax.sampling.think import ThinkTokens

__all__ = ["TRACES", "DecodeState", "GenerationResult", "ThinkTokens", "abstract_cache_bytes", "cache_bytes",
           "collect", "generate", "stream"]
