"""Models from diffusers `config.json` files (an architecture, random weights) or from pretrained
folders and Hub ids (weights too).

Architectures are checked before anything is built: diffusers only warns about a key it does not
know and then uses the default, so a typo such as `laten_channels` would silently train the wrong model.
"""

from __future__ import annotations

import inspect
import json

from ldm.config import ConfigError
from ldm.hub.files import HubError, find_model


def read_architecture(path: str, model_class: type) -> dict:
    """A diffusers config.json for `model_class`, with every key checked against its constructor."""
    architecture = read_model_config(path)
    check_architecture(architecture, model_class, path)
    return architecture


def read_model_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the model config {path!r}: {error}") from error


def check_architecture(architecture: dict, model_class: type, source: str) -> None:
    named = architecture.get("_class_name", model_class.__name__)
    if named != model_class.__name__:
        raise ConfigError(f"{source} describes a {named}, not a {model_class.__name__}")
    known = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    unknown = sorted(key for key in architecture if not key.startswith("_") and key not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown {model_class.__name__} key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(known))}")


def vae_subfolder(name_or_path: str, revision: str | None, option: str) -> str | None:
    """Where the folder or Hub repository keeps its AutoencoderKL: at its root (None: what
    train_vae.py writes) or in `vae/` (a pipeline: a Stable Diffusion repository, or what
    train_unet.py writes). A missing one, a missing revision, an offline machine without a cached
    copy, and another kind of model each fail before any work, naming `option`."""
    try:
        found = find_model(name_or_path, revision)
    except HubError as error:
        raise HubError(f"{option}: {error}") from None
    if found.is_vae:
        return None
    if dict(found.components).get("vae") == "AutoencoderKL":
        return "vae"
    held = f"the pipeline {found.class_name} without an AutoencoderKL" if found.is_pipeline else f"a {found.class_name}"
    raise ConfigError(f"{option} {name_or_path!r} holds {held}, not a VAE (an AutoencoderKL's config.json at its "
                      "root, as train_vae.py writes, or a pipeline with one in vae/)")


def vae_scale_factor(architecture: dict) -> int:
    """Each down block but the last halves the image: f = 2^(blocks - 1)."""
    return 2 ** (len(architecture.get("block_out_channels", (64,))) - 1)
