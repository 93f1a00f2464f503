"""What a pipeline call accepts: every argument checked before any model runs, the bad value named."""

from __future__ import annotations

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class CallChecks:
    """Mixed into LatentDiffusionPipeline: its `check_inputs`, the first step of `__call__`."""

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                     num_inference_steps, num_images_per_prompt, guidance_rescale, generator, output_type,
                     callback_tensor_inputs) -> None:
        """Fail before any model runs, naming the bad value and what would be valid."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None and not _is_text_or_texts(prompt):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
        batch_size = len(as_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
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
        if not _is_positive_int(num_inference_steps):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not _is_positive_int(num_images_per_prompt):
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


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and value >= 1


def as_list(text: str | list[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _is_text_or_texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, str) for v in value))
