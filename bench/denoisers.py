"""The demo's two denoisers side by side: parameters, training and sampling images/s, and peak RssAnon.

    .venv/bin/python bench/denoisers.py [--repeats 3]

Each model runs in its own process (so its peak RssAnon is its own), alternating, `--repeats` times:
a training step is forward + backward + AdamW on random 8x8x4 latents and 24-token text states at the demo's
batch 128 under bf16 autocast; sampling is a guided forward (batch 2 x 16) in fp32. Ratios are of the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import PeakRssAnon  # noqa: E402

MODELS = {"UNet (unet_demo.json)": "configs/models/unet_demo.json",
          "PixArt (pixart_demo.json)": "configs/models/pixart_demo.json"}


def measure(path: str) -> dict:
    import torch

    from ldm.models.denoiser import build_denoiser, denoise
    model = build_denoiser(path, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    latents, states = torch.randn(128, 4, 8, 8), torch.randn(128, 24, 128)
    timesteps = torch.randint(0, 1000, (128,))

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = denoise(model, latents, timesteps, states).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def sample_step():
        with torch.inference_mode():
            denoise(model, latents[:32], timesteps[:32], states[:32])

    def rate(step, images, count):
        step()
        started = time.perf_counter()
        for _ in range(count):
            step()
        return images * count / (time.perf_counter() - started)

    with PeakRssAnon() as peak:
        result = dict(parameters=sum(p.numel() for p in model.parameters()), train=rate(train_step, 128, 5),
                      sample=rate(sample_step, 16, 20))
    return dict(result, peak_rss_anon_mib=peak.mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    runs = {name: [] for name in MODELS}
    for _ in range(args.repeats):
        for name, path in MODELS.items():
            out = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True,
                                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| denoiser | parameters | training images/s (bf16, batch 128) | sampling images/s (CFG, batch 16) "
          "| peak RssAnon MiB |\n|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"| {name} | {median['parameters'] / 1e6:.2f}M | {median['train']:.0f} | {median['sample']:.0f} | "
              f"{median['peak_rss_anon_mib']:.0f} |")


if __name__ == "__main__":
    main()
