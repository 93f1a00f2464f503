"""How long a trainer takes from a stop signal to its exit: the time a scheduler's grace period must
cover (SLURM's `--signal` lead time, Kubernetes' terminationGracePeriodSeconds).

    .venv/bin/python bench/grace.py [--signal SIGTERM] [--after_steps 20]

Trains the `make demo` VAE and UNet configs (the UNet on outputs/vae-demo, so run `make demo`
first), sends the signal once each has taken --after_steps steps, and prints the seconds to exit,
the exit code, the step it stopped after and the size of the checkpoint it wrote.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import Run, environment  # noqa: E402

DEMO_VAE = "outputs/vae-demo"


def commands(output_root: str) -> dict[str, list[str]]:
    longer = ["--max_train_steps", "100000", "--checkpointing_steps", "100000", "--validation_steps", "100000",
              "--report_to", "none"]
    return {
        "VAE (configs/vae/demo.yaml)": [sys.executable, "train_vae.py", "--config", "configs/vae/demo.yaml",
                                        "--output_dir", os.path.join(output_root, "vae"), *longer],
        "UNet (configs/unet/demo.yaml)": [sys.executable, "train_unet.py", "--config", "configs/unet/demo.yaml",
                                          "--pretrained_vae_model_name_or_path", DEMO_VAE,
                                          "--output_dir", os.path.join(output_root, "unet"), *longer],
    }


def folder_mib(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder)
               for name in names) / 2**20


def measure(command: list[str], output_dir: str, number: signal.Signals, after_steps: int) -> tuple:
    """(seconds from the signal to the exit, exit code, the step it stopped after, checkpoint MiB)."""
    env = {key: value for key, value in environment(0).items() if key != "OMP_NUM_THREADS"}
    run = Run(command, env)
    while run.process.poll() is None and max(run.steps, default=0) < after_steps:
        time.sleep(0.01)
    sent = time.perf_counter()
    run.process.send_signal(number)
    code = run.wait()
    seconds = time.perf_counter() - sent
    checkpoints = sorted((name for name in os.listdir(output_dir) if name.startswith("checkpoint-")),
                         key=lambda name: int(name.split("-")[1]))
    size = folder_mib(os.path.join(output_dir, checkpoints[-1])) if checkpoints else 0.0
    return seconds, code, run.last_step, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT", "SIGUSR1"])
    parser.add_argument("--after_steps", type=int, default=20)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(DEMO_VAE, "config.json")):
        sys.exit(f"{DEMO_VAE} is missing: run `make demo` first")
    rows = []
    root = tempfile.mkdtemp(prefix="grace-")
    try:
        for name, command in commands(root).items():
            output_dir = command[command.index("--output_dir") + 1]
            seconds, code, step, size = measure(command, output_dir, signal.Signals[args.signal], args.after_steps)
            rows.append(f"| {name} | {args.signal} | {seconds:.2f} | {code} | {step} | {size:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| trainer | signal | seconds from signal to exit | exit code | stopped after step | checkpoint (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
