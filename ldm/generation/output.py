"""The images of a run: one job per image (its global index, prompt and seed), drawing a batch of
them with the text chunk each PNG carries, and the contact sheet."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.data.chunks import partial_name
from ldm.diffusion.schedulers import scheduler_name
from ldm.generation.config import GenerateConfig
from ldm.generation.edit_inputs import EditInputs, input_picture, with_input_column
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline


@dataclass(frozen=True)
class ImageJob:
    """One image of the run: its place in the global order, its prompt and its seed."""
    index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:04d}-{_slug(self.prompt)}-seed{self.seed}.png"


def image_jobs(prompts: list[str], config: GenerateConfig) -> list[ImageJob]:
    """Every image, prompt-major; image i of the run uses seed + i."""
    per_prompt = config.num_images_per_prompt
    return [ImageJob(k * per_prompt + j, prompt, config.seed + k * per_prompt + j)
            for k, prompt in enumerate(prompts) for j in range(per_prompt)]


def in_batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """The pipeline calls, in order, `batch_size` images each. An inpainted image depends on its batch
    (see --batch_size), so whoever wants generate.py's images, the web UI included, batches alike."""
    return [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]


def draw(pipe: LatentDiffusionPipeline, batch: list[ImageJob], config: GenerateConfig,
         edit: EditInputs | None = None, on_step: Callable[[int], None] | None = None
         ) -> list[tuple[Image.Image, PngInfo]]:
    """One pipeline call: the batch's images, each with the text chunk its PNG carries. generate.py
    and the web UI (ldm/app.py) both draw through here, so the same settings give the same pixels.
    `on_step(i)` is called after each denoising step i (the web UI's progress bar)."""
    edit_args = {} if edit is None else dict(image=edit.image, mask_image=edit.mask, strength=config.strength,
                                             padding_mask_crop=config.padding_mask_crop)
    lora_args = {} if config.lora is None else dict(cross_attention_kwargs={"scale": config.lora_scale})
    step_args = {} if on_step is None else dict(callback_on_step_end=after_each_step(on_step))
    drawn = pipe([job.prompt for job in batch], negative_prompt=config.negative_prompt,
                 num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                 height=config.height, width=config.width, watermark=config.watermark, **edit_args, **lora_args,
                 **step_args,
                 # CPU generators, so a seed draws the same image on every device.
                 generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch]).images
    sampler = scheduler_name(pipe.scheduler)
    return [(image, png_metadata(config, prompt=job.prompt, seed=job.seed, scheduler=sampler, edit=edit))
            for job, image in zip(batch, drawn)]


def after_each_step(on_step: Callable[[int], None]) -> Callable:
    """`on_step(i)` as the pipeline's callback_on_step_end, leaving the latents as they are."""
    def callback(_pipe, i, _timestep, _tensors) -> dict:
        on_step(i)
        return {}
    return callback


def png_metadata(config: GenerateConfig, prompt: str, seed: int, scheduler: str,
                 edit: EditInputs | None = None) -> PngInfo:
    """Everything that made the image, in the PNG's text chunk (read back with `Image.open(path).text`);
    for an edit, the input files by name and sha256; with LoRA adapters, where they came from and their scale."""
    info = PngInfo()
    fields = dict(prompt=prompt, negative_prompt=config.negative_prompt or "", seed=seed, scheduler=scheduler,
                  num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                  height=config.height, width=config.width, model=config.model, fast=config.fast,
                  watermark=config.watermark)
    if edit is not None:
        fields.update(edit.metadata, strength=config.strength)
        if config.padding_mask_crop is not None:
            fields.update(padding_mask_crop=config.padding_mask_crop)
    if config.lora is not None:
        fields.update(lora=config.lora, lora_scale=config.lora_scale)
    if config.backend != "torch":
        fields.update(backend=config.backend)
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def write_grid(paths: list[str], images_per_prompt: int, edit: EditInputs | None, grid: str) -> None:
    """The contact sheet, from the PNGs on disk (the other processes drew theirs); for an edit, each
    row starts with the input (the mask tinted red), so the change shows beside it."""
    images = [Image.open(path).convert("RGB") for path in paths]
    if edit is not None:
        images, images_per_prompt = with_input_column(images, images_per_prompt, input_picture(edit, images[0].size))
    partial = partial_name(grid)
    contact_sheet(images, images_per_prompt).save(partial, format="PNG")
    os.replace(partial, grid)


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


