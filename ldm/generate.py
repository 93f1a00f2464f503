"""What `generate.py` does: prompts + a saved pipeline → one PNG per image and a contact sheet.

Every input is checked before the first image is drawn, and the PNGs are written to a
temporary folder and moved into `--output_dir` only once all of them exist, so a failed run
leaves nothing half-written.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from transformers import HfArgumentParser

from ldm.hub import HubError, find_model, is_hub_id, named_revision, read_distillation
from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import resolve_scheduler, scheduler_name

logger = logging.getLogger(__name__)

DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    height: int | None = field(default=None, metadata={
        "help": "Image height in pixels, a multiple of the VAE factor. Default: the model's native size."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels; as --height."})
    output_dir: str = field(default="samples", metadata={"help": "Where the PNGs and grid.png go."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of --model."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), or a torch device."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={
        "help": "Precision of the whole pipeline."})
    fast: bool = field(default=False, metadata={
        "help": "Fast mode: run the UNet in bfloat16 (LatentDiffusionPipeline.enable_fast_mode)."})
    vae_tiling: bool = field(default=False, metadata={"help": "Decode in overlapping tiles, for large images."})


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    parser = HfArgumentParser(GenerateConfig, description="Draw images from a text-to-image latent diffusion "
                                                          "pipeline.")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def read_prompts(config: GenerateConfig) -> list[str]:
    prompts = list(config.prompt)
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
    if config.num_images_per_prompt < 1:
        raise ValueError(f"--num_images_per_prompt must be at least 1, got {config.num_images_per_prompt}")
    for name in ("height", "width"):
        size = getattr(config, name)
        if size is not None and size <= 0:
            raise ValueError(f"--{name} must be a positive number of pixels, got {size}")
    if config.scheduler is not None:
        resolve_scheduler(config.scheduler)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ValueError(f"--output_dir {config.output_dir} exists and is not a folder")


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            message = f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1, mps, ..."
            raise ValueError(message) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(model: str, revision: str | None, dtype: torch.dtype) -> LatentDiffusionPipeline:
    """A pipeline from a local folder, or from the Hub when `model` is not a folder but reads as a repo id."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"{model} is not a pipeline folder: it has no model_index.json (a saved pipeline "
                             "holds model_index.json, vae/, text_encoder/, tokenizer/, unet/ and scheduler/)")
    elif not is_hub_id(model):
        raise ValueError(f"model folder {model} does not exist")
    else:
        check_hub_pipeline(model, revision)
    try:
        return LatentDiffusionPipeline.from_pretrained(model, revision=named_revision(revision), dtype=dtype)
    except (OSError, ValueError) as error:
        where = "the folder" if os.path.isdir(model) else "the Hugging Face Hub (it is not a local folder either)"
        raise ValueError(f"could not load a pipeline {model!r} from {where}: {error}") from error


def check_hub_pipeline(model: str, revision: str | None) -> None:
    """The repository's model_index.json, from the Hub or the cache, before any weights: a missing
    repository or revision, an offline machine and a repository that is no pipeline each get their reason."""
    try:
        found = find_model(model, revision)
    except HubError as error:
        raise ValueError(f"could not load a pipeline {model!r} from the Hugging Face Hub: {error}") from None
    if not found.is_pipeline:
        raise ValueError(f"{model} holds a single {found.class_name}, not a pipeline: generate.py needs a "
                         "text-to-image pipeline (model_index.json with vae/, text_encoder/, tokenizer/, unet/ and "
                         "scheduler/)")


def check_size(pipe: LatentDiffusionPipeline, height: int, width: int) -> None:
    for name, size in (("height", height), ("width", width)):
        if size % pipe.vae_scale_factor:
            raise ValueError(f"--{name} {size} is not divisible by the VAE factor {pipe.vae_scale_factor} "
                             f"(try {size // pipe.vae_scale_factor * pipe.vae_scale_factor or pipe.vae_scale_factor})")


def prepare(config: GenerateConfig) -> tuple[LatentDiffusionPipeline, list[str]]:
    """Check everything and load the pipeline, configured as `config` asks. Raises ValueError."""
    check_config(config)
    prompts = read_prompts(config)
    device = resolve_device(config.device)
    pipe = load_pipeline(config.model, config.revision, DTYPES[config.dtype])
    distilled = read_distillation(config.model, config.revision)
    config.num_inference_steps = config.num_inference_steps or distilled.get("num_inference_steps", DEFAULT_STEPS)
    if config.guidance_scale is None:
        config.guidance_scale = distilled.get("guidance_scale", DEFAULT_GUIDANCE)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    config.height, config.width = config.height or native, config.width or native
    check_size(pipe, config.height, config.width)
    if config.scheduler is not None:
        pipe.set_scheduler(config.scheduler)
    if config.fast:
        pipe.enable_fast_mode()
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe.to(device), prompts


def generate(pipe: LatentDiffusionPipeline, prompts: list[str], config: GenerateConfig) -> list[str]:
    """Draw every image, then move the PNGs and `grid.png` into `config.output_dir`; returns their paths."""
    staging = tempfile.mkdtemp(prefix="generate-")
    try:
        images, names = [], []
        sampler = scheduler_name(pipe.scheduler)
        for k, prompt in enumerate(prompts):
            seeds = [config.seed + k * config.num_images_per_prompt + j for j in range(config.num_images_per_prompt)]
            pipe.set_progress_bar_config(desc=f"prompt {k + 1}/{len(prompts)}")
            drawn = pipe(prompt, negative_prompt=config.negative_prompt,
                         num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                         height=config.height, width=config.width, num_images_per_prompt=len(seeds),
                         # CPU generators, so a seed draws the same image on every device.
                         generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images
            for seed, image in zip(seeds, drawn):
                name = f"{len(images):04d}-{_slug(prompt)}-seed{seed}.png"
                image.save(os.path.join(staging, name),
                           pnginfo=png_metadata(config, prompt=prompt, seed=seed, scheduler=sampler))
                images.append(image)
                names.append(name)
        contact_sheet(images, config.num_images_per_prompt).save(os.path.join(staging, "grid.png"))
        names.append("grid.png")
        os.makedirs(config.output_dir, exist_ok=True)
        for name in names:
            shutil.move(os.path.join(staging, name), os.path.join(config.output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(config.output_dir, name) for name in names]


def png_metadata(config: GenerateConfig, prompt: str, seed: int, scheduler: str) -> PngInfo:
    """Everything that made the image, in the PNG's text chunk (read back with `Image.open(path).text`)."""
    info = PngInfo()
    for key, value in dict(prompt=prompt, negative_prompt=config.negative_prompt or "", seed=seed,
                           scheduler=scheduler, num_inference_steps=config.num_inference_steps,
                           guidance_scale=config.guidance_scale, height=config.height, width=config.width,
                           model=config.model, fast=config.fast).items():
        info.add_text(key, str(value))
    return info


def contact_sheet(images: list[Image.Image], columns: int) -> Image.Image:
    """All images on one sheet: a row per prompt, or a near-square grid with one image per prompt."""
    if columns == 1:
        columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def _log_to_stderr() -> None:
    """Show this package's messages (such as the prompt-truncation warning), not every library's."""
    package_logger = logging.getLogger("ldm")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    config = parse_args(argv)
    try:
        pipe, prompts = prepare(config)
    except ValueError as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    paths = generate(pipe, prompts, config)
    logger.info("wrote %d images and %s", len(paths) - 1, paths[-1])
    return 0
