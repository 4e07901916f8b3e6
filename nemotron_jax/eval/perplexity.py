"""Loss and perplexity of a model on text or chat data (loss mask as in training)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from nemotron_jax.api import Model
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.data.examples import ExampleFormat, make_example
from nemotron_jax.data.packing import empty_row, pack
from nemotron_jax.sharding import use_layout
from nemotron_jax.tokenizer import Tokenizer
from nemotron_jax.train.losses import cross_entropy_per_token, lm_head


@partial(jax.jit, static_argnums=0)
def _nll_sum(graphdef: nnx.GraphDef, state: nnx.State, batch: TokenBatch) -> tuple[jax.Array, jax.Array]:
    module = nnx.merge(graphdef, state)
    h_BxTxD, _ = module.hidden_states(batch.inputs, batch.positions, batch.segment_ids)
    nll_N = cross_entropy_per_token(h_BxTxD.reshape(-1, h_BxTxD.shape[-1]), lm_head(module),
                                    batch.targets.reshape(-1))
    w_N = batch.weights.reshape(-1).astype(jnp.float32)
    return (nll_N * w_N).sum(), w_N.sum()


def evaluate_loss(model: Model, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], *, seq_len: int = 512,
                  batch_size: int = 8, fmt: ExampleFormat = ExampleFormat(), progress: bool = True) -> dict[str, float]:
    """Mean next-token loss over the loss-masked tokens of `records`, packed into rows."""
    examples = [make_example(tokenizer, fmt, r, i) for i, r in enumerate(records)]
    rows, _ = pack(examples, seq_len)
    if not rows:
        raise ValueError("no tokens to evaluate the loss on")
    graphdef, state = model.split()
    total = count = 0.0
    for i in tqdm(range(0, len(rows), batch_size), desc="eval loss", unit="batch", disable=not progress):
        chunk = rows[i:i + batch_size]
        chunk = chunk + [empty_row(seq_len)] * (batch_size - len(chunk))  # one compiled shape
        batch = jax.device_put(TokenBatch.stack(chunk))
        with use_layout(model.layout):
            s, c = _nll_sum(graphdef, state, batch)
        total, count = total + float(s), count + float(c)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}

