"""Training choices of the demo UNet compared at equal wall time: adherence@5 for each noise schedule,
each timestep sampling, v-prediction with and without zero terminal SNR, bf16 autocast, the
rectified-flow objective, and a PixArt-style transformer in place of the UNet.

    .venv/bin/python bench/demo_choices.py --minutes 3.5 [--vae outputs/vae-demo] [--only bf16 ...]

Every variant changes one option of the same base: configs/unet/demo.yaml with the choices the demo
made before these were measured (fp32, scaled_linear, uniform, epsilon, min-SNR 5). The variant "demo.yaml"
is the config as it stands. Each variant trains for the steps that fit in --minutes at its precision's speed,
measured here first with a short run of each precision, so that its learning-rate schedule ends on time.
The flow variants change demo.yaml itself and keep its 1,200 steps: the objective costs nothing per step
(the same UNet, batch and precision), so equal steps are equal compute, whatever else runs on the machine.
The transformer variants (configs/transformer/demo.yaml, its architecture varied in model files written into
--root) train for demo.yaml's 1,200 steps times their images/s over the demo UNet's, both measured here first
with a short run of each, side by side: the same wall time as demo.yaml.
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

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adherence import Probe  # noqa: E402

BASE = ["--mixed_precision", "no", "--beta_schedule", "scaled_linear", "--timestep_sampling", "uniform",
        "--prediction_type", "epsilon", "--zero_terminal_snr", "false", "--snr_gamma", "5"]
EPSILON = ["--prediction_type", "epsilon", "--snr_gamma", "5"]  # demo.yaml's objective until flow was measured
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
FLOW = ["--prediction_type", "flow_prediction", "--snr_gamma", "5"]
FLOW_NO_MIN_SNR = ["--prediction_type", "flow_prediction", "--snr_gamma", "0"]  # the demo's objective now
FLOW_VARIANTS = {
    "demo.yaml + epsilon, min-SNR 5 (the demo before flow)": EPSILON,
    "demo.yaml + flow, shift 1": FLOW,
    "demo.yaml + flow, shift 3": [*FLOW, "--flow_shift", "3"],
    "demo.yaml + flow, shift 1, no min-SNR (SD3's)": FLOW_NO_MIN_SNR,
}
LEARNING_RATES = {"lr 4e-4": ["--learning_rate", "4e-4"], "lr 1.2e-3": ["--learning_rate", "1.2e-3"]}
FLOW_VARIANTS.update({f"demo.yaml + flow, no min-SNR, {name}": [*FLOW_NO_MIN_SNR, *flags]
                      for name, flags in LEARNING_RATES.items()})

UNET_CONFIG, TRANSFORMER_CONFIG = "configs/unet/demo.yaml", "configs/transformer/demo.yaml"
PIXART = "configs/models/pixart_demo.json"  # 8 blocks of width 192 (6 heads of 32), 2x2 patches
ARCHITECTURES = {  # changes to configs/models/pixart_demo.json; deep and wide have the same parameter count
    "8x192, patch 2": {},
    "8x192, patch 1": {"patch_size": 1},
    "16x128 (deep)": {"num_layers": 16, "num_attention_heads": 4, "cross_attention_dim": 128},
    "4x256 (wide)": {"num_layers": 4, "num_attention_heads": 8, "cross_attention_dim": 256},
}
TRANSFORMER_VARIANTS = {  # name: (architecture, flags on configs/transformer/demo.yaml)
    "PixArt + epsilon (the demo's objective before flow)": ("8x192, patch 2", EPSILON),
    "PixArt + flow, no min-SNR": ("8x192, patch 2", FLOW_NO_MIN_SNR),
    "PixArt + flow, no min-SNR, lr 3e-4": ("8x192, patch 2", [*FLOW_NO_MIN_SNR, "--learning_rate", "3e-4"]),
    "PixArt + flow, no min-SNR, lr 1.5e-3": ("8x192, patch 2", [*FLOW_NO_MIN_SNR, "--learning_rate", "1.5e-3"]),
    "PixArt + flow, patch 1": ("8x192, patch 1", FLOW_NO_MIN_SNR),
    "PixArt + flow, 16x128 (deep)": ("16x128 (deep)", FLOW_NO_MIN_SNR),
    "PixArt + flow, 4x256 (wide)": ("4x256 (wide)", FLOW_NO_MIN_SNR),
}
PROBE_STEPS = 150
TRANSFORMER_PROBE_STEPS = 40  # a PixArt step takes about 3x a UNet step: 40 of them measure its rate well enough


def architecture_file(root: str, name: str) -> str:
    """configs/models/pixart_demo.json with ARCHITECTURES[name]'s changes, written into `root`."""
    path = os.path.join(root, "pixart-" + "".join(c for c in name if c.isalnum()) + ".json")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as file:
        json.dump({**json.load(open(PIXART)), **ARCHITECTURES[name]}, file, indent=2)
    return path


def folder_name(variant: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in variant.split(" (")[0])


def batch_size(config: str) -> int:
    return yaml.safe_load(open(config))["train_batch_size"]


def train(vae: str, output_dir: str, flags: list[str], config: str = UNET_CONFIG) -> tuple[dict, float]:
    """Run train_unet.py on a demo config; returns its metrics and its wall-clock minutes."""
    command = [sys.executable, "train_unet.py", "--config", config,
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
    return metrics["images_per_second"] * 60 / batch_size(UNET_CONFIG)


def images_per_second(vae: str, root: str, name: str, flags: list[str], config: str) -> float:
    """A short run of `config` as it stands (its precision and batch) with `flags`: its training images/s."""
    metrics, _ = train(vae, os.path.join(root, "probe-" + folder_name(name)),
                       [*flags, "--max_train_steps", str(TRANSFORMER_PROBE_STEPS), "--validation_steps", "100000"],
                       config)
    return metrics["images_per_second"]


def transformer_steps(vae: str, root: str, architectures: set[str]) -> dict[str, int]:
    """Each architecture's steps in demo.yaml's wall time: its 1,200 steps times the speed ratio."""
    unet = images_per_second(vae, root, "demo.yaml", [], UNET_CONFIG)
    steps = {}
    for name in architectures:
        rate = images_per_second(vae, root, name, ["--denoiser_config", architecture_file(root, name)],
                                 TRANSFORMER_CONFIG)
        steps[name] = round(yaml.safe_load(open(UNET_CONFIG))["max_train_steps"] * rate / unet)
        print(f"images/s: demo UNet {unet:.0f}, PixArt {name} {rate:.0f}: {steps[name]} steps", flush=True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.5, help="training time of every variant")
    parser.add_argument("--vae", default="outputs/vae-demo")
    parser.add_argument("--root", default="outputs/demo-choices")
    parser.add_argument("--only", nargs="+", choices=[*VARIANTS, *FLOW_VARIANTS, *TRANSFORMER_VARIANTS],
                        help="run these variants only")
    parser.add_argument("--transformer_learning_rate", type=float, help="the learning rate of the transformer "
                        "variants that do not set their own (default: configs/transformer/demo.yaml's)")
    args = parser.parse_args()

    chosen = args.only or [*VARIANTS, *FLOW_VARIANTS, *TRANSFORMER_VARIANTS]
    if any(VARIANTS.get(name) for name in chosen):
        rates = {precision: steps_per_minute(args.vae, args.root, precision) for precision in ("no", "bf16")}
        print(f"steps per minute: fp32 {rates['no']:.0f}, bf16 {rates['bf16']:.0f}", flush=True)
    architectures = {TRANSFORMER_VARIANTS[name][0] for name in chosen if name in TRANSFORMER_VARIANTS}
    transformer_step_counts = transformer_steps(args.vae, args.root, architectures) if architectures else {}
    print("\n| variant | steps | minutes | adherence@5, guidance 1 | guidance 5 | held-out loss |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name in chosen:
        config = UNET_CONFIG
        if name in TRANSFORMER_VARIANTS:
            architecture, flags = TRANSFORMER_VARIANTS[name]
            if args.transformer_learning_rate and "--learning_rate" not in flags:
                flags = [*flags, "--learning_rate", str(args.transformer_learning_rate)]
            config = TRANSFORMER_CONFIG
            flags = [*flags, "--denoiser_config", architecture_file(args.root, architecture),
                     "--max_train_steps", str(transformer_step_counts[architecture])]
        elif name in FLOW_VARIANTS:
            flags = FLOW_VARIANTS[name]
        elif VARIANTS[name] is None:
            flags = []  # demo.yaml as it stands, with its own steps
        else:
            rate = rates["bf16" if "bf16" in VARIANTS[name] else "no"]
            flags = BASE + VARIANTS[name] + ["--max_train_steps", str(round(rate * args.minutes))]
        output_dir = os.path.join(args.root, folder_name(name))
        metrics, minutes = train(args.vae, output_dir, flags, config)
        probe = Probe(output_dir)
        # a flow model's held-out loss is a velocity MSE: comparable only with another flow model's
        loss = f"{metrics.get('validation_loss', float('nan')):.4f}"
        print(f"| {name} | {metrics['global_step']} | {minutes:.1f} | {probe.score(1.0):.0%} | "
              f"{probe.score(5.0):.0%} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
