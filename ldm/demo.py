"""`make demo`: the whole chain on the built-in OpenMoji, each stage timed, then a summary table.

    python -m ldm.demo

Each stage is the command a user would type, run as its own process and printed first. The summary
gives each stage's minutes, the VAE's held-out PSNR, the UNet's steps and this machine's matmul speed
(a 2-second probe), so that a run's minutes can be compared across machines.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

VAE_DIR = "outputs/vae-demo"
UNET_DIR = "outputs/unet-demo"
SAMPLES_DIR = "samples/demo"


def stages(python: str) -> list[tuple[str, list[str]]]:
    return [
        ("OpenMoji", [python, "-m", "ldm.openmoji", "--resolution", "32"]),
        ("VAE", [python, "train_vae.py", "--config", "configs/vae/demo.yaml", "--output_dir", VAE_DIR]),
        ("UNet", [python, "train_unet.py", "--config", "configs/unet/demo.yaml",
                  "--pretrained_vae_model_name_or_path", VAE_DIR, "--output_dir", UNET_DIR]),
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


def run_timed(name: str, command: list[str]) -> float:
    """Run one stage, failing the demo with its exit status; returns its minutes."""
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return (time.perf_counter() - start) / 60


def summary(minutes: dict[str, float], fp32: float, bf16: float) -> str:
    vae = json.load(open(os.path.join(VAE_DIR, "metrics.json")))
    unet = json.load(open(os.path.join(UNET_DIR, "metrics.json")))
    rows = [(f"{name} (minutes)", f"{value:.1f}") for name, value in minutes.items()]
    rows += [("total (minutes)", f"{sum(minutes.values()):.1f}"),
             ("VAE held-out PSNR (dB)", f"{vae['psnr']:.2f}"),
             ("VAE steps", str(vae["global_step"])),
             ("UNet steps", str(unet["global_step"])),
             ("matmul fp32 (GFLOP/s)", f"{fp32:.0f}"),
             ("matmul bf16 (GFLOP/s)", f"{bf16:.0f}"),
             ("torch threads", str(torch.get_num_threads()))]
    return "| make demo | |\n|---|---:|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def main() -> None:
    # A fresh run: checkpoints left by an earlier one would outrank this run's own under
    # checkpoints_total_limit, and mix into bench/adherence.py's curve.
    for folder in (VAE_DIR, UNET_DIR, SAMPLES_DIR):
        shutil.rmtree(folder, ignore_errors=True)
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    minutes = {name: run_timed(name, command) for name, command in stages(sys.executable)}
    shutil.copy(os.path.join(SAMPLES_DIR, "grid.png"), "samples/demo.png")
    print(f"\nwrote samples/demo.png\n\n{summary(minutes, fp32, bf16)}")


if __name__ == "__main__":
    main()
