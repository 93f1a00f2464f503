"""LatentDiffusionPipeline: prompt → CLIP embeddings → classifier-free-guided denoising with any
diffusers scheduler → VAE decode; from noise (text-to-image), from a noised image (image-to-image,
SDEdit) or with a masked region repainted (inpainting; those steps are in ldm/pipelines/editing.py), with an
optional invisible watermark.

It saves and loads in the standard diffusers folder layout (`model_index.json` plus `vae/`,
`text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`), so diffusers' own
`StableDiffusionPipeline.from_pretrained(folder)` loads the same folder and, with the same
scheduler and seed, draws the same images. The same folder
loaded as `StableDiffusionImg2ImgPipeline` or `StableDiffusionInpaintPipeline` edits images as
`image=` / `mask_image=` do here, draw for draw. (StableDiffusionPipeline rewrites a scheduler config
with `steps_offset != 1` or `clip_sample: true` when it loads one, so save schedulers with SD's
`steps_offset=1, clip_sample=False` for the two to agree on DDIM-style timestep spacing.)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.data.captions import text_states, tokenize
from ldm.diffusion import schedulers
from ldm.diffusion.consistency import guidance_embedding
from ldm.diffusion.objective import denormalise_latents
from ldm.diffusion.schedulers import make_scheduler
from ldm.models.denoiser import denoise
from ldm.pipelines.call_checks import CallChecks, as_list
from ldm.pipelines.editing import ImageEditing, default_strength
from ldm.pipelines.fast_mode import FastMode, then_drop_fast_copy
from ldm.pipelines.guidance import rescale_guidance
from ldm.pipelines.watermark import apply_watermark

logger = logging.getLogger(__name__)

class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, ImageEditing, FastMode, CallChecks):
    """Text-to-image sampling with a latent diffusion model.

    Components, registered the diffusers way: `vae` (AutoencoderKL), `text_encoder`
    (CLIPTextModel), `tokenizer` (CLIPTokenizer), `unet` (UNet2DConditionModel) and
    `scheduler` (any diffusers scheduler; swap it with `set_scheduler("euler_a")`).

    `pipe(prompt)` draws from noise; `pipe(prompt, image=..., strength=...)` redraws an image from
    it noised part of the way (SDEdit, https://arxiv.org/abs/2108.01073); adding `mask_image=`
    repaints only the white part of the mask, the ordinary UNet's way: after every step, the
    latents outside the mask are replaced by the image's, noised to the step's level.

    LoRA adapters come from diffusers' loader mixin, as for `StableDiffusionPipeline`:
    `load_lora_weights(folder_or_hub_id)` (a train_unet.py --lora_rank output, ldm/models/lora.py, or any
    Stable Diffusion 1.x LoRA that fits the model), `set_adapters`, `fuse_lora`, `unfuse_lora`,
    `unload_lora_weights`; `pipe(..., cross_attention_kwargs={"scale": 0.5})` weighs them for a call.

    For large images call `pipe.vae.enable_tiling()` (decode in overlapping tiles) or
    `pipe.vae.enable_slicing()` (decode one image at a time). `enable_fast_mode()` runs the
    UNet in bfloat16; see there.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self._set_up_processors()

    def _set_up_processors(self) -> None:
        vae = self.vae
        # Each down block of the VAE encoder but the last halves the resolution.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Masks: one grey channel in [0, 1], binarised at 0.5 (white = repaint).
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        self.disable_fast_mode()

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model the loop runs: here the UNet (LatentTransformerPipeline's is its transformer)."""
        return self.unet

    @property
    def text_padding_eos(self) -> int | None:
        """None: the UNet reads every position of the text states, padding included, as Stable Diffusion's
        does. A masking denoiser's pipeline returns the tokenizer's end-of-text id (see `text_states`)."""
        return None

    # ---------------------------------------------------------------- options

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler by name ("ddim", "euler_a", "dpm++2m_karras", a diffusers class name, ...),
        keeping the noise schedule of the current scheduler's config."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    # ---------------------------------------------------------------- steps of __call__

    def encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP's last hidden state for each text, truncated to the tokenizer's context with a warning."""
        self._warn_if_truncated(texts)
        ids = tokenize(self.tokenizer, texts).to(device)
        return text_states(self.text_encoder, ids, self.text_padding_eos)

    def _warn_if_truncated(self, texts: list[str]) -> None:
        limit = self.tokenizer.model_max_length
        for text, ids in zip(texts, self.tokenizer(texts, verbose=False).input_ids):
            if len(ids) > limit:
                dropped = self.tokenizer.decode(ids[limit - 1:-1])
                logger.warning("prompt %r is %d tokens, longer than the text encoder's %d: dropped %r",
                               text, len(ids), limit, dropped)

    def encode_prompt(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      num_images_per_prompt: int, do_guidance: bool, device: torch.device,
                      lora_scale: float | None = None):
        """Conditional and (when guiding) unconditional embeddings, one row per image, with the text
        encoder's LoRA layers (if any are loaded) scaled by `lora_scale`.

        Rows are prompt-major: all images of the first prompt, then of the second, and so on.
        """
        with scaled_lora_layers(self.text_encoder, lora_scale):
            if prompt_embeds is None:
                prompt_embeds = self.encode_text(as_list(prompt), device)
            if not do_guidance:
                return self._per_image(prompt_embeds, num_images_per_prompt, device), None
            if negative_prompt_embeds is None:
                # The empty string is the "unconditional" input the model learnt with caption dropout.
                negatives = as_list(negative_prompt or "")
                if len(negatives) == 1:
                    negatives *= prompt_embeds.shape[0]
                negative_prompt_embeds = self.encode_text(negatives, device)
        return (self._per_image(prompt_embeds, num_images_per_prompt, device),
                self._per_image(negative_prompt_embeds, num_images_per_prompt, device))

    def _per_image(self, embeddings: torch.Tensor, num_images_per_prompt: int, device: torch.device) -> torch.Tensor:
        embeddings = embeddings.to(device, self.text_encoder.dtype)
        return embeddings.repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_latents(self, num_images: int, height: int, width: int, dtype: torch.dtype,
                        device: torch.device, generator, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise scaled to the scheduler's first sigma.

        With a list of generators, image i's noise comes from generator i alone, so each image
        can be redrawn by itself from its own seed whatever the batch around it.
        """
        shape = (num_images, self.denoiser.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device, dtype) * schedulers.init_noise_sigma(self.scheduler)

    def scheduler_step_kwargs(self, generator, eta: float) -> dict:
        """The optional arguments this scheduler's `step` takes: `eta` (DDIM's stochasticity,
        https://arxiv.org/abs/2010.02502) and `generator` (for ancestral and SDE samplers)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}

    def predict_noise(self, unet: torch.nn.Module, latents: torch.Tensor, t, embeddings: torch.Tensor,
                      guidance_scale: float, guidance_rescale: float,
                      timestep_cond: torch.Tensor | None = None,
                      cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """The UNet's guided prediction, in the latents' dtype.

        With classifier-free guidance (https://arxiv.org/abs/2207.12598) `embeddings` holds the
        unconditional rows, then the conditional ones, and both passes run as one batched UNet call.
        `embeddings` come in the UNet's dtype; reading it from there rather than from `unet.dtype`
        saves a walk over the UNet's modules at every step. A distilled UNet takes its guidance as
        `timestep_cond` instead, in one pass. `cross_attention_kwargs` go to the UNet as they are (its
        "scale" scales the UNet's LoRA layers for the call).
        """
        guided = embeddings.shape[0] == 2 * latents.shape[0]
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = schedulers.scale_model_input(self.scheduler, model_input, t)
        prediction = denoise(unet, model_input.to(embeddings.dtype), t, embeddings, timestep_cond=timestep_cond,
                             cross_attention_kwargs=cross_attention_kwargs).to(latents.dtype)
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        guided_prediction = unconditional + guidance_scale * (conditional - unconditional)
        if guidance_rescale > 0:
            guided_prediction = rescale_guidance(guided_prediction, conditional, guidance_rescale)
        return guided_prediction

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from denoised latents, undoing the latent normalisation the VAE's config
        declares: `latents_mean`/`latents_std` when set, else `scaling_factor` and `shift_factor`."""
        config = self.vae.config
        latents = denormalise_latents(latents, config)
        # fp16 VAE decoders overflow to NaN on some latents; `force_upcast` marks such VAEs.
        vae_dtype = self.vae.dtype
        upcast = vae_dtype == torch.float16 and config.get("force_upcast", False)
        if upcast:
            self._cast_vae(torch.float32)
        try:
            return self.vae.decode(latents.to(torch.float32 if upcast else vae_dtype), return_dict=False)[0]
        finally:
            if upcast:
                self._cast_vae(torch.float16)

    def _cast_vae(self, dtype: torch.dtype) -> None:
        # Outside inference mode, or the VAE's weights would become inference tensors that
        # autograd refuses, and the VAE could not be trained after sampling with it.
        with torch.inference_mode(False):
            self.vae.to(dtype)

    # ---------------------------------------------------------------- the recipe

    @torch.inference_mode()  # not no_grad: skips autograd's version counting, about 1% faster here
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        strength: float | None = None,
        padding_mask_crop: int | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        cross_attention_kwargs: dict | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        watermark: bool = False,
    ):
        """Generate images for `prompt`, from noise or (with `image`) by editing an image.

        image: one image (PIL, H×W×C array in [0, 1], or C×H×W tensor) to edit for every prompt.
        mask_image: with `image`, the region to repaint (white) and to keep (black), the same size.
        strength: how far into the noise an edit starts: int(num_inference_steps × strength) steps run,
            from the image noised to the first of them (at 1, all steps, from nearly pure noise; pure
            noise for inpainting); small values keep more of the image. Default 0.8 for
            image-to-image and 1.0 for inpainting, as in diffusers.
        padding_mask_crop: inpaint only a crop around the mask, widened by this many pixels (then to the
            aspect ratio of height × width), drawn at height × width and pasted back: everything outside
            the mask stays the original's pixels (but for the watermark, when asked for).
        guidance_scale: classifier-free guidance weight w; 1 or less skips the unconditional pass. A
            distilled UNet (one with `time_cond_proj_dim`) takes w as an input and runs once per step.
        guidance_rescale: φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
            (https://arxiv.org/abs/2305.08891, §3.4); counters over-exposure at high w.
        height, width: pixels, multiples of the VAE factor; default: the UNet's sample size × factor,
            or for image-to-image the image's size (rounded down to the factor).
        generator: one generator for the whole batch, or one per image (prompts × num_images_per_prompt).
        cross_attention_kwargs: passed to the UNet's attention processors, as in diffusers' pipelines; its
            "scale" weighs the loaded LoRA adapters of the UNet and the text encoder (0: the base model,
            1: as trained). See `load_lora_weights`.
        output_type: "pil" (list of images), "np" (N×H×W×3 floats in [0, 1]), "pt" (N×3×H×W), or
            "latent" (the denoised latents, undecoded).
        callback_on_step_end: called as f(pipe, step, timestep, tensors) after each step, where `tensors`
            holds the names in `callback_on_step_end_tensor_inputs`; a returned "latents" replaces them.
        watermark: mark the decoded images with diffusers' SDXL invisible watermark (ldm/pipelines/watermark.py);
            images narrower than 256 px cannot carry it and stay unmarked, with a warning.

        Returns an `ImagePipelineOutput` (`.images`), or a 1-tuple when `return_dict` is False.
        """
        # 1. Check inputs.
        inpainting = mask_image is not None
        if image is not None and strength is None:
            strength = default_strength(inpainting)
        self.check_edit_inputs(image, mask_image, strength, padding_mask_crop, num_inference_steps, latents,
                               output_type)
        if watermark and output_type == "latent":
            raise ValueError("watermark=True marks decoded images, and output_type 'latent' decodes none")
        height, width = self.default_size(image, inpainting, height, width)
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                          num_inference_steps, num_images_per_prompt, guidance_rescale, generator, output_type,
                          callback_on_step_end_tensor_inputs)

        # 2. Encode the prompt (and the negative prompt when guiding with a second pass).
        device = self._execution_device  # looked up once: it walks every module of every component
        guidance_input = self.denoiser.config.get("time_cond_proj_dim")  # a distilled UNet's: guidance in one pass
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            do_guidance=guidance_scale > 1.0 and guidance_input is None, device=device,
            lora_scale=(cross_attention_kwargs or {}).get("scale"))
        num_images = prompt_embeds.shape[0]

        # 3. Timesteps: all of them, or an edit's last `strength` of them.
        schedulers.set_timesteps(self.scheduler, num_inference_steps, device)
        timesteps = self.scheduler.timesteps if image is None else self.edit_timesteps(num_inference_steps, strength)

        # 4. Initial latents: noise, or the image noised to the first timestep; an inpainting mask.
        mask = None
        if image is None:
            latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        else:
            crops_coords = None if padding_mask_crop is None else self.mask_processor.get_crop_region(
                mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "default" if padding_mask_crop is None else "fill"
            pixels = self.image_processor.preprocess(image, height=height, width=width, crops_coords=crops_coords,
                                                     resize_mode=resize_mode)
            latents, image_latents, noise = self.prepare_edit_latents(
                pixels, num_images, timesteps, inpainting, strength, prompt_embeds.dtype, device, generator)
            if inpainting:
                mask = self.latent_mask(mask_image, height, width, crops_coords, resize_mode, prompt_embeds.dtype,
                                        device)
        step_kwargs = self.scheduler_step_kwargs(generator, eta)

        # 5. Denoising loop.
        unet = self.denoising_unet()
        embeddings = prompt_embeds if negative_prompt_embeds is None else torch.cat(
            [negative_prompt_embeds, prompt_embeds])
        embeddings = embeddings.to(unet.dtype)
        timestep_cond = None if guidance_input is None else guidance_embedding(
            torch.full((num_images,), guidance_scale), guidance_input).to(device, unet.dtype)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                noise_pred = self.predict_noise(unet, latents, t, embeddings, guidance_scale, guidance_rescale,
                                                timestep_cond, cross_attention_kwargs)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if mask is not None:
                    next_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
                    latents = self.keep_unmasked(latents, image_latents, noise, mask, next_timestep)
                if callback_on_step_end is not None:
                    tensors = dict(latents=latents, prompt_embeds=prompt_embeds,
                                   negative_prompt_embeds=negative_prompt_embeds)
                    requested = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    latents = (callback_on_step_end(self, i, t, requested) or {}).get("latents", latents)
                progress_bar.update()

        # 6. Decode and mark, as diffusers' SDXL pipelines mark: between decode and postprocessing. A
        # crop is pasted back into the original around the mask first, so the mark covers the image.
        if output_type == "latent":
            images = latents
        elif padding_mask_crop is None:
            decoded = self.decode_latents(latents)
            images = self.image_processor.postprocess(apply_watermark(decoded) if watermark else decoded,
                                                      output_type=output_type)
        else:
            images = [self.image_processor.apply_overlay(mask_image, image, drawn, crops_coords)
                      for drawn in self.image_processor.postprocess(self.decode_latents(latents))]
            if watermark:
                images = self.image_processor.postprocess(apply_watermark(self.pil_to_decoded(images)))
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


@contextlib.contextmanager
def scaled_lora_layers(model: torch.nn.Module, scale: float | None):
    """Inside, `model`'s LoRA layers are scaled by `scale` (None: left as they are), as diffusers'
    pipelines scale the text encoder's; a model without LoRA layers is left alone."""
    if scale is None:
        yield
        return
    scale_lora_layers(model, scale)
    try:
        yield
    finally:
        unscale_lora_layers(model, scale)


# diffusers' LoRA methods change the UNet in place; fast mode must copy it again after any of them.
for _name in ("load_lora_weights", "unload_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters",
              "delete_adapters", "enable_lora", "disable_lora"):
    setattr(LatentDiffusionPipeline, _name, then_drop_fast_copy(getattr(LatentDiffusionPipeline, _name)))
