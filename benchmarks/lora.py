"""Full fine-tuning vs LoRA vs QLoRA: memory and step time of the SFT step, and the planner's answer
for LN-Nano on one chip.

Part 1, measured here: the ~90M Llama of `benchmarks/train_step.py` (12 x 768, vocab 16384),
float32, batch 4 x 512, the recipe's own jitted train step (LM loss, AdamW) for
- full: every weight trained (float32 masters, two AdamW moments each);
- LoRA r16 on every projection: only the adapters train, the base is a frozen, non-donated argument;
- QLoRA int8 / int4 r16: the same over a base quantized weight-only (`Model.quantize`).
Per variant: the trained + optimiser bytes (the train state), the frozen base's bytes, the
compiled step's temporaries (XLA `memory_analysis`), the best step time over `--rounds`
round-robin rounds, and trained parameters as a share of all.

Part 2, planned: `nemotron_jax.plan` for LN-Nano 8B (SFT at 4k, batch 1; bf16 inference with a
4k cache) on one 16 GB v5e chip and one 80 GB GPU: bf16 / int8 / int4 weights, LoRA and QLoRA.

    .venv/bin/python benchmarks/lora.py [--rounds 5] [--batch 4 --seq 512]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts

from nemotron_jax.api import init
from nemotron_jax.data.batch import TokenBatch
from nemotron_jax.model.lora import LoRAParam
from nemotron_jax.train.optim import OptimizerConfig, make_optimizer
from nemotron_jax.train.state import init_state
from nemotron_jax.train.step import make_train_step
from nemotron_jax.train.strategies import LMStrategy

MiB = 2**20


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


class Variant:
    def __init__(self, name: str, quantize: str | None, rank: int, batch: int, seq: int):
        self.name = name
        model = init(ts.bench_config(), seed=0)
        total = sum(x.size for x in jax.tree.leaves(nnx.state(model.module, nnx.Param)))
        if quantize:
            model = model.quantize(quantize)
        frozen = None
        if rank:
            model.add_adapters(rank=rank, alpha=2.0 * rank)
            graphdef, params, frozen = nnx.split(model.module, LoRAParam, ...)
        else:
            graphdef, params = nnx.split(model.module)
        self.trained_share = sum(x.size for x in jax.tree.leaves(params)) / total
        tx, schedule = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
        self.state = init_state(params, tx, 0)
        self.frozen = frozen
        self.state_bytes, self.frozen_bytes = nbytes(self.state), nbytes(frozen)
        step = make_train_step(LMStrategy(chunk_tokens=2048), graphdef, tx, schedule, frozen=frozen)
        toks = np.random.default_rng(0).integers(0, ts.VOCAB, (batch, seq + 1)).astype(np.int32)
        self.data = jax.device_put(TokenBatch(
            inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((batch, seq), np.float32),
            positions=np.broadcast_to(np.arange(seq), (batch, seq)).astype(np.int32),
            segment_ids=np.ones((batch, seq), np.int32)))
        self.step_fn = step
        compiled = step.lower(self.state, self.data).compile()
        self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        self.times: list[float] = []
        self.run()  # compile and warm up

    def run(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.data)
        self.loss = float(jax.block_until_ready(metrics)["loss"])
        return time.perf_counter() - t


def planned() -> list[tuple]:
    from nemotron_jax.plan import DEVICE_MEMORY, plan_memory
    from nemotron_jax.presets import resolve_config
    from nemotron_jax.sharding import MeshConfig

    cfg = resolve_config("ln-nano-8b")
    rows = []
    for device in ("v5e", "h100"):
        for label, kw in (("inference bf16", {"mode": "infer"}),
                          ("inference int8", {"mode": "infer", "quantize": "int8"}),
                          ("inference int4", {"mode": "infer", "quantize": "int4"}),
                          ("SFT full (fp32 masters)", {"mode": "train"}),
                          ("SFT LoRA r16 (bf16 base)", {"mode": "train", "lora_rank": 16}),
                          ("SFT QLoRA int8 r16", {"mode": "train", "lora_rank": 16, "quantize": "int8"}),
                          ("SFT QLoRA int4 r16", {"mode": "train", "lora_rank": 16, "quantize": "int4"})):
            p = plan_memory(cfg, MeshConfig(), 1, 1, 4096, **kw)
            rows.append((device, label, p.total_bytes, p.fits(DEVICE_MEMORY[device])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if not args.skip_measure:
        variants = [Variant("full", None, 0, args.batch, args.seq), Variant("LoRA r16", None, 16, args.batch, args.seq),
                    Variant("QLoRA int8 r16", "int8", 16, args.batch, args.seq),
                    Variant("QLoRA int4 r16", "int4", 16, args.batch, args.seq)]
        for _ in range(args.rounds):
            for v in variants:
                v.times.append(v.run())
        after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"\n~{ts.bench_config().num_params() / 1e6:.0f}M Llama, float32, batch {args.batch} x {args.seq}, "
              f"jax {jax.__version__}, {jax.devices()[0].device_kind}; before: {before}; after: {after}\n")
        print("| variant | trained params | train state MiB (trained + AdamW) | frozen base MiB | step temporaries MiB "
              "| state + base + temporaries MiB | best step s | loss after |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for v in variants:
            total = v.state_bytes + v.frozen_bytes + v.temp_bytes
            print(f"| {v.name} | {v.trained_share:.1%} | {v.state_bytes / MiB:.1f} | {v.frozen_bytes / MiB:.1f} | "
                  f"{v.temp_bytes / MiB:.0f} | {total / MiB:.0f} | {min(v.times):.2f} | {v.loss:.3f} |")
    print("\nLN-Nano 8B, one chip, `nemotron_jax.plan` (SFT: batch 1 x 4096, AdamW; inference: 4k cache)\n")
    print("| device | run | total GiB | fits |")
    print("| --- | --- | ---: | --- |")
    for device, label, total, fits in planned():
        print(f"| {device} | {label} | {total / 2**30:.1f} | {'yes' if fits else 'no'} |")


if __name__ == "__main__":
    main()
