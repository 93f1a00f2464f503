"""Train the second stage: a text-conditioned UNet2DConditionModel on the latents of a frozen VAE.

    accelerate launch train_unet.py --config configs/unet/demo.yaml [--flag value ...]

--output_dir ends up a LatentDiffusionPipeline folder (model_index.json at its root) that
generate.py loads. See ldm/training/unet.py for the loop and ldm/diffusion/objective.py for the objective.
"""

from __future__ import annotations

import logging

from ldm.config import parse_config, run_script
from ldm.training.unet import train
from ldm.training.unet_config import UNetConfig


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(parse_config(UNetConfig, argv))


if __name__ == "__main__":
    run_script(main)
