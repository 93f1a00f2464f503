"""Training choices of the demo UNet compared at equal wall time: adherence@5 for each noise schedule,
each timestep sampling, v-prediction with and without zero terminal SNR, bf16 autocast, and the
rectified-flow objective.

    .venv/bin/python bench/demo_choices.py --minutes 3.5 [--vae outputs/vae-demo] [--only bf16 ...]

Every variant changes one option of the same base: configs/unet/demo.yaml with the choices the demo
made before these were measured (fp32, scaled_linear, uniform, epsilon). The variant "demo.yaml" is the
config as it stands. Each variant trains for the steps that fit in --minutes at its precision's speed,
measured here first with a short run of each precision, so that its learning-rate schedule ends on time.
The flow variants change demo.yaml itself and keep its 1,200 steps: the objective costs nothing per step
(the same UNet, batch and precision), so equal steps are equal compute, whatever else runs on the machine.
The table gives each run's steps, its measured training minutes, adherence@5 at guidance 1 and 5
(bench/adherence.py), and the held-out loss where the objective is the demo's. Numbers depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adherence import Probe  # noqa: E402

BASE = ["--mixed_precision", "no", "--beta_schedule", "scaled_linear", "--timestep_sampling", "uniform",
        "--prediction_type", "epsilon", "--zero_terminal_snr", "false"]
VARIANTS = {
    "base (scaled_linear, uniform, epsilon, fp32)": [],
    "linear": ["--beta_schedule", "linear"],
    "squaredcos_cap_v2": ["--beta_schedule", "squaredcos_cap_v2"],
    "sigmoid": ["--beta_schedule", "sigmoid"],
    "logit_normal": ["--timestep_sampling", "logit_normal"],
    "importance": ["--timestep_sampling", "importance"],
    "v_prediction": ["--prediction_type", "v_prediction"],
    "v_prediction + zero terminal SNR": ["--prediction_type", "v_prediction", "--zero_terminal_snr", "true"],
    "bf16": ["--mixed_precision", "bf16"],
    "demo.yaml": None,  # the config unchanged
}
# demo.yaml with SD3's objective (rectified flow, its logit-normal timesteps), at demo.yaml's own steps
FLOW = ["--prediction_type", "flow_prediction"]
FLOW_VARIANTS = {
    "demo.yaml + flow, shift 1": FLOW,
    "demo.yaml + flow, shift 3": [*FLOW, "--flow_shift", "3"],
    "demo.yaml + flow, shift 1, no min-SNR (SD3's)": [*FLOW, "--snr_gamma", "0"],
}
PROBE_STEPS = 150


def train(vae: str, output_dir: str, flags: list[str]) -> tuple[dict, float]:
    """Run train_unet.py on the demo config; returns its metrics and its wall-clock minutes."""
    command = [sys.executable, "train_unet.py", "--config", "configs/unet/demo.yaml",
               "--pretrained_vae_model_name_or_path", vae, "--output_dir", output_dir,
               "--checkpointing_steps", "100000", "--report_to", "none", *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - start) / 60
    return json.load(open(os.path.join(output_dir, "metrics.json"))), minutes


def steps_per_minute(vae: str, root: str, precision: str) -> float:
    metrics, _ = train(vae, os.path.join(root, f"probe-{precision}"),
                       BASE + ["--mixed_precision", precision, "--max_train_steps", str(PROBE_STEPS),
                               "--validation_steps", "100000"])
    return metrics["images_per_second"] * 60 / 64  # configs/unet/demo.yaml's batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.5, help="training time of every variant")
    parser.add_argument("--vae", default="outputs/vae-demo")
    parser.add_argument("--root", default="outputs/demo-choices")
    parser.add_argument("--only", nargs="+", choices=[*VARIANTS, *FLOW_VARIANTS], help="run these variants only")
    args = parser.parse_args()

    chosen = args.only or [*VARIANTS, *FLOW_VARIANTS]
    if any(VARIANTS.get(name) for name in chosen):
        rates = {precision: steps_per_minute(args.vae, args.root, precision) for precision in ("no", "bf16")}
        print(f"steps per minute: fp32 {rates['no']:.0f}, bf16 {rates['bf16']:.0f}", flush=True)
    print("\n| variant | steps | minutes | adherence@5, guidance 1 | guidance 5 | held-out loss |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name in chosen:
        if name in FLOW_VARIANTS:
            flags = FLOW_VARIANTS[name]
        elif VARIANTS[name] is None:
            flags = []  # demo.yaml as it stands, with its own steps
        else:
            rate = rates["bf16" if "bf16" in VARIANTS[name] else "no"]
            flags = BASE + VARIANTS[name] + ["--max_train_steps", str(round(rate * args.minutes))]
        output_dir = os.path.join(args.root, name.split(" (")[0].replace(" ", "_").replace(",", ""))
        metrics, minutes = train(args.vae, output_dir, flags)
        probe = Probe(output_dir)
        # a flow model's held-out loss is a velocity MSE: not comparable with an epsilon model's
        loss = "" if name in FLOW_VARIANTS else f"{metrics.get('validation_loss', float('nan')):.4f}"
        print(f"| {name} | {metrics['global_step']} | {minutes:.1f} | {probe.score(1.0):.0%} | "
              f"{probe.score(5.0):.0%} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
