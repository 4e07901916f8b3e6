"""`PuzzleConfig`: one YAML drives every Puzzle stage, validated strictly.

An unknown key or a value of the wrong type is an error naming the dotted key
(`library.ffn_fractions[2]`), so that a typo never silently falls back to a default. Overrides
are `key=value` with dotted keys (`output_dir=D`, `search.speedup=2`), values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from nemotron_jax.data.pipeline import DataConfig
from nemotron_jax.errors import ConfigError
from nemotron_jax.train.config import KDConfig
from nemotron_jax.typed_yaml import load_yaml


@dataclasses.dataclass(frozen=True)
class ParentConfig:
    """The parent. `source`: an existing model directory (HF or `Model.save`); when empty, `model`
    (a preset name, a config path, or an inline `ModelConfig` dict) is initialised and trained
    for `train_steps` as the first (resumable) stage."""

    source: str = ""
    model: Any = "tiny-llama"
    train_steps: int = 300
    lr: float = 3e-3


@dataclasses.dataclass(frozen=True)
class LibraryConfig:
    """Candidate subblocks per layer (SPEC §1 "Block library").

    `width_multiple`: FFN widths are `fraction · parent width` rounded to this multiple (256 in
    the paper and the only value a DeciLM `ffn_mult` can express; tiny models may use 32 or 64,
    but then the child can only be saved with `output.child_format: native`)."""

    kv_heads: tuple[int, ...] = (8, 4, 2, 1)
    ffn_fractions: tuple[float, ...] = (1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1)
    width_multiple: int = 256
    linear_attention: bool = True
    linear_ffn: bool = True
    noop_attention: bool = True
    noop_ffn: bool = True
    calibration_batches: int = 4
    ridge: float = 1e-3


@dataclasses.dataclass(frozen=True)
class BLDConfig:
    """Blockwise local distillation (SPEC §5): AdamW (b1, b2), weight decay, per-candidate clip,
    `warmup_ratio` linear warm-up then cosine to lr·`min_lr_ratio`."""

    steps: int = 100
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 1e-5
    checkpoint_every: int = 50
    seed_offset: int = 1


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Replace-one-block scoring on `batches` held-out batches; `metric` ranks candidates."""

    metric: Literal["kl", "lm_loss"] = "kl"
    batches: int = 4


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """Per-candidate costs. `method: measured` times our own jitted blocks on this backend
    (stacks of `repeats` copies minus a baseline, over `rounds` rounds); `analytic` uses a
    roofline with `peak_flops` and `bandwidth`. Results are cached in `cache_file`
    (default `{output_dir}/latency_cache.json`) keyed by device kind and shapes."""

    method: Literal["measured", "analytic"] = "measured"
    prefill_batch: int = 4
    prefill_seq: int = 128
    decode_batch: int = 16
    decode_context: int = 256
    decode_steps: int = 8
    repeats: int = 4
    rounds: int = 5
    dtype: Literal["float32", "bfloat16"] = "float32"
    cache_file: str = ""
    peak_flops: float = 5e10
    bandwidth: float = 2e10


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """MIP over one choice per layer (SPEC §5). `target`: which runtime the constraint is on.
    `speedup` (relative to the parent) or `latency_ms` (absolute, predicted); memory
    Σ(params + `memory_batch`·context·kv) and parameters relative to the parent when set.
    `num_solutions` diverse solutions (each shares at most `diversity`·layers choices with an
    earlier one) are assembled and the best held-out KL wins. `calibration_rounds`: re-solve with
    a tighter budget while the assembled child's *measured* speed-up misses the target."""

    target: Literal["decode", "prefill"] = "decode"
    speedup: float | None = 1.5
    latency_ms: float | None = None
    max_memory_ratio: float | None = None
    max_params_ratio: float | None = None
    memory_batch: int = 16
    num_solutions: int = 3
    diversity: float = 0.8
    calibration_rounds: int = 3
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class RecoveryConfig(KDConfig):
    """Global KD after assembly (SPEC §5): the training package's `KDConfig` loss (its fields,
    here defaulting to L = KL + (1 − cos), no LM term) plus the length and learning rate of the run."""

    cosine_weight: float = 1.0
    steps: int = 150
    lr: float = 1e-3
    warmup_ratio: float = 0.05

    def loss(self) -> KDConfig:
        """The loss part, as the training package's `KDConfig`."""
        return KDConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KDConfig)})


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """`child_format`: `decilm` (HF DeciLM, widths multiples of 256) or `native` (`Model.save`)."""

    child_format: Literal["decilm", "native"] = "decilm"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class PuzzleConfig:
    output_dir: str = "outputs/puzzle"
    seed: int = 0
    parent: ParentConfig = ParentConfig()
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(
        path="synthetic:text", eval_examples=64, seq_len=128, batch_size=16))
    library: LibraryConfig = LibraryConfig()
    bld: BLDConfig = BLDConfig()
    score: ScoreConfig = ScoreConfig()
    costs: CostConfig = CostConfig()
    search: SearchConfig = SearchConfig()
    kd: RecoveryConfig = RecoveryConfig()
    output: OutputConfig = OutputConfig()

    def validate(self) -> None:
        positive = {"parent.train_steps": self.parent.train_steps if not self.parent.source else 1,
                    "library.width_multiple": self.library.width_multiple,
                    "library.calibration_batches": self.library.calibration_batches,
                    "bld.steps": self.bld.steps, "bld.checkpoint_every": self.bld.checkpoint_every,
                    "score.batches": self.score.batches, "costs.repeats": self.costs.repeats,
                    "costs.rounds": self.costs.rounds, "costs.decode_steps": self.costs.decode_steps,
                    "search.num_solutions": self.search.num_solutions, "kd.steps": self.kd.steps,
                    "data.eval_examples": self.data.eval_examples}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.costs.decode_steps >= self.costs.decode_context:
            raise ConfigError("costs.decode_steps must be smaller than costs.decode_context")
        if (self.search.speedup is None) == (self.search.latency_ms is None):
            raise ConfigError("set exactly one of search.speedup and search.latency_ms")
        if self.search.speedup is not None and self.search.speedup <= 0:
            raise ConfigError(f"search.speedup must be > 0, got {self.search.speedup}")
        if not 0 < self.search.diversity <= 1:
            raise ConfigError(f"search.diversity must lie in (0, 1], got {self.search.diversity}")
        if any(not 0 < f <= 1 for f in self.library.ffn_fractions):
            raise ConfigError(f"library.ffn_fractions must lie in (0, 1], got {list(self.library.ffn_fractions)}")
        if any(k < 1 for k in self.library.kv_heads):
            raise ConfigError(f"library.kv_heads must be positive, got {list(self.library.kv_heads)}")
        if self.output.child_format == "decilm" and self.library.width_multiple % 256:
            raise ConfigError(
                f"library.width_multiple={self.library.width_multiple}: a DeciLM child needs FFN widths that are "
                "multiples of 256 (ffn_mult); use a multiple of 256 or output.child_format=native")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PuzzleConfig:
    """A validated `PuzzleConfig` from a YAML file (or defaults when None) plus overrides."""
    cfg = load_yaml(PuzzleConfig, path, overrides, what="puzzle config")
    cfg.validate()
    return cfg


def to_dict(cfg: PuzzleConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(out)
