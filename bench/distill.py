"""Few-step sampling of a distilled demo model against its teacher, in one run with the same prompts
and seeds: adherence@5 at guidance 5 (bench/adherence.py's method) and wall time per image.

    .venv/bin/python bench/distill.py [--teacher outputs/unet-demo] [--lcm outputs/lcm-demo] \
        [--progressive outputs/progressive-demo]

Rows: the teacher with DPM-Solver++ at 25 steps (A) and at 4 (B); the LCM student at 1, 2, 4 and 8
steps; the progressive student at its own step count, and the teacher at that count. Then the
targets as ratios, and the minutes each distillation took (from its folder's run config to its saved
pipeline). Numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adherence import Probe  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm.config import RUN_CONFIG  # noqa: E402
from ldm.hub.files import read_distillation  # noqa: E402
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402

GUIDANCE = 5.0


def timed_score(probe: Probe, pipeline: LatentDiffusionPipeline, steps: int) -> tuple[float, float]:
    """(adherence@5, seconds per image) of `pipeline` at `steps` on the probe's prompts."""
    start = time.perf_counter()
    score = probe.score(GUIDANCE, pipeline, steps)
    return score, (time.perf_counter() - start) / len(probe.prompts)


def run_minutes(folder: str) -> float:
    started = os.path.getmtime(os.path.join(folder, RUN_CONFIG))
    return (os.path.getmtime(os.path.join(folder, "model_index.json")) - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="outputs/unet-demo")
    parser.add_argument("--lcm", default="outputs/lcm-demo")
    parser.add_argument("--progressive", default="outputs/progressive-demo")
    parser.add_argument("--count", type=int, default=100, help="prompts (training captions)")
    args = parser.parse_args()

    probe = Probe(args.teacher, args.count)
    student = LatentDiffusionPipeline.from_pretrained(args.lcm)
    student.set_progress_bar_config(disable=True)
    rows = {"teacher, DPM-Solver++ 25 steps (A)": timed_score(probe, probe.pipeline, 25),
            "teacher, DPM-Solver++ 4 steps (B)": timed_score(probe, probe.pipeline, 4)}
    for steps in (1, 2, 4, 8):
        rows[f"LCM student, {steps} step{'s' * (steps > 1)}"] = timed_score(probe, student, steps)
    progressive = LatentDiffusionPipeline.from_pretrained(args.progressive)
    progressive.set_progress_bar_config(disable=True)
    own = read_distillation(args.progressive)["num_inference_steps"]
    rows[f"progressive student, {own} steps (P)"] = timed_score(probe, progressive, own)
    rows[f"teacher, DPM-Solver++ {own} steps (T)"] = timed_score(probe, probe.pipeline, own)

    print(f"\nadherence@5 at guidance {GUIDANCE:g} over {args.count} training captions "
          f"({torch.get_num_threads()} torch threads)\n")
    print("| sampler | adherence@5 | seconds per image |\n|---|---:|---:|")
    for name, (score, seconds) in rows.items():
        print(f"| {name} | {score:.0%} | {seconds:.4f} |")
    a, b = rows["teacher, DPM-Solver++ 25 steps (A)"], rows["teacher, DPM-Solver++ 4 steps (B)"]
    four, two = rows["LCM student, 4 steps"], rows["LCM student, 2 steps"]
    print(f"\nLCM 4 steps / A: {four[0] / a[0]:.2f} (target 0.8); better than B: {four[0] > b[0]}; "
          f"{a[1] / four[1]:.1f}x faster per image than A (target 5x)")
    print(f"LCM 2 steps / A: {two[0] / a[0]:.2f} (target 0.6)")
    p, t = rows[f"progressive student, {own} steps (P)"], rows[f"teacher, DPM-Solver++ {own} steps (T)"]
    print(f"progressive student beats the teacher at {own} steps: {p[0] > t[0]} ({p[0]:.0%} against {t[0]:.0%})")
    print(f"LCM distillation took {run_minutes(args.lcm):.1f} min (target 10); progressive "
          f"{run_minutes(args.progressive):.1f} min")


if __name__ == "__main__":
    main()
