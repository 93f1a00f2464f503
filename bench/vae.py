"""Benchmark train_vae.py: training throughput and held-out PSNR against wall-clock time.

    python bench/vae.py [--budget_minutes 10] [train_vae flags, e.g. --max_train_steps 2000]

Trains the demo config (configs/vae/demo.yaml) as it is, unless flags say otherwise, then
reads the run's TensorBoard log and prints, as markdown, PSNR and SSIM on the held-out split
against minutes since the start, the throughput, and the best PSNR reached within the budget.
Numbers depend on the machine and on whatever else runs on it: report both.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_vae  # noqa: E402
from ldm.config import parse_config  # noqa: E402
from ldm.training.vae_config import VAEConfig  # noqa: E402

DEFAULTS = ["--config", "configs/vae/demo.yaml", "--output_dir", "outputs/bench-vae", "--report_to", "tensorboard"]


def curve(output_dir: str, start: float) -> tuple[list[tuple[int, float, float, float]], list[float]]:
    """[(step, minutes, PSNR, SSIM)] of each validation, and the logged images/s of each step."""
    events = EventAccumulator(sorted(glob.glob(os.path.join(output_dir, "logs", "train_vae", "events.*")))[-1],
                              size_guidance={"scalars": 0})
    events.Reload()
    ssim = {e.step: e.value for e in events.Scalars("validation/ssim")}
    points = [(e.step, (e.wall_time - start) / 60, e.value, ssim[e.step]) for e in events.Scalars("validation/psnr")]
    return points, [e.value for e in events.Scalars("train/images_per_second")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_minutes", type=float, default=10.0)
    args, flags = parser.parse_known_args(argv)
    train_argv = DEFAULTS + flags  # later flags win
    output_dir = parse_config(VAEConfig, train_argv).output_dir

    start = time.time()
    result = train_vae.main(train_argv)
    points, rates = curve(output_dir, start)

    print(f"\n### train_vae.py demo: {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| step | minutes | held-out PSNR (dB) | SSIM |\n|---:|---:|---:|---:|")
    for step, minutes, psnr, ssim in points:
        print(f"| {step} | {minutes:.1f} | {psnr:.2f} | {ssim:.4f} |")
    within = [psnr for _, minutes, psnr, _ in points if minutes <= args.budget_minutes]
    print(f"\nthroughput: median {statistics.median(rates):.0f} images/s over {len(rates)} steps")
    print(f"best held-out PSNR within {args.budget_minutes:g} minutes: "
          f"{max(within):.2f} dB" if within else f"no validation finished within {args.budget_minutes:g} minutes")
    print(f"final: step {result['global_step']}, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, "
          f"scaling_factor {result['scaling_factor']:.4f}, {(time.time() - start) / 60:.1f} minutes in all")


if __name__ == "__main__":
    main()
