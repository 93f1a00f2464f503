"""Train the first stage: an AutoencoderKL that compresses images to latents.

    accelerate launch train_vae.py --config configs/vae/demo.yaml [--flag value ...]

The result in --output_dir loads with `AutoencoderKL.from_pretrained(output_dir)`; its config.json
carries the measured latent `scaling_factor`. See ldm/training/vae.py for the loop, ldm/training/vae_loss.py
for the loss.
"""

from __future__ import annotations

import logging

from ldm.config import parse_config, run_script
from ldm.training.vae import train
from ldm.training.vae_config import VAEConfig


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(parse_config(VAEConfig, argv))


if __name__ == "__main__":
    run_script(main)
