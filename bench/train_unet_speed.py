"""Training throughput of train_unet.py with its latent and text caches, against the same model and
data trained the way diffusers' train_text_to_image.py does it (decode and transform the images,
run the VAE encoder and the text encoder on every batch), measured side by side in one run.

    .venv/bin/python bench/train_unet_speed.py [--steps 40] [--rounds 2] [--vae outputs/vae-demo] [train_unet flags]
    .venv/bin/python bench/train_unet_speed.py --vae random --random_vae_config configs/models/vae_sd_f8.json \
        --resolution 64 --max_train_samples 640 --train_text_encoder false --steps 25 --rounds 1

Any other flag goes to train_unet.py for both modes, e.g. `--train_text_encoder false` for a frozen
text encoder, whose embeddings are then cached too (diffusers' script keeps it frozen).

Also reports the UNet training step's achieved GFLOP/s against this machine's matmul GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_unet  # noqa: E402
from ldm.config import parse_config  # noqa: E402
from ldm.demo import matmul_gflops  # noqa: E402
from ldm.training.unet_config import UNetConfig  # noqa: E402


def unet_step_flops(config: UNetConfig, latent_shape: tuple, tokens: int, hidden: int) -> float:
    """FLOPs of one UNet forward and backward at the configured batch size."""
    with open(config.unet_config) as f:
        unet = UNet2DConditionModel.from_config(json.load(f))
    latents = torch.randn(config.train_batch_size, *latent_shape)
    text = torch.randn(config.train_batch_size, tokens, hidden)
    timesteps = torch.randint(0, 1000, (config.train_batch_size,))
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, text).sample.square().mean().backward()
    return counter.get_total_flops()


def random_vae(folder: str, architecture: str) -> str:
    """A VAE with random weights (throughput does not depend on them), saved where train_unet.py reads it."""
    with open(architecture) as f:
        AutoencoderKL.from_config({**json.load(f), "scaling_factor": 1.0}).save_pretrained(folder)
    return folder


def run(base: list[str], output_dir: str, cached: bool, steps: int) -> float:
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train_unet.main([*base, "--output_dir", output_dir, "--max_train_steps", str(steps),
                              "--cache_latents", str(cached).lower()])
    return result["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/unet/demo.yaml")
    parser.add_argument("--vae", default="outputs/vae-demo", help="a trained VAE; a random one when missing")
    parser.add_argument("--random_vae_config", default="configs/models/vae_demo.json",
                        help="the random VAE's architecture, e.g. configs/models/vae_sd_f8.json with --resolution 64 "
                             "for Stable Diffusion's VAE on the demo's 8x8 latents")
    parser.add_argument("--steps", type=int, default=40, help="steps per run; images/s is over the last 20")
    parser.add_argument("--rounds", type=int, default=2)
    args, train_flags = parser.parse_known_args()

    work = tempfile.mkdtemp(prefix="bench-unet-")
    vae = args.vae if os.path.isdir(args.vae) else random_vae(os.path.join(work, "vae"), args.random_vae_config)
    base = ["--config", args.config, "--pretrained_vae_model_name_or_path", vae, "--report_to", "none",
            "--checkpointing_steps", "100000", "--validation_steps", "100000", "--validation_prompts", "rocket",
            "--validation_inference_steps", "1", *train_flags]
    config = parse_config(UNetConfig, base)
    rates = {True: [], False: []}
    for round_number in range(args.rounds):
        for cached in (True, False):  # alternate, so drift in machine load hits both alike
            rates[cached].append(run(base, os.path.join(work, f"run-{round_number}-{cached}"), cached, args.steps))
    cached_rate, plain_rate = statistics.median(rates[True]), statistics.median(rates[False])

    vae_config = AutoencoderKL.load_config(vae)
    latent_side = config.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    with open(config.text_encoder_config) as f:
        hidden = json.load(f)["hidden_size"]
    flops = unet_step_flops(config, (vae_config["latent_channels"], latent_side, latent_side),
                            config.tokenizer_max_length, hidden)
    achieved = flops * cached_rate / config.train_batch_size / 1e9
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    text_side = "trained jointly" if config.train_text_encoder else "frozen"
    vae_size = sum(p.numel() for p in AutoencoderKL.from_pretrained(vae).encoder.parameters()) / 1e6
    print(f"\n{config.resolution} px, VAE encoder {vae_size:.1f}M parameters, batch {config.train_batch_size}, "
          f"text encoder {text_side}, "
          f"{args.steps} steps per run, "
          f"{args.rounds} round(s), {torch.get_num_threads()} threads\n")
    print("| mode | images/s (median) | runs |")
    print("|---|---|---|")
    cached = "latents" if config.train_text_encoder else "latents + text embeddings"
    print(f"| train_unet.py, cached {cached} | {cached_rate:.1f} | "
          f"{', '.join(f'{r:.1f}' for r in rates[True])} |")
    print(f"| diffusers-style: VAE + text encoder every batch | {plain_rate:.1f} | "
          f"{', '.join(f'{r:.1f}' for r in rates[False])} |")
    print(f"\nspeed-up: {cached_rate / plain_rate:.2f}x")
    print(f"UNet forward+backward: {flops / 1e9:.1f} GFLOP at batch {config.train_batch_size} -> "
          f"{achieved:.1f} GFLOP/s "
          f"achieved; matmul {fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16 "
          f"({100 * achieved / fp32:.0f}% of fp32 matmul; end to end, so optimizer, EMA and data are in the time)")


if __name__ == "__main__":
    main()
