"""Distil a trained pipeline into a few-step student: latent consistency distillation.

    accelerate launch distill.py --config configs/distill/demo.yaml --teacher outputs/unet-demo \
        --output_dir outputs/lcm-demo

--output_dir ends up a pipeline folder (an LCMScheduler and a UNet with a guidance input) that
generate.py, LatentDiffusionPipeline and diffusers' own pipelines load. See ldm/training/distill.py.
"""

from __future__ import annotations

from ldm.config import parse_config, run_script
from ldm.training.distill import distill
from ldm.training.distill_config import DistillConfig


def main(argv: list[str] | None = None) -> dict:
    return distill(parse_config(DistillConfig, argv))


if __name__ == "__main__":
    run_script(main)
