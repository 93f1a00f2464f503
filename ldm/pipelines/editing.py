"""Image-to-image (SDEdit, https://arxiv.org/abs/2108.01073) and inpainting: the steps that
LatentDiffusionPipeline's recipe runs when it is given an image (and a mask) to start from.

Each is drawn as diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline draw
it, random number for random number: the last `strength` of the timesteps, the image's VAE latents
noised to the first of them, and for an ordinary 4-channel UNet, after every step, the latents
outside the mask put back as the image's, noised to that step's level.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ldm.diffusion.objective import normalise_latents
from ldm.diffusion.schedulers import add_noise, init_noise_sigma


class ImageEditing:
    """The edit steps of LatentDiffusionPipeline's `__call__`; they use its `vae`, `unet`, `scheduler`,
    `image_processor`, `mask_processor` and `vae_scale_factor`."""

    def check_edit_inputs(self, image, mask_image, strength, padding_mask_crop, num_inference_steps, latents,
                          output_type) -> None:
        """The image-to-image and inpainting arguments, checked before any model runs."""
        if image is None:
            for name, value in (("mask_image", mask_image), ("strength", strength),
                                ("padding_mask_crop", padding_mask_crop)):
                if value is not None:
                    raise ValueError(f"`{name}` applies to an edit of an image: pass `image=` too")
            return
        if latents is not None:
            raise ValueError("pass `latents` (the starting noise of text-to-image) or `image` (an edit's start), "
                             "not both")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        counted = isinstance(num_inference_steps, int) and num_inference_steps >= 1
        steps = edit_steps(num_inference_steps, strength) if counted else 1
        if steps < 1:  # (a bad num_inference_steps is check_inputs' to report)
            raise ValueError(f"strength {strength} of {num_inference_steps} steps leaves {steps} steps to run; "
                             f"raise strength to at least 1/num_inference_steps = {1 / num_inference_steps:.3g}")
        width, height = image_size(image, "image", channels=3)
        if min(width, height) < self.vae_scale_factor:
            raise ValueError(f"`image` is {width}×{height} pixels, smaller than one latent pixel "
                             f"({self.vae_scale_factor}×{self.vae_scale_factor})")
        if mask_image is not None and image_size(mask_image, "mask_image", channels=1) != (width, height):
            mask_width, mask_height = image_size(mask_image, "mask_image", channels=1)
            raise ValueError(f"`mask_image` is {mask_width}×{mask_height} pixels but `image` is {width}×{height}; "
                             "they must be the same size")
        if padding_mask_crop is not None:
            if mask_image is None:
                raise ValueError("`padding_mask_crop` crops around the mask: pass `mask_image=` too")
            if not isinstance(image, PIL.Image.Image) or not isinstance(mask_image, PIL.Image.Image):
                raise ValueError("`padding_mask_crop` needs `image` and `mask_image` as PIL images")
            if output_type != "pil":
                raise ValueError(f"`padding_mask_crop` pastes onto the PIL image, so output_type must be 'pil', "
                                 f"got {output_type!r}")
            if binary_mask(mask_image).getbbox() is None:
                raise ValueError("`mask_image` is black everywhere, so there is no region to crop around; white "
                                 "marks what to repaint")
            if not isinstance(padding_mask_crop, int) or padding_mask_crop < 0:
                raise ValueError(f"padding_mask_crop must be a number of pixels >= 0, got {padding_mask_crop!r}")

    def edit_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `strength` of the schedule: an edit starts part of the way down from pure noise.

        diffusers' rounding: int(steps × strength) steps run. `set_begin_index` tells the schedulers
        that keep a step index (Euler, DPM-Solver, ...) where the run starts; their `add_noise` reads it.
        """
        start = (num_inference_steps - edit_steps(num_inference_steps, strength)) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    def encode_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Latents of images in [-1, 1]: a sample of the VAE's posterior, normalised as the UNet saw
        latents in training (the inverse of `decode_latents`). With a list of generators, row i is
        encoded alone and sampled with generator i."""
        pixels = pixels.to(self.vae.dtype)
        if isinstance(generator, list):
            samples = [self.vae.encode(row).latent_dist.sample(one)
                       for row, one in zip(pixels.split(1), generator, strict=True)]
            return normalise_latents(torch.cat(samples), self.vae.config)
        return normalise_latents(self.vae.encode(pixels).latent_dist.sample(generator), self.vae.config)

    def prepare_edit_latents(self, pixels: torch.Tensor, num_images: int, timesteps: torch.Tensor,
                             inpainting: bool, strength: float, dtype: torch.dtype, device: torch.device,
                             generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start latents, clean image latents, noise) of an edit, drawn as diffusers' img2img and
        inpaint pipelines draw them: the VAE sample of the image, then the noise, then (inpainting) a
        VAE sample of the masked image.

        The two pipelines differ with a list of generators: img2img samples the image's latents once
        per image, each with its own generator; inpaint samples them once, with the first generator.
        """
        pixels = pixels.to(device)
        if isinstance(generator, list) and not inpainting:
            image_latents = self.encode_image(pixels.repeat(num_images, 1, 1, 1), generator)
        else:
            image_latents = self.encode_image(pixels, generator[:1] if isinstance(generator, list) else generator)
        image_latents = image_latents.to(dtype).repeat(num_images // image_latents.shape[0], 1, 1, 1)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        if inpainting and strength == 1.0:
            latents = noise * init_noise_sigma(self.scheduler)  # from pure noise, as text-to-image starts
        else:
            latents = add_noise(self.scheduler, image_latents, noise, timesteps[:1].repeat(num_images))
        if inpainting:
            # diffusers' inpaint pipeline also samples the posterior of the masked image, which only a
            # 9-channel inpainting UNet reads. Draw as many numbers, so any later draw from the same
            # generator (an ancestral sampler's) matches.
            randn_tensor(image_latents[:1].shape, generator=generator[:1] if isinstance(generator, list) else generator,
                         device=device, dtype=self.vae.dtype)
        return latents, image_latents, noise

    def latent_mask(self, mask_image, height: int, width: int, crops_coords, resize_mode: str,
                    dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The mask at latent resolution, 1 where the image is repainted (nearest-neighbour, as diffusers)."""
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width, resize_mode=resize_mode,
                                              crops_coords=crops_coords)
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return F.interpolate(mask, size=size).to(device, dtype)

    def keep_unmasked(self, latents: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
                      mask: torch.Tensor, next_timestep: torch.Tensor | None) -> torch.Tensor:
        """Inpainting with an ordinary UNet: outside the mask, put back the image's latents noised to
        the level of the next step (clean after the last one), so only the masked region is redrawn
        while the model sees it in context."""
        known = image_latents if next_timestep is None else add_noise(
            self.scheduler, image_latents, noise, next_timestep.reshape(1))
        return (1 - mask) * known + mask * latents

    def pil_to_decoded(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """PIL images back to N×3×H×W in [-1, 1], the decoder's range, at their own size."""
        processor = self.image_processor
        return processor.normalize(processor.numpy_to_pt(processor.pil_to_numpy(images)))

    def default_size(self, image, inpainting: bool, height: int | None, width: int | None) -> tuple[int, int]:
        """Image-to-image keeps the image's size (rounded down to the VAE factor); text-to-image and,
        as in diffusers, inpainting default to the UNet's native size."""
        if image is not None and not inpainting:
            return self.image_processor.get_default_height_width(_as_batch(image), height, width)
        native = self.denoiser.config.sample_size * self.vae_scale_factor
        return native if height is None else height, native if width is None else width


def default_strength(inpainting: bool) -> float:
    """diffusers' defaults: its inpaint pipeline redraws the masked region from pure noise."""
    return 1.0 if inpainting else 0.8


def binary_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """A PIL mask binarised at 0.5, as the pipeline reads it: 255 = repaint."""
    return mask.convert("L").point(lambda value: 255 if value >= 128 else 0)


def edit_steps(num_inference_steps: int, strength: float) -> int:
    """How many steps an edit at `strength` runs, rounded as diffusers rounds."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def image_size(image, name: str, channels: int) -> tuple[int, int]:
    """(width, height) of one image: a PIL image, an H×W×C array in [0, 1] or a C×H×W tensor (each
    optionally with a leading batch of one), with `channels` channels (3: RGB; 1: a mask, which may
    also be a PIL image of any mode or an H×W array or tensor)."""
    if isinstance(image, PIL.Image.Image):
        if channels == 3 and image.mode != "RGB":
            raise ValueError(f"`{name}` is a {image.mode} image; pass an RGB one (image.convert('RGB'))")
        return image.size
    shape = tuple(getattr(image, "shape", ()))
    if isinstance(image, (torch.Tensor, np.ndarray)) and len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if isinstance(image, torch.Tensor) and (len(shape) == 3 or (channels == 1 and len(shape) == 2)):
        found, (height, width) = (shape[0] if len(shape) == 3 else 1), shape[-2:]
    elif isinstance(image, np.ndarray) and (len(shape) == 3 or (channels == 1 and len(shape) == 2)):
        found, (height, width) = (shape[2] if len(shape) == 3 else 1), shape[:2]
    else:
        raise ValueError(f"`{name}` must be one image: a PIL image, an H×W×C array or a C×H×W tensor, got "
                         f"{type(image).__name__} {shape or ''}".rstrip())
    if found != channels:
        raise ValueError(f"`{name}` has {found} channels; it must have {channels}")
    return width, height


def _as_batch(image):
    """A tensor or array image with its batch axis, as VaeImageProcessor reads sizes."""
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return image.unsqueeze(0)
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image[None]
    return image
