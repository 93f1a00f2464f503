"""The denoiser: a UNet2DConditionModel or a PixArt-style transformer (PixArtTransformer2DModel), built from a
diffusers config.json and called through one function, `denoise`, so the trainer, the pipeline and the
evaluations have one code path for both.

The two read the text differently. The UNet attends to every position of CLIP's states, padding included,
as Stable Diffusion does. PixArt masks the padding out of its cross-attention, as PixArtAlphaPipeline
passes it the tokenizer's attention mask. Here a masking denoiser's text states have their padding zeroed
(`zero_padding`), and `denoise` recovers the mask from the zero rows: the states then carry their own mask
through caches, caption dropout and classifier-free guidance's batching, which all treat them as one tensor.
A real token's state is never exactly zero: CLIP's final layer norm has a bias.
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from ldm.config import ConfigError
from ldm.data.captions import padding_mask
from ldm.hub.files import find_model
from ldm.models.architecture import check_architecture, read_model_config

DENOISERS = {model.__name__: model for model in (UNet2DConditionModel, PixArtTransformer2DModel)}
FOLDERS = {UNet2DConditionModel: "unet", PixArtTransformer2DModel: "transformer"}  # a pipeline's subfolder


def denoiser_class(architecture: dict, source: str) -> type:
    named = architecture.get("_class_name", "UNet2DConditionModel")
    if named not in DENOISERS:
        raise ConfigError(f"{source} describes a {named}; the denoisers this trainer builds are "
                          f"{', '.join(DENOISERS)}")
    return DENOISERS[named]


def read_denoiser_architecture(path: str) -> tuple[type, dict]:
    """The class and the checked architecture of a denoiser config.json."""
    architecture = read_model_config(path)
    model_class = denoiser_class(architecture, path)
    check_architecture(architecture, model_class, path)
    if model_class is PixArtTransformer2DModel:
        check_pixart(architecture, path)
    return model_class, architecture


def check_pixart(architecture: dict, source: str) -> None:
    """The PixArt settings a from-scratch text-to-image model on CLIP states needs (the diffusers defaults
    are PixArt-α's 1024-px T5 model's)."""
    in_channels = architecture.get("in_channels", 4)
    if architecture.get("out_channels", 8) != in_channels:
        raise ConfigError(f"{source}: out_channels {architecture.get('out_channels', 8)} must equal in_channels "
                          f"{in_channels}: the loss here is plain MSE, not PixArt's learned variance (8 = 2 x 4)")
    if architecture.get("caption_channels") is None:
        raise ConfigError(f"{source}: set caption_channels to the text encoder's hidden_size: it projects the "
                          "text states to the transformer's width")
    if architecture.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise ConfigError(f"{source}: norm_type {architecture['norm_type']!r}: PixArtTransformer2DModel supports "
                          "only 'ada_norm_single'")
    if architecture.get("use_additional_conditions") or (
            architecture.get("use_additional_conditions") is None and architecture.get("sample_size", 128) == 128):
        raise ConfigError(f"{source}: set use_additional_conditions to false: the resolution and aspect-ratio "
                          "embeddings (on by default at sample_size 128) need PixArt's resolution binning, "
                          "which these pipelines do not use")


def build_denoiser(path: str, seed: int) -> torch.nn.Module:
    model_class, architecture = read_denoiser_architecture(path)
    torch.manual_seed(seed)
    return model_class.from_config(architecture)


def is_transformer(model: torch.nn.Module) -> bool:
    return isinstance(model, PixArtTransformer2DModel)


def text_width(model: torch.nn.Module) -> int:
    """The width of the text states the denoiser reads."""
    return model.config.caption_channels if is_transformer(model) else model.config.cross_attention_dim


def check_text_width(model: torch.nn.Module, text_encoder) -> None:
    key = "caption_channels" if is_transformer(model) else "cross_attention_dim"
    hidden = text_encoder.config.hidden_size
    if text_width(model) != hidden:
        raise ConfigError(f"the {type(model).__name__}'s {key} {text_width(model)} does not match the text "
                          f"encoder's hidden_size {hidden}; set {key} to {hidden} in its config.json")


def denoise(model: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
            **unet_inputs) -> torch.Tensor:
    """The denoiser's prediction at `sample` for the model timesteps and the text states. `unet_inputs`
    (timestep_cond, cross_attention_kwargs) go to a UNet; a transformer takes cross_attention_kwargs too."""
    if not is_transformer(model):
        return model(sample, timesteps, encoder_hidden_states=states, return_dict=False, **unet_inputs)[0]
    if unet_inputs.get("timestep_cond") is not None:
        raise ValueError("a PixArt transformer takes no timestep_cond (guidance embedding): it is not distilled")
    if torch.is_tensor(timesteps) and timesteps.dim() == 0 or not torch.is_tensor(timesteps):
        timesteps = torch.as_tensor(timesteps, device=sample.device).expand(sample.shape[0])
    return model(sample, encoder_hidden_states=states, encoder_attention_mask=padding_mask(states),
                 timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                 cross_attention_kwargs=unet_inputs.get("cross_attention_kwargs"), return_dict=False)[0]


def load_pretrained_denoiser(source: str, revision: str | None = None) -> torch.nn.Module:
    """The denoiser of a pipeline folder or Hub id (its `unet/` or `transformer/`), or a model folder."""
    found = find_model(source, revision)
    if found.is_pipeline:
        components = dict(found.components)
        subfolder = "transformer" if "transformer" in components else "unet"
        named = components.get(subfolder)
    else:
        subfolder, named = None, found.class_name
    if named not in DENOISERS:
        held = f"the pipeline {found.class_name}" if found.is_pipeline else f"a {named}"
        raise ConfigError(f"{source!r} holds {held}, which has no denoiser this trainer fine-tunes "
                          f"({', '.join(DENOISERS)})")
    return DENOISERS[named].from_pretrained(source, subfolder=subfolder, revision=revision)
