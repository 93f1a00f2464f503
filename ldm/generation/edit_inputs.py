"""generate.py's image to edit: `--init_image` and `--mask_image` opened and checked (before the
model loads where the files alone tell, after it where the VAE factor or the step count does), and
shown beside the results in the contact sheet."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from PIL import Image, ImageOps

from ldm.data.dataset import open_rgb
from ldm.generation.config import GenerateConfig
from ldm.pipelines.editing import binary_mask, default_strength, edit_steps
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline


@dataclass
class EditInputs:
    """The image to edit and its optional mask, opened and checked, and what identifies each file."""
    image: Image.Image
    mask: Image.Image | None
    metadata: dict[str, str]


def read_edit_inputs(config: GenerateConfig) -> EditInputs | None:
    """--init_image and --mask_image opened (transparency composited on white), or None without them."""
    if config.init_image is None:
        return None
    image, metadata = open_input(config.init_image, "init_image", open_rgb)
    mask = None
    if config.mask_image is not None:
        mask, mask_metadata = open_input(config.mask_image, "mask_image", open_mask)
        metadata.update(mask_metadata)
        if binary_mask(mask).getbbox() is None:
            raise ValueError(f"--mask_image {config.mask_image} is black everywhere: nothing to repaint (white marks "
                             "what to repaint, black what to keep)")
        if mask.size != image.size:
            raise ValueError(f"--mask_image {config.mask_image} is {mask.width}×{mask.height} pixels but --init_image "
                             f"{config.init_image} is {image.width}×{image.height}; they must be the same size")
    return EditInputs(image, mask, metadata)


def open_mask(path: str) -> Image.Image:
    """A mask in grey levels. Transparency counts as black (keep), so a white stroke painted on a
    transparent layer marks just the stroke."""
    picture = ImageOps.exif_transpose(Image.open(path))
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        picture = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return picture.convert("L")


def open_input(path: str, flag: str, opener) -> tuple[Image.Image, dict[str, str]]:
    """An input image, opened by `opener`, and its file name and sha256, for the PNGs' text chunks."""
    if not os.path.isfile(path):
        raise ValueError(f"--{flag} {path} does not exist")
    try:
        image = opener(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--{flag} {path} is not a readable image: {error}") from None
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    return image, {flag: os.path.basename(path), f"{flag}_sha256": digest}


def check_edit(pipe: LatentDiffusionPipeline, edit: EditInputs, config: GenerateConfig) -> None:
    """The checks that need the model (its VAE factor) or the step count it settles."""
    factor = pipe.vae_scale_factor
    if min(edit.image.size) < factor:
        raise ValueError(f"--init_image {config.init_image} is {edit.image.width}×{edit.image.height} pixels, smaller "
                         f"than one latent pixel ({factor}×{factor})")
    strength = edit_strength(config)
    steps = edit_steps(config.num_inference_steps, strength)
    if steps < 1:
        raise ValueError(f"--strength {strength} of {config.num_inference_steps} steps leaves {steps} steps to run; "
                         f"raise --strength to at least {1 / config.num_inference_steps:.3g} or --num_inference_steps")


def edit_strength(config: GenerateConfig) -> float:
    """--strength, or the pipeline's default for the kind of edit."""
    return config.strength if config.strength is not None else default_strength(config.mask_image is not None)


def input_picture(edit: EditInputs, size: tuple[int, int]) -> Image.Image:
    picture = edit.image
    if edit.mask is not None:
        red = Image.new("RGB", picture.size, (255, 0, 0))
        picture = Image.composite(Image.blend(picture, red, 0.5), picture, edit.mask.point(lambda v: 255 * (v >= 128)))
    return picture.resize(size, Image.Resampling.LANCZOS)


def with_input_column(images: list[Image.Image], per_prompt: int, picture: Image.Image
                      ) -> tuple[list[Image.Image], int]:
    rows = [images[i:i + per_prompt] for i in range(0, len(images), per_prompt)]
    return [image for row in rows for image in (picture, *row)], per_prompt + 1
