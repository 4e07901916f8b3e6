"""Typed batches: what one jitted train step reads, one type per kind of data.

Every batch is a pytree of [B, T] arrays (host numpy before the step, global `jax.Array`s in
it). Rows are prompt/text tokens with next-token `targets`; `weights` say how much each target
counts (0 for padding and prompt tokens), `segment_ids` separate packed sequences (0 = padding)
and `positions` restart per segment.

    TokenBatch   packed text / chat rows (lm, cpt, sft, kd; Puzzle calibration)
    PolicyBatch  prompt+response rows of a rollout with the sampler's log-probs (grpo, rloo)
    PairBatch    interleaved chosen (even) / rejected (odd) responses (dpo, rpo)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import flax.struct
import numpy as np

Array = Any  # np.ndarray on host, jax.Array on device


@flax.struct.dataclass
class TokenBatch:
    inputs: Array       # int32 [B, T] token ids
    targets: Array      # int32 [B, T] the next token at each position
    weights: Array      # float32 [B, T] loss weight of each target
    positions: Array    # int32 [B, T] position within its segment
    segment_ids: Array  # int32 [B, T] 1.. per packed sequence, 0 = padding

    @classmethod
    def zeros(cls, rows: int, seq_len: int) -> Self:
        """All-padding host arrays of every field (float32 for weights and float fields)."""
        return cls(**{f: np.zeros((rows, seq_len), _dtype(f)) for f in field_names(cls)})

    @classmethod
    def stack(cls, rows: Sequence[Mapping[str, np.ndarray]]) -> Self:
        """One batch from per-row dicts of [T] arrays (what packing produces)."""
        return cls(**{f: np.stack([r[f] for r in rows]) for f in field_names(cls)})

    @property
    def num_rows(self) -> int:
        return int(self.inputs.shape[0])

    def real_tokens(self) -> int:
        """Tokens that belong to a sequence (not padding), on this host."""
        return int((np.asarray(self.segment_ids) > 0).sum())


@flax.struct.dataclass
class PolicyBatch(TokenBatch):
    old_logprobs: Array  # float32 [B, T] the sampling policy's log p(target)
    advantages: Array    # float32 [B, T] the row's advantage on its response tokens


@flax.struct.dataclass
class PairBatch(TokenBatch):
    response_mask: Array  # float32 [B, T] 1 on response targets
    reward_gap: Array     # float32 [B, T] the pair's reward difference (RPO), repeated along T


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)


def _dtype(field: str) -> type:
    return np.int32 if field in ("inputs", "targets", "positions", "segment_ids") else np.float32
