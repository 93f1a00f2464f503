"""`make demo`: the whole chain on the built-in OpenMoji, each stage timed, then a summary table.

    python -m ldm.demo

Each stage is the command a user would type, run as its own process and printed first. The summary
gives each stage's minutes, the VAE's held-out PSNR, the UNet's steps, held-out loss and latent
bits/dim, and this machine's matmul speed (a 2-second probe), so that a run's minutes can be
compared across machines.

Ctrl-C (or SIGTERM) stops the demo after the running trainer has saved a checkpoint, and
`make demo` again continues: finished stages are not run again and the interrupted one resumes
from its checkpoint. `STATE` records the finished stages with a fingerprint of the commands and of
configs/; when either has changed, or with `--fresh`, the demo starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import torch

VAE_DIR = "outputs/vae-demo"
UNET_DIR = "outputs/unet-demo"
SAMPLES_DIR = "samples/demo"
STATE = "outputs/demo-state.json"
# A stage's exit status after a signal: a trainer's own, after saving a checkpoint (130, 143), or
# death by the signal itself (-2, -15) where nothing had been started that could be saved.
INTERRUPTED = {128 + number: 128 + number for number in (signal.SIGINT, signal.SIGTERM)} | {
    -number: 128 + number for number in (signal.SIGINT, signal.SIGTERM)}


def stages(python: str) -> list[tuple[str, list[str]]]:
    return [
        ("OpenMoji", [python, "-m", "ldm.openmoji", "--resolution", "32"]),
        ("VAE", [python, "train_vae.py", "--config", "configs/vae/demo.yaml", "--output_dir", VAE_DIR,
                 "--resume_from_checkpoint", "latest"]),
        ("UNet", [python, "train_unet.py", "--config", "configs/unet/demo.yaml",
                  "--pretrained_vae_model_name_or_path", VAE_DIR, "--output_dir", UNET_DIR,
                  "--resume_from_checkpoint", "latest"]),
        ("samples", [python, "generate.py", "--model", UNET_DIR, "--prompts_file", "configs/demo_prompts.txt",
                     "--num_inference_steps", "25", "--guidance_scale", "5", "--output_dir", SAMPLES_DIR]),
    ]


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0, size: int = 1024) -> float:
    """Achieved GFLOP/s of repeated size×size matmuls in `dtype` over about `seconds`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # the first call pays for allocation and kernel selection
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed / 1e9


class Interrupted(SystemExit):
    """A stage stopped on a signal, after saving what it had; the demo exits with its code."""


def run_timed(name: str, command: list[str]) -> float:
    """Run one stage, failing the demo with its exit status; returns its minutes.

    While it runs, Ctrl-C reaches the stage from the terminal (it is in the same process group) and
    the demo waits for it to save and exit; a SIGTERM sent to the demo alone is passed on to it."""
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    stage = subprocess.Popen(command)

    def pass_on(number, frame):
        if number == signal.SIGTERM:  # Ctrl-C has reached the stage from the terminal already
            stage.send_signal(number)

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = stage.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if code in INTERRUPTED:
        print(f"\n== {name} stopped on a signal: run `make demo` again to continue from its last checkpoint",
              flush=True)
        raise Interrupted(INTERRUPTED[code])
    if code:
        raise subprocess.CalledProcessError(code, command)
    return (time.perf_counter() - start) / 60


def fingerprint(commands: list[tuple[str, list[str]]], configs: str = "configs") -> str:
    """What a finished stage depends on: the demo's commands and every file under `configs`."""
    digest = hashlib.sha256(json.dumps(commands).encode())
    for root, folders, names in sorted(os.walk(configs)):
        folders.sort()
        for name in sorted(names):
            with open(os.path.join(root, name), "rb") as file:
                digest.update(name.encode() + file.read())
    return digest.hexdigest()


def read_state(key: str) -> dict[str, float]:
    """The minutes of the stages an earlier run of the same demo finished, by name."""
    try:
        with open(STATE) as file:
            state = json.load(file)
    except (OSError, ValueError):
        return {}
    return state["finished"] if state.get("fingerprint") == key else {}


def write_state(key: str, finished: dict[str, float]) -> None:
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    with open(STATE + ".tmp", "w") as file:
        json.dump({"fingerprint": key, "finished": finished}, file, indent=1)
    os.replace(STATE + ".tmp", STATE)


def summary(minutes: dict[str, float], fp32: float, bf16: float, earlier: frozenset[str] = frozenset()) -> str:
    """The table `make demo` ends with; `earlier` names the stages an interrupted run had finished."""
    vae = json.load(open(os.path.join(VAE_DIR, "metrics.json")))
    unet = json.load(open(os.path.join(UNET_DIR, "metrics.json")))
    rows = [(f"{name} (minutes{', an earlier run' if name in earlier else ''})", f"{value:.1f}")
            for name, value in minutes.items()]
    rows += [("total (minutes)", f"{sum(minutes.values()):.1f}"),
             ("VAE held-out PSNR (dB)", f"{vae['psnr']:.2f}"),
             ("VAE steps", str(vae["global_step"])),
             ("UNet steps", str(unet["global_step"])),
             *held_out_rows(unet),
             ("matmul fp32 (GFLOP/s)", f"{fp32:.0f}"),
             ("matmul bf16 (GFLOP/s)", f"{bf16:.0f}"),
             ("torch threads", str(torch.get_num_threads()))]
    return "| make demo | |\n|---|---:|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def held_out_rows(unet: dict) -> list[tuple[str, str]]:
    """The final model's held-out loss and latent bits/dim (docs/evaluation.md), when the run measured them."""
    if "validation_loss" not in unet:
        return []
    rows = [(f"UNet held-out loss (best {unet['best_validation_loss']:.4f} at step {unet['best_validation_step']})",
             f"{unet['validation_loss']:.4f}")]
    if "latent_bits_per_dim" in unet:  # a DDPM's bound: a flow model has none (docs/evaluation.md)
        bound = f"{unet['latent_bits_per_dim']:.3f} ± {unet['latent_bits_per_dim_se']:.3f}"
        rows.append(("UNet latent bits/dim", bound))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="make demo: the whole chain on the built-in OpenMoji.")
    parser.add_argument("--fresh", action="store_true", help="start over, even where an earlier run stopped")
    args = parser.parse_args(argv)
    commands = stages(sys.executable)
    key = fingerprint(commands)
    finished = {} if args.fresh else read_state(key)
    if len(finished) == len(commands):
        finished = {}  # that demo ran to the end: this is a new one
    if finished:
        print(f"continuing the demo that stopped after: {', '.join(finished)} (--fresh starts over)")
    else:
        # A fresh run: checkpoints left by another one would outrank this run's own under
        # checkpoints_total_limit, and mix into bench/adherence.py's curve.
        for folder in (VAE_DIR, UNET_DIR, SAMPLES_DIR):
            shutil.rmtree(folder, ignore_errors=True)
        write_state(key, {})
    earlier = frozenset(finished)
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    for name, command in commands:
        if name not in finished:
            finished[name] = run_timed(name, command)
            write_state(key, finished)
    shutil.copy(os.path.join(SAMPLES_DIR, "grid.png"), "samples/demo.png")
    print(f"\nwrote samples/demo.png\n\n{summary(finished, fp32, bf16, earlier)}")


if __name__ == "__main__":
    main()
