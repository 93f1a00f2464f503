"""generate.py's settings (GenerateConfig), and the checks that need no model: they fail in
milliseconds, not after loading one. The web UI (ldm/app.py) takes the same settings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Literal

import torch
from transformers import HfArgumentParser

from ldm.diffusion.schedulers import resolve_scheduler

DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What an ONNX export cannot do: these need the PyTorch models (an export is run as it was exported).
TORCH_ONLY_FLAGS = ("dtype", "fast", "vae_tiling", "lora", "lora_scale", "init_image", "mask_image", "strength",
                    "padding_mask_crop", "revision")


@dataclass
class GenerateConfig:
    model: str = field(metadata={"help": "A saved pipeline folder or a Hugging Face Hub model id."})
    prompt: list[str] = field(default_factory=list, metadata={
        "help": "Prompt(s) to draw; repeat the flag for several.", "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "A text file with one prompt per line."})
    negative_prompt: str | None = field(default=None, metadata={"help": "What the images should not show."})
    num_inference_steps: int | None = field(default=None, metadata={
        "help": f"Denoising steps. Default: {DEFAULT_STEPS}, or a distilled model's own count."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": f"Classifier-free guidance weight; 1 or less turns guidance off. Default: {DEFAULT_GUIDANCE}, "
                "or a distilled model's own."})
    scheduler: str | None = field(default=None, metadata={
        "help": "Sampler: ddpm, ddim, pndm, lms, euler, euler_a, heun, dpm++2m, dpm++2m_karras, unipc, lcm, tcd "
                "(for a distilled model), or a "
                "diffusers scheduler class name. Default: the one saved with the model."})
    seed: int = field(default=0, metadata={"help": "Image i of the run uses seed + i."})
    num_images_per_prompt: int = field(default=1, metadata={"help": "Images drawn for each prompt."})
    batch_size: int = field(default=8, metadata={
        "help": "Images per pipeline call, in the order of their index; also the unit shared out between "
                "processes under `accelerate launch`. An inpainted image depends on its batch (diffusers' "
                "inpainting samples the image's latents with the batch's first generator): redraw it with the "
                "same --batch_size."})
    init_image: str | None = field(default=None, metadata={
        "help": "An image file to edit (image-to-image), instead of drawing from noise."})
    strength: float | None = field(default=None, metadata={
        "help": "With --init_image: how much to redraw, in (0, 1]; int(steps × strength) steps run. "
                "Default 0.8, or 1.0 when inpainting."})
    mask_image: str | None = field(default=None, metadata={
        "help": "With --init_image: repaint only where this mask (same size) is white; keep where it is black."})
    padding_mask_crop: int | None = field(default=None, metadata={
        "help": "With --mask_image: inpaint only a crop around the mask, widened by this many pixels, at the "
                "model's resolution, and paste it back; every pixel outside the mask stays the original's "
                "(unless --watermark)."})
    height: int | None = field(default=None, metadata={
        "help": "Image height in pixels, a multiple of the VAE factor. Default: the model's native size, or for "
                "an edit the --init_image's (rounded down to the factor); with --padding_mask_crop, the size the "
                "crop is drawn at."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels; as --height."})
    output_dir: str = field(default="samples", metadata={"help": "Where the PNGs and grid.png go."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of --model."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), or a torch device."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={
        "help": "Precision of the whole pipeline."})
    fast: bool = field(default=False, metadata={
        "help": "Fast mode: run the UNet in bfloat16 (LatentDiffusionPipeline.enable_fast_mode)."})
    vae_tiling: bool = field(default=False, metadata={"help": "Decode in overlapping tiles, for large images."})
    watermark: bool = field(default=False, metadata={
        "help": "Mark the images with diffusers' SDXL invisible watermark (read it with `python -m ldm.watermark "
                "detect`). Images narrower than 256 px, or under 256×256 pixels, cannot carry it and are written "
                "unmarked."})
    lora: str | None = field(default=None, metadata={
        "help": "LoRA adapters to draw with: a train_unet.py --lora_rank output folder (or one of its checkpoints), a "
                "pytorch_lora_weights.safetensors file, or a Hub id (its main branch)."})
    lora_scale: float | None = field(default=None, metadata={
        "help": "With --lora: how strongly the adapters act; 0 draws what the model draws without them. Default: 1."})
    backend: Literal["torch", "onnx"] = field(default="torch", metadata={
        "help": "torch: the PyTorch pipeline. onnx: a `python -m ldm.export onnx` folder, run by ONNX Runtime on "
                f"the CPU (ldm/pipelines/onnx_pipeline.py); not with --{', --'.join(TORCH_ONLY_FLAGS)}."})


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    parser = HfArgumentParser(GenerateConfig, description="Draw images from a text-to-image latent diffusion "
                                                          "pipeline.")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def read_prompts(config: GenerateConfig) -> list[str]:
    prompts = list(config.prompt)
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("--prompt is empty: describe the image to draw")
    if config.prompts_file is not None:
        if not os.path.isfile(config.prompts_file):
            raise ValueError(f"--prompts_file {config.prompts_file} does not exist")
        with open(config.prompts_file, encoding="utf-8") as file:
            prompts += [line.strip() for line in file if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt \"...\" (repeatable) or --prompts_file with one prompt per line")
    return prompts


def check_config(config: GenerateConfig) -> None:
    """The checks that need no model: fail in milliseconds, not after loading one."""
    if config.num_inference_steps is not None and config.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {config.num_inference_steps}")
    for name in ("num_images_per_prompt", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(config, name)}")
    for name in ("height", "width"):
        size = getattr(config, name)
        if size is not None and size <= 0:
            raise ValueError(f"--{name} must be a positive number of pixels, got {size}")
    if config.scheduler is not None:
        resolve_scheduler(config.scheduler)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ValueError(f"--output_dir {config.output_dir} exists and is not a folder")
    if config.lora_scale is not None and config.lora is None:
        raise ValueError("--lora_scale weighs LoRA adapters: pass --lora too")
    if config.lora_scale is not None and not math.isfinite(config.lora_scale):
        raise ValueError(f"--lora_scale must be a finite number, got {config.lora_scale}")
    check_edit_flags(config)
    check_backend_flags(config)


def check_backend_flags(config: GenerateConfig) -> None:
    """--backend onnx takes the flags that make sense for an exported model on the CPU, and no others."""
    if config.backend != "onnx":
        return
    defaults = {option.name: option.default for option in dataclass_fields(GenerateConfig)}
    for name in TORCH_ONLY_FLAGS:
        if getattr(config, name) != defaults[name]:
            raise ValueError(f"--{name} does not apply to --backend onnx: it needs the PyTorch pipeline, and an ONNX "
                             f"export runs as exported (drop --{name}, or use --backend torch with the PyTorch model)")
    if config.device not in ("auto", "cpu"):
        raise ValueError(f"--device {config.device} does not apply to --backend onnx, which runs on ONNX Runtime's CPU "
                         "provider; use --device cpu or auto")


def check_edit_flags(config: GenerateConfig) -> None:
    if config.init_image is None:
        for name in ("strength", "mask_image", "padding_mask_crop"):
            if getattr(config, name) is not None:
                raise ValueError(f"--{name} edits an image: pass --init_image too")
        return
    if config.strength is not None and not 0.0 < config.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {config.strength}")
    if config.padding_mask_crop is not None:
        if config.mask_image is None:
            raise ValueError("--padding_mask_crop crops around the mask: pass --mask_image too")
        if config.padding_mask_crop < 0:
            raise ValueError(f"--padding_mask_crop must be a number of pixels >= 0, got {config.padding_mask_crop}")


