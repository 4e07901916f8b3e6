"""Peak resident memory of `nemotron-jax convert`, both directions, on a ~1B float32 DeciLM.

Run: `.venv/bin/python benchmarks/convert_memory.py [--work DIR] [--layers N]`. It writes a
heterogeneous float32 DeciLM with `nj.init(...).save_hf`, converts it HF -> ours -> HF under
`/usr/bin/time -v`, checks that the round trip is byte-identical and prints a markdown table
(peak RSS against checkpoint and largest-tensor size) with the machine's `uptime` load.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def model_dict(layers: int) -> dict:
    """~0.96B params at 19 layers: hidden 2048, vocab 32000, every block kind of Nemotron-NAS."""
    kinds = ["gqa:8 swiglu:8192", "gqa:8 swiglu:5632", "linear swiglu:8192", "none swiglu:8192",
             "gqa:4 linear", "gqa:8 none", "gqa:1 swiglu:8192"]
    return {"vocab_size": 32000, "hidden_size": 2048, "num_attention_heads": 16, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_ids": [2], "torch_dtype": "float32",
            "blocks": [kinds[i % len(kinds)] for i in range(layers)]}


def make_checkpoint(hf_dir: Path, layers: int) -> None:
    """Write the HF checkpoint in a child process (so its memory is not counted below)."""
    code = ("import sys, json, nemotron_jax as nj; from nemotron_jax.config import ModelConfig; "
            "cfg = ModelConfig.from_dict(json.loads(sys.argv[1])); nj.init(cfg, seed=0).save_hf(sys.argv[2])")
    import json

    subprocess.run([sys.executable, "-c", code, json.dumps(model_dict(layers)), str(hf_dir)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(max RSS bytes, wall seconds) of `cmd`, read from /usr/bin/time -v."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb * 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/convert_memory")
    ap.add_argument("--layers", type=int, default=19)
    args = ap.parse_args()
    work = Path(args.work)
    hf, ours, back = work / "hf", work / "ours", work / "hf_back"
    if not (hf / "model.safetensors").is_file() and not (hf / "model.safetensors.index.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make_checkpoint(hf, args.layers)
    for d in (ours, back):
        shutil.rmtree(d, ignore_errors=True)
    from safetensors import safe_open

    sizes = []
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "numpy") as h:
            sizes += [h.get_slice(k).get_shape() for k in h.keys()]
    largest = max(4 * int(__import__("math").prod(s)) for s in sizes)
    ckpt = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    cli = [sys.executable, "-m", "nemotron_jax", "convert"]
    rows = [("HF -> ours", *peak_rss([*cli, str(hf), str(ours)])),
            ("ours -> HF", *peak_rss([*cli, str(ours), str(back)]))]
    same = all(filecmp.cmp(a, back / a.name, shallow=False) for a in hf.glob("*.safetensors"))
    print(f"checkpoint {ckpt / GiB:.2f} GiB float32, largest tensor {largest / GiB:.3f} GiB, "
          f"round trip byte-identical: {same}")
    print("| direction | peak RSS (GiB) | / checkpoint | wall (s) |\n| --- | ---: | ---: | ---: |")
    for name, rss, wall in rows:
        print(f"| {name} | {rss / GiB:.2f} | {rss / ckpt:.2f} | {wall:.0f} |")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
