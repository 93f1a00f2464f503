"""LatentTransformerPipeline: LatentDiffusionPipeline's recipe with a PixArt-style transformer
(PixArtTransformer2DModel) as the denoiser in place of the UNet.

Its folder has diffusers' PixArt layout (`model_index.json`, `vae/`, `text_encoder/`, `tokenizer/`,
`transformer/`, `scheduler/`), so diffusers' own `PixArtAlphaPipeline.from_pretrained(folder)` loads it
with our CLIP text side in place of T5 and draws the same images, given
`max_sequence_length=pipe.tokenizer.model_max_length` (its default of 120 is past CLIP's context),
`use_resolution_binning=False` (binning knows only PixArt's own sizes) and `clean_caption=False`.
Like PixArtAlphaPipeline, it masks the text's padding out of the transformer's cross-attention.

Image-to-image and inpainting work as for the UNet. LoRA does not: PixArtTransformer2DModel has no
PEFT adapter support in diffusers (no `PeftAdapterMixin`), so the LoRA methods raise.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.hub.files import find_model
from ldm.models.denoiser import is_transformer
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

LORA_METHODS = ("load_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters", "enable_lora", "disable_lora")


class LatentTransformerPipeline(LatentDiffusionPipeline):
    """Text-to-image with a PixArt transformer; components `vae`, `text_encoder`, `tokenizer`,
    `transformer` and `scheduler`. Everything else is LatentDiffusionPipeline's."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 transformer: PixArtTransformer2DModel, scheduler: SchedulerMixin):
        DiffusionPipeline.__init__(self)  # not LatentDiffusionPipeline's: that one registers a `unet`
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        self._set_up_processors()

    @property
    def denoiser(self) -> PixArtTransformer2DModel:
        return self.transformer

    @property
    def text_padding_eos(self) -> int:
        return self.tokenizer.eos_token_id


def _no_lora(name: str):
    def refuse(self, *args, **kwargs):
        raise ValueError(f"{name}: PixArtTransformer2DModel has no LoRA support in diffusers (no PeftAdapterMixin); "
                         "LoRA works with a UNet pipeline")
    refuse.__name__ = name
    return refuse


for _name in LORA_METHODS:
    setattr(LatentTransformerPipeline, _name, _no_lora(_name))


def pipeline_for(denoiser, **components) -> LatentDiffusionPipeline:
    """The pipeline around a denoiser: a LatentTransformerPipeline for a transformer, else LatentDiffusionPipeline."""
    if is_transformer(denoiser):
        return LatentTransformerPipeline(transformer=denoiser, **components)
    return LatentDiffusionPipeline(unet=denoiser, **components)


def pipeline_class(name_or_path: str, revision: str | None = None) -> type[LatentDiffusionPipeline]:
    """The class that loads a pipeline folder or Hub id: by whether it keeps a `transformer/` or a `unet/`."""
    components = dict(find_model(name_or_path, revision).components)
    return LatentTransformerPipeline if "transformer" in components else LatentDiffusionPipeline


def load_latent_pipeline(name_or_path: str, **kwargs) -> LatentDiffusionPipeline:
    """`from_pretrained` with the class the folder needs (kwargs as diffusers takes them)."""
    return pipeline_class(name_or_path, kwargs.get("revision")).from_pretrained(name_or_path, **kwargs)
