"""The block library: candidate subblocks for every layer of a parent, initialised from it.

Per layer (SPEC §1, §5):
- attention: GQA with fewer KV heads (K and V mean-pooled over each group of parent KV heads),
  a linear map W = Σ_n W_v[kv(n)] W_o[n] (what attention computes when every token attends only
  to itself), and no-op;
- FFN: narrower SwiGLU (keep the channels with the largest importance C_i = mean|X_i|·‖W_down[i,:]‖₂,
  X = silu(gate)·up on calibration tokens), a linear map fitted by least squares on calibration
  activations (normed input -> FFN output), and no-op.
The parent's own subblocks are the exact members (full KV heads, full width).

Legend: N tokens (calibration) or query heads in weights, D hidden, K KV heads, H head dim, F width.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from nemotron_jax.api import Model
from nemotron_jax.config import AttentionConfig, FFNConfig, ModelConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.model.ffn import SwiGLU
from nemotron_jax.model.params import flat_params
from nemotron_jax.puzzle import subblocks as sb
from nemotron_jax.puzzle.config import LibraryConfig


@dataclasses.dataclass
class Candidate:
    """One subblock variant of one layer. `origin`: parent (exact copy), init (from the parent, not
    trained yet), bld (trained by blockwise distillation) or none (no weights)."""

    variant: sb.Variant
    params: dict[sb.SubPath, np.ndarray]
    origin: str
    bld_loss: float | None = None

    @property
    def name(self) -> str:
        return sb.variant_name(self.variant)

    @property
    def kind(self) -> str:
        return sb.kind_of(self.variant)

    @property
    def trainable(self) -> bool:
        return self.origin in ("init", "bld")


@dataclasses.dataclass
class Library:
    """`layers[i]` maps "attention"/"ffn" -> {variant name: Candidate}."""

    parent: ModelConfig
    layers: list[dict[str, dict[str, Candidate]]]

    def candidates(self, layer: int, kind: str) -> list[Candidate]:
        return list(self.layers[layer][kind].values())

    def get(self, layer: int, variant: sb.Variant) -> Candidate:
        try:
            return self.layers[layer][sb.kind_of(variant)][sb.variant_name(variant)]
        except KeyError:
            raise ConfigError(f"layer {layer} has no {sb.kind_of(variant)} variant "
                              f"{sb.variant_name(variant)!r} in the library") from None

    def all(self) -> list[tuple[int, Candidate]]:
        return [(i, c) for i, layer in enumerate(self.layers) for kind in ("attention", "ffn")
                for c in layer[kind].values()]


# ---------------------------------------------------------------- which variants
def round_width(width: float, multiple: int) -> int:
    """Nearest multiple of `multiple`, at least one multiple."""
    return max(multiple, round(width / multiple) * multiple)


def attention_variants(parent: AttentionConfig, heads: int, cfg: LibraryConfig) -> list[AttentionConfig]:
    """Parent first, then fewer KV heads (counts dividing the parent's), linear, no-op."""
    if parent.kind != "gqa":
        return [parent] + ([AttentionConfig("none")] if cfg.noop_attention and parent.kind != "none" else [])
    out = [parent]
    for kv in sorted(set(cfg.kv_heads), reverse=True):
        if kv < parent.num_kv_heads and parent.num_kv_heads % kv == 0 and heads % kv == 0:
            out.append(AttentionConfig("gqa", kv))
    if cfg.linear_attention:
        out.append(AttentionConfig("linear"))
    if cfg.noop_attention:
        out.append(AttentionConfig("none"))
    return out


def ffn_variants(parent: FFNConfig, cfg: LibraryConfig) -> list[FFNConfig]:
    """Parent first, then narrower SwiGLUs (fractions rounded to `width_multiple`), linear, no-op."""
    parent = sb.plain_variant(parent)
    if parent.kind != "swiglu":
        return [parent] + ([FFNConfig("none")] if cfg.noop_ffn and parent.kind != "none" else [])
    widths = sorted({round_width(f * parent.intermediate_size, cfg.width_multiple) for f in cfg.ffn_fractions},
                    reverse=True)
    out = [parent] + [FFNConfig("swiglu", w) for w in widths if w < parent.intermediate_size]
    if cfg.linear_ffn:
        out.append(FFNConfig("linear"))
    if cfg.noop_ffn:
        out.append(FFNConfig("none"))
    return out


# ---------------------------------------------------------------- initialisation rules
def pool_kv(k_DxKxH: np.ndarray, v_DxKxH: np.ndarray, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pool consecutive groups of KV heads: query head n keeps its group (n // (N / kv))."""
    d, k, h = k_DxKxH.shape
    if k % kv_heads:
        raise ValueError(f"cannot pool {k} KV heads into {kv_heads}")
    g = k // kv_heads
    return (k_DxKxH.reshape(d, kv_heads, g, h).mean(axis=2), v_DxKxH.reshape(d, kv_heads, g, h).mean(axis=2))


def linear_from_attention(v_DxKxH: np.ndarray, o_NxHxD: np.ndarray) -> np.ndarray:
    """W_o·W_v with KV heads repeated to query heads: attention when each token sees only itself."""
    n, k = o_NxHxD.shape[0], v_DxKxH.shape[1]
    v_DxNxH = np.repeat(v_DxKxH, n // k, axis=1)
    return np.einsum("dnh,nhe->de", v_DxNxH.astype(np.float64), o_NxHxD.astype(np.float64)).astype(np.float32)


def ffn_importance(mean_abs_act_F: np.ndarray, down_FxD: np.ndarray) -> np.ndarray:
    """C_i = mean_tokens |X_i| · ‖W_down[i, :]‖₂ per channel [F]."""
    return np.asarray(mean_abs_act_F) * np.linalg.norm(np.asarray(down_FxD), axis=1)


def prune_ffn(params: sb.SubParams, importance_F: np.ndarray, width: int) -> dict[sb.SubPath, np.ndarray]:
    """Keep the `width` most important channels (in their original order)."""
    keep = np.sort(np.argsort(-importance_F, kind="stable")[:width])
    return {("norm", "weight"): np.asarray(params[("norm", "weight")]),
            ("gate",): np.asarray(params[("gate",)])[:, keep], ("up",): np.asarray(params[("up",)])[:, keep],
            ("down",): np.asarray(params[("down",)])[keep, :]}


def solve_normal(gram_DxD: np.ndarray, cross_DxD: np.ndarray, n: int, ridge: float) -> np.ndarray:
    """argmin_W ‖h W − y‖² + ridge·n·‖W‖² from gram = hᵀh and cross = hᵀy (float64; the ridge
    keeps it well posed when there are few tokens or collinear features)."""
    gram = np.asarray(gram_DxD, np.float64) + ridge * n * np.eye(gram_DxD.shape[0])
    return np.linalg.solve(gram, np.asarray(cross_DxD, np.float64)).astype(np.float32)


# ---------------------------------------------------------------- the library of one parent
@partial(jax.jit, static_argnums=0)
def _ffn_calibration(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
                     segment_ids: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Per SwiGLU layer, over real tokens: (Σ|X| [F], Σ hᵀh [D, D], Σ hᵀy [D, D]), h the normed
    FFN input and y the FFN output (float32 sums; what importance and least squares need)."""
    model = nnx.merge(graphdef, state)
    mids = model.capture(tokens, positions, segment_ids).mids
    mask_N1 = (segment_ids.reshape(-1, 1) > 0).astype(jnp.float32)
    out = []
    for block, mid in zip(model.layers, mids, strict=True):
        if not isinstance(block.ffn, SwiGLU):
            out.append(None)
            continue
        h_BxTxD = block.ffn.norm(mid)
        act_BxTxF = jax.nn.silu(h_BxTxD @ block.ffn.gate[...]) * (h_BxTxD @ block.ffn.up[...])
        h_NxD = h_BxTxD.reshape(-1, h_BxTxD.shape[-1]).astype(jnp.float32) * mask_N1
        y_NxD = block.ffn(mid, block.ffn_fn).reshape(h_NxD.shape).astype(jnp.float32)
        out.append((jnp.sum(jnp.abs(act_BxTxF.reshape(-1, act_BxTxF.shape[-1])) * mask_N1, axis=0),
                    h_NxD.T @ h_NxD, h_NxD.T @ y_NxD))
    return out


def calibration_stats(parent: Model, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | None]:
    """Per SwiGLU layer: `mean_abs_act` [F], `gram` = Σ hᵀh and `cross` = Σ hᵀy [D, D], and the
    token count `n`, over the real (non-padding) tokens of `batches`."""
    graphdef, state = parent.split()
    totals: list[list[np.ndarray] | None] = [None] * parent.config.num_layers
    count = 0
    for batch in batches:
        count += int((np.asarray(batch.segment_ids) > 0).sum())
        sums = _ffn_calibration(graphdef, state, jnp.asarray(batch.inputs), jnp.asarray(batch.positions),
                                jnp.asarray(batch.segment_ids))
        for i, s in enumerate(sums):
            if s is not None:
                values = [np.asarray(v, np.float64) for v in s]
                totals[i] = values if totals[i] is None else [a + b for a, b in zip(totals[i], values, strict=True)]
    if count == 0:
        raise ValueError("calibration batches hold no tokens")
    return [None if t is None else {"mean_abs_act": t[0] / count, "gram": t[1], "cross": t[2], "n": count}
            for t in totals]


def build_library(parent: Model, calibration: list[dict[str, np.ndarray]], cfg: LibraryConfig,
                  progress: bool = False) -> Library:
    """Every layer's candidates initialised from the parent (SPEC §5 rules); nothing trained yet."""
    pcfg = parent.config
    flat = {k: np.asarray(v) for k, v in flat_params(parent.module).items()}
    stats = calibration_stats(parent, calibration) if any(b.ffn.kind == "swiglu" for b in pcfg.blocks) else []
    layers = []
    for i in tqdm(range(pcfg.num_layers), desc="library init", disable=not progress, leave=False):
        att_parent, ffn_parent = sb.parent_variants(pcfg, i)
        att_w, ffn_w = sb.block_params(flat, i, "attention"), sb.block_params(flat, i, "ffn")
        entry: dict[str, dict[str, Candidate]] = {"attention": {}, "ffn": {}}
        for variant in attention_variants(att_parent, pcfg.num_attention_heads, cfg):
            entry["attention"][sb.variant_name(variant)] = _init_attention(variant, att_parent, att_w)
        for variant in ffn_variants(ffn_parent, cfg):
            entry["ffn"][sb.variant_name(variant)] = _init_ffn(variant, ffn_parent, ffn_w,
                                                              stats[i] if stats else None, cfg.ridge)
        layers.append(entry)
    return Library(pcfg, layers)


def _init_attention(variant: AttentionConfig, parent: AttentionConfig, w: sb.SubParams) -> Candidate:
    if variant == parent:
        return Candidate(variant, dict(w), "parent")
    if variant.kind == "none":
        return Candidate(variant, {}, "none")
    norm = w[("norm", "weight")]
    if variant.kind == "gqa":
        k, v = pool_kv(w[("k",)], w[("v",)], variant.num_kv_heads)
        return Candidate(variant, {("norm", "weight"): norm, ("q",): w[("q",)], ("k",): k, ("v",): v,
                                   ("o",): w[("o",)]}, "init")
    if parent.kind == "gqa":
        return Candidate(variant, {("norm", "weight"): norm,
                                   ("kernel",): linear_from_attention(w[("v",)], w[("o",)])}, "init")
    raise ConfigError(f"cannot derive {variant} from a parent {parent} attention")


def _init_ffn(variant: FFNConfig, parent: FFNConfig, w: sb.SubParams, stats: dict[str, np.ndarray] | None,
              ridge: float) -> Candidate:
    if variant == parent:
        return Candidate(variant, dict(w), "parent")
    if variant.kind == "none":
        return Candidate(variant, {}, "none")
    if stats is None:
        raise ConfigError(f"cannot derive {variant} from a parent {parent} FFN")
    if variant.kind == "swiglu":
        importance = ffn_importance(stats["mean_abs_act"], w[("down",)])
        return Candidate(variant, prune_ffn(w, importance, variant.intermediate_size), "init")
    kernel = solve_normal(stats["gram"], stats["cross"], stats["n"], ridge)
    return Candidate(variant, {("norm", "weight"): np.asarray(w[("norm", "weight")]), ("kernel",): kernel}, "init")


def as_jax(params: dict[sb.SubPath, np.ndarray]) -> dict[sb.SubPath, jax.Array]:
    return {p: jnp.asarray(v) for p, v in params.items()}
