"""Puzzle: neural architecture search from a Llama parent (SPEC §4-5), and FFN Fusion.

    library   candidate subblocks per layer, initialised from the parent (pooling, pruning, W_o·W_v, lstsq)
    bld       blockwise local distillation of every candidate on the parent's activations
    score     replace-one-block KL / LM loss from cached parent activations
    costs     parameter / KV-cache bytes and measured prefill / decode time per subblock
    search    the MIP (grouped knapsack, scipy HiGHS) under latency / memory / parameter budgets
    assemble  the child from library weights, then KD recovery from the parent
    fusion    FFN Fusion of runs of attention-free FFN blocks
    pipeline  every stage, resumable, driven by one YAML (`nemotron-jax puzzle ...`)
"""

from nemotron_jax.puzzle.config import PuzzleConfig, load_config
from nemotron_jax.puzzle.fusion import find_runs, fuse
from nemotron_jax.puzzle.library import Library, build_library
from nemotron_jax.puzzle.pipeline import Puzzle

__all__ = ["Library", "Puzzle", "PuzzleConfig", "build_library", "find_runs", "fuse", "load_config"]
