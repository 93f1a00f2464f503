"""LoRA fine-tuning (Hu et al. 2021, arXiv 2106.09685) with peft, the way diffusers does it: low-rank
adapters injected into a frozen pretrained UNet (and optionally its text encoder) with `add_adapter`,
and only they are trained, checkpointed and averaged.

The result is one file in diffusers' LoRA format, `pytorch_lora_weights.safetensors`, as
`StableDiffusionPipeline.save_lora_weights` writes it: peft's state dict (`get_peft_model_state_dict`)
renamed to diffusers' keys (`convert_state_dict_to_diffusers`: `lora_A`/`lora_B` become `lora.down`/
`lora.up`, or `lora_linear_layer.down`/`.up` in the text encoder), under the prefixes `unet.` and
`text_encoder.`, with each model's LoraConfig in the file's metadata. The metadata carries
`lora_alpha`: without it a loader takes alpha = rank. Any pipeline with diffusers'
`StableDiffusionLoraLoaderMixin` loads the file: ours (ldm/pipelines/latent_diffusion.py) and diffusers' own.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from ldm.config import ConfigError
from ldm.hub.files import LORA_WEIGHTS

ADAPTER = "default"  # the name add_adapter gives; one adapter per model while training
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)  # the layers that get adapters here


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the module's full name, or its ending after a dot."""
    return name == target or name.endswith("." + target)


def check_targets(model: torch.nn.Module, targets: list[str], what: str = "UNet") -> None:
    """Each target names at least one Linear or Conv2d layer of `model`, and nothing else (peft would
    stop on a normalisation or a whole block, and silently adapt nothing for a name that matches nothing)."""
    modules = dict(model.named_modules())
    for target in targets:
        matched = [name for name in modules if name and matches(name, target)]
        wrong = [name for name in matched if not isinstance(modules[name], ADAPTABLE)]
        if not matched or wrong:
            problem = (f"matches {wrong[0]} ({type(modules[wrong[0]]).__name__}), which LoRA does not adapt here"
                       if wrong else "matches no module")
            raise ConfigError(f"lora_target_modules {target!r} {problem}; the Linear and Conv2d layers of the "
                              f"{what} end in: {', '.join(layer_endings(modules))}")
        misnamed = [name for name in matched
                    if what == "UNet" and any(matches(name, projection) for projection in TEXT_ENCODER_TARGETS)]
        if misnamed:
            # convert_state_dict_to_diffusers renames every *_proj adapter to the text encoder's key
            # style, which diffusers' loader then cannot place in a UNet: the file would not load.
            raise ConfigError(f"lora_target_modules {target!r} matches {misnamed[0]}, whose adapters diffusers' LoRA "
                              f"file format stores under text-encoder key names ({', '.join(TEXT_ENCODER_TARGETS)}), "
                              "so no loader could put them back into the UNet; leave it out")


def layer_endings(modules: dict[str, torch.nn.Module]) -> list[str]:
    """The names a target can give for the adaptable layers: their last part (`to_q`, `conv1`), with
    the part before when the last is an index (`to_out.0`)."""
    endings = set()
    for name, module in modules.items():
        if isinstance(module, ADAPTABLE):
            parts = name.split(".")
            endings.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(endings)


def add_adapters(model: torch.nn.Module, rank: int, alpha: float | None, targets) -> None:
    """Freeze `model` and give the `targets` trainable adapters. B starts at zero, so the adapted model
    computes what the base computes until the first step; A is Gaussian (peft's "gaussian", as
    diffusers' LoRA scripts initialise it)."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                 target_modules=list(targets)), adapter_name=ADAPTER)


def is_adapted(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def adapter_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone, under diffusers' key names."""
    return convert_state_dict_to_diffusers(adapter_state(model))


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's state dict of the adapters. No embedding layer is ever adapted here, so peft is told not
    to look for one: by default it would ask the Hub whether the base model's vocabulary grew."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)


def unet_adapter_layers(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's adapters, every key in diffusers' `lora.down`/`lora.up` style.

    convert_state_dict_to_diffusers renames only the attention projections' adapters; a convolution's
    would keep peft's `lora_A`/`lora_B`. diffusers' loader decides from the file's first key whether
    to convert the keys, so a file that mixes the two styles loads one kind of adapter and silently
    skips the other (the demo UNet's first keys are a convolution's)."""
    return {key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value
            for key, value in adapter_layers(unet).items()}


def save_adapters(folder: str, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> str:
    """`folder/pytorch_lora_weights.safetensors`: the adapters of the UNet (and the text encoder), as
    diffusers saves them. Returns its path."""
    layers = dict(unet_lora_layers=unet_adapter_layers(unet),
                  unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict())
    if text_encoder is not None:
        layers.update(text_encoder_lora_layers=adapter_layers(text_encoder),
                      text_encoder_lora_adapter_metadata=text_encoder.peft_config[ADAPTER].to_dict())
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, safe_serialization=True, **layers)
    return os.path.join(folder, LORA_WEIGHTS)


def load_adapters(folder: str, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> None:
    """Put the weights of `folder/pytorch_lora_weights.safetensors` into the adapters the models already
    have (what `save_adapters` wrote, back where it came from: a checkpoint being resumed)."""
    weights = load_file(os.path.join(folder, LORA_WEIGHTS))
    for prefix, model, to_peft in (("unet.", unet, convert_unet_state_dict_to_peft),
                                   ("text_encoder.", text_encoder, convert_state_dict_to_peft)):
        if model is None:
            continue
        own = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        expected = len(adapter_state(model))
        result = set_peft_model_state_dict(model, to_peft(own), adapter_name=ADAPTER)
        if len(own) != expected or result.unexpected_keys:
            raise ValueError(f"{folder}/{LORA_WEIGHTS} holds {len(own)} {prefix[:-1]} adapter weights where the "
                             f"model has {expected} (unexpected: {result.unexpected_keys[:3]}): it was not saved from "
                             "this run's settings")


def keep_only_adapters_in_checkpoints(accelerator: Accelerator, unet: torch.nn.Module,
                                      text_encoder: torch.nn.Module | None = None) -> None:
    """Make checkpoints hold the adapters instead of the models' full weights.

    Accelerate saves every prepared model's whole state dict, frozen base included (3.4 GB for Stable
    Diffusion's UNet against a few MB of adapters). Its pre-hooks get those lists first: the save hook
    empties the list of weights and writes `pytorch_lora_weights.safetensors` into the checkpoint
    instead (the adapters as they are, not their average, in the final file's format, so a checkpoint
    loads the same way), and the load hook empties the list of models and loads the adapters back. The optimizer,
    schedule, EMA and RNG states are saved as before."""
    def save(models: list, weights: list, folder: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            save_adapters(folder, unet, text_encoder)

    def load(models: list, folder: str) -> None:
        models.clear()
        load_adapters(folder, unet, text_encoder)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
