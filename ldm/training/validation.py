"""The validation grids both denoiser trainers save: one image per validation prompt, from a fixed seed."""

from __future__ import annotations

import os

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline


@torch.no_grad()
def sample_grid(pipeline: LatentDiffusionPipeline, config, device, steps: int | None = None) -> np.ndarray:
    """One image per validation prompt, side by side (HWC uint8), from a fixed seed, in `steps`
    (default: the config's validation_inference_steps)."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(config.seed)
    images = pipeline(config.validation_prompts, num_inference_steps=steps or config.validation_inference_steps,
                      guidance_scale=config.validation_guidance_scale, height=config.resolution,
                      width=config.resolution, generator=generator, output_type="np").images
    return (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)



def save_validation_grid(grid, output_dir: str, accelerator: Accelerator, step: int, tag: str) -> str:
    """A validation image grid (HWC uint8) as `output_dir/validation/step-<step>.png`, and in TensorBoard."""
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"validation/{tag}": grid[None]}, step=step, dataformats="NHWC")
    return path

