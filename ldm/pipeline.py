"""LatentDiffusionPipeline: prompt → CLIP embeddings → classifier-free-guided denoising with any
diffusers scheduler → VAE decode.

It saves and loads in the standard diffusers folder layout (`model_index.json` plus `vae/`,
`text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`), so diffusers' own
`StableDiffusionPipeline.from_pretrained(folder)` loads the same folder and, with the same
scheduler and seed, draws the same images. (StableDiffusionPipeline rewrites a scheduler config
with `steps_offset != 1` or `clip_sample: true` when it loads one, so save schedulers with SD's
`steps_offset=1, clip_sample=False` for the two to agree on DDIM-style timestep spacing.)
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.consistency import guidance_embedding
from ldm.schedulers import make_scheduler
from ldm.text import tokenize

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LatentDiffusionPipeline(DiffusionPipeline):
    """Text-to-image sampling with a latent diffusion model.

    Components, registered the diffusers way: `vae` (AutoencoderKL), `text_encoder`
    (CLIPTextModel), `tokenizer` (CLIPTokenizer), `unet` (UNet2DConditionModel) and
    `scheduler` (any diffusers scheduler; swap it with `set_scheduler("euler_a")`).

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
        # Each down block of the VAE encoder but the last halves the resolution.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.disable_fast_mode()

    # ---------------------------------------------------------------- options

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler by name ("ddim", "euler_a", "dpm++2m_karras", a diffusers class name, ...),
        keeping the noise schedule of the current scheduler's config."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    def enable_fast_mode(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Run the UNet, which is nearly all of the sampling time, in `dtype` (bfloat16 by default).

        The loop uses a `dtype` copy of the UNet, made at the next call on the UNet's device, so
        `self.unet` and what `save_pretrained` writes stay full precision (call this again after
        changing the UNet's weights). Latents, guidance and scheduler arithmetic stay float32, so
        the sampler does not accumulate rounding error. bf16 matmuls and convolutions are 1.3-3x
        faster than float32 on CPUs with AVX512-BF16 or AMX and on recent GPUs; images move by
        about 1e-2 in [0, 1] pixel values.
        """
        self._fast_dtype, self._fast_unet = dtype, None

    def disable_fast_mode(self) -> None:
        self._fast_dtype, self._fast_unet = None, None

    def denoising_unet(self) -> UNet2DConditionModel:
        """The UNet the loop runs: `self.unet`, or its low-precision copy in fast mode."""
        if self._fast_dtype is None:
            return self.unet
        if self._fast_unet is None or self._fast_unet.device != self.unet.device:
            self._fast_unet = copy.deepcopy(self.unet).to(self._fast_dtype)
        return self._fast_unet

    # ---------------------------------------------------------------- steps of __call__

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                     num_inference_steps, num_images_per_prompt, guidance_rescale, generator, output_type,
                     callback_tensor_inputs) -> None:
        """Fail before any model runs, naming the bad value and what would be valid."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None and not _is_text_or_texts(prompt):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
        batch_size = len(_as_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        if negative_prompt is not None:
            if not _is_text_or_texts(negative_prompt) or (
                    isinstance(negative_prompt, list) and len(negative_prompt) != batch_size):
                raise ValueError(f"`negative_prompt` must be a string or a list of {batch_size} strings (one per "
                                 f"prompt), got {negative_prompt!r}")
        if prompt_embeds is not None and negative_prompt_embeds is not None and (
                prompt_embeds.shape != negative_prompt_embeds.shape):
            raise ValueError(f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)}, "
                             f"but `prompt_embeds` has {tuple(prompt_embeds.shape)}; they must match")
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % self.vae_scale_factor:
                raise ValueError(f"{name} {size} is not a positive multiple of the VAE factor "
                                 f"{self.vae_scale_factor}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if isinstance(generator, list) and len(generator) != batch_size * num_images_per_prompt:
            raise ValueError(f"got {len(generator)} generators for {batch_size * num_images_per_prompt} images "
                             "(prompts × num_images_per_prompt); pass one generator, or one per image")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        unknown = sorted(set(callback_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among "
                             f"{self._callback_tensor_inputs}")

    def encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP's last hidden state for each text, truncated to the tokenizer's context with a warning."""
        self._warn_if_truncated(texts)
        ids = tokenize(self.tokenizer, texts).to(device)
        return self.text_encoder(ids, return_dict=False)[0]

    def _warn_if_truncated(self, texts: list[str]) -> None:
        limit = self.tokenizer.model_max_length
        for text, ids in zip(texts, self.tokenizer(texts, verbose=False).input_ids):
            if len(ids) > limit:
                dropped = self.tokenizer.decode(ids[limit - 1:-1])
                logger.warning("prompt %r is %d tokens, longer than the text encoder's %d: dropped %r",
                               text, len(ids), limit, dropped)

    def encode_prompt(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      num_images_per_prompt: int, do_guidance: bool, device: torch.device):
        """Conditional and (when guiding) unconditional embeddings, one row per image.

        Rows are prompt-major: all images of the first prompt, then of the second, and so on.
        """
        if prompt_embeds is None:
            prompt_embeds = self.encode_text(_as_list(prompt), device)
        if not do_guidance:
            return self._per_image(prompt_embeds, num_images_per_prompt, device), None
        if negative_prompt_embeds is None:
            # The empty string is the "unconditional" input the model learnt with caption dropout.
            negatives = _as_list(negative_prompt or "")
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
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device, dtype) * self.scheduler.init_noise_sigma

    def scheduler_step_kwargs(self, generator, eta: float) -> dict:
        """The optional arguments this scheduler's `step` takes: `eta` (DDIM's stochasticity,
        https://arxiv.org/abs/2010.02502) and `generator` (for ancestral and SDE samplers)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}

    def predict_noise(self, unet: UNet2DConditionModel, latents: torch.Tensor, t, embeddings: torch.Tensor,
                      guidance_scale: float, guidance_rescale: float,
                      timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's guided prediction, in the latents' dtype.

        With classifier-free guidance (https://arxiv.org/abs/2207.12598) `embeddings` holds the
        unconditional rows, then the conditional ones, and both passes run as one batched UNet call.
        `embeddings` come in the UNet's dtype; reading it from there rather than from `unet.dtype`
        saves a walk over the UNet's modules at every step. A distilled UNet takes its guidance as
        `timestep_cond` instead, in one pass.
        """
        guided = embeddings.shape[0] == 2 * latents.shape[0]
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        prediction = unet(model_input.to(embeddings.dtype), t, encoder_hidden_states=embeddings,
                          timestep_cond=timestep_cond, return_dict=False)[0].to(latents.dtype)
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
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate images for `prompt`.

        guidance_scale: classifier-free guidance weight w; 1 or less skips the unconditional pass. A
            distilled UNet (one with `time_cond_proj_dim`) takes w as an input and runs once per step.
        guidance_rescale: φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
            (https://arxiv.org/abs/2305.08891, §3.4); counters over-exposure at high w.
        height, width: pixels, multiples of the VAE factor; default: the UNet's sample size × factor.
        generator: one generator for the whole batch, or one per image (prompts × num_images_per_prompt).
        output_type: "pil" (list of images), "np" (N×H×W×3 floats in [0, 1]), "pt" (N×3×H×W), or
            "latent" (the denoised latents, undecoded).
        callback_on_step_end: called as f(pipe, step, timestep, tensors) after each step, where `tensors`
            holds the names in `callback_on_step_end_tensor_inputs`; a returned "latents" replaces them.

        Returns an `ImagePipelineOutput` (`.images`), or a 1-tuple when `return_dict` is False.
        """
        # 1. Check inputs.
        native_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = native_size if height is None else height, native_size if width is None else width
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                          num_inference_steps, num_images_per_prompt, guidance_rescale, generator, output_type,
                          callback_on_step_end_tensor_inputs)

        # 2. Encode the prompt (and the negative prompt when guiding with a second pass).
        device = self._execution_device  # looked up once: it walks every module of every component
        guidance_input = self.unet.config.time_cond_proj_dim  # a distilled UNet's: guidance without a second pass
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            do_guidance=guidance_scale > 1.0 and guidance_input is None, device=device)

        # 3. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 4. Initial latents.
        latents = self.prepare_latents(prompt_embeds.shape[0], height, width, prompt_embeds.dtype, device,
                                       generator, latents)
        step_kwargs = self.scheduler_step_kwargs(generator, eta)

        # 5. Denoising loop.
        unet = self.denoising_unet()
        embeddings = prompt_embeds if negative_prompt_embeds is None else torch.cat(
            [negative_prompt_embeds, prompt_embeds])
        embeddings = embeddings.to(unet.dtype)
        timestep_cond = None if guidance_input is None else guidance_embedding(
            torch.full((latents.shape[0],), guidance_scale), guidance_input).to(device, unet.dtype)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                noise_pred = self.predict_noise(unet, latents, t, embeddings, guidance_scale, guidance_rescale,
                                                timestep_cond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = dict(latents=latents, prompt_embeds=prompt_embeds,
                                   negative_prompt_embeds=negative_prompt_embeds)
                    requested = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    latents = (callback_on_step_end(self, i, t, requested) or {}).get("latents", latents)
                progress_bar.update()

        # 6. Decode.
        images = latents if output_type == "latent" else self.image_processor.postprocess(
            self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Match the guided prediction's per-sample standard deviation to the conditional one's, then
    blend by φ (https://arxiv.org/abs/2305.08891, §3.4, eq. 15-16): large guidance weights inflate
    the prediction's scale, which shows as over-saturated images."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def _as_list(text: str | list[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _is_text_or_texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, str) for v in value))
