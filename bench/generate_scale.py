"""generate.py's throughput with 1 and 2 processes under `accelerate launch`, threads fixed per process.

    python bench/generate_scale.py [--model outputs/unet-demo] [--images 256] [--batch_size 8]
                                   [--steps 30] [--rounds 2]

Each run draws `--images` images (one per prompt, the demo's prompts cycled) with OMP_NUM_THREADS=1
in every process, so 2 processes use 2 cores and 1 process uses 1; a 1-process run with 2 threads
is the in-process alternative on the same cores. Runs alternate over `--rounds`, since these
machines drift; images/s counts the whole command (start-up and model loading included), and the
PNGs of the 1- and 2-process runs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import two_processes  # noqa: E402

SETUPS = {  # name → (launcher, threads per process)
    "1 process, 1 thread": ([sys.executable], "1"),
    "2 processes, 1 thread each": ([*two_processes(port_offset=77)], "1"),
    "1 process, 2 threads": ([sys.executable], "2"),
}


def prompts_file(folder: str, count: int) -> str:
    with open(os.path.join(ROOT, "configs", "demo_prompts.txt"), encoding="utf-8") as file:
        prompts = [line.strip() for line in file if line.strip()]
    path = os.path.join(folder, "prompts.txt")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(prompts[i % len(prompts)] for i in range(count)) + "\n")
    return path


def run(setup: str, args: argparse.Namespace, prompts: str, out: str) -> float:
    launcher, threads = SETUPS[setup]
    command = [*launcher, "generate.py", "--model", args.model, "--prompts_file", prompts, "--output_dir", out,
               "--num_inference_steps", str(args.steps), "--batch_size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/unet-demo")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    seconds = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory() as folder:
        prompts = prompts_file(folder, args.images)
        for round_ in range(args.rounds):
            for setup in SETUPS:
                seconds[setup].append(run(setup, args, prompts, os.path.join(folder, f"{round_}-{setup}")))
        one, two = (os.path.join(folder, f"0-{setup}") for setup in list(SETUPS)[:2])
        names = sorted(os.listdir(one))
        identical = filecmp.cmpfiles(one, two, names, shallow=False)[0] == names
    print(f"{args.images} images, {args.steps} steps, batches of {args.batch_size}, {args.model}; "
          f"medians of {args.rounds} rounds")
    print(f"{'setup':<28} {'seconds':>8} {'images/s':>9} {'vs 1 process':>13}")
    base = statistics.median(seconds[list(SETUPS)[0]])
    for setup, times in seconds.items():
        median = statistics.median(times)
        print(f"{setup:<28} {median:>8.1f} {args.images / median:>9.2f} {base / median:>12.2f}x")
    print(f"1- and 2-process PNGs byte-identical: {identical} ({len(names)} files)")


if __name__ == "__main__":
    main()
