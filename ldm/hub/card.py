"""The model card (README.md) a pushed folder gets: metadata for the Hub, how to load the model, its
samples, its metrics and the config it was trained with."""

from __future__ import annotations

import fnmatch
import json
import os

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ldm.config import RUN_CONFIG
from ldm.hub.files import LORA_WEIGHTS, METRICS, is_hub_id, read_distillation

OPENMOJI_LICENSE = "cc-by-sa-4.0"

def read_settings(folder: str) -> dict:
    """The training config saved beside the model ({} for a folder saved by hand)."""
    path = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return yaml.safe_load(file) or {}


def dataset_of(settings: dict) -> str | None:
    if settings.get("train_data_dir"):
        return os.path.basename(os.path.normpath(settings["train_data_dir"]))
    return settings.get("dataset_name")


def model_card(folder: str, repo_id: str, kind: str, settings: dict, license: str | None = None) -> str:
    """README.md for the Hub: YAML metadata (library, pipeline tag, license, dataset; for a LoRA adapter also
    the base model and the concept its captions name), then what the model is and how to load it, its
    sample grid, its measured metrics, and the config it was trained with. `kind` is what `pushed_kind` says.

    A VAE gets no pipeline tag: it does not draw images from text, and the Hub has no autoencoder task.
    The license defaults to the data's: OpenMoji's CC BY-SA 4.0 binds models trained on it.
    """
    dataset = dataset_of(settings)
    license = license or settings.get("hub_license") or (OPENMOJI_LICENSE if dataset == "openmoji" else "other")
    draws = kind != "VAE"
    tags = ["latent-diffusion"] + {"pipeline": ["text-to-image"], "VAE": ["autoencoder", "vae"],
                                   "LoRA adapter": ["text-to-image", "lora"]}[kind]
    adapter = {}
    if kind == "LoRA adapter":
        adapter = {"base_model": base_model_id(settings), "instance_prompt": settings.get("lora_concept")}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image" if draws else None, license=license,
                         datasets=[dataset] if dataset else None, tags=tags,
                         **{key: value for key, value in adapter.items() if value})
    about = describe_lora(repo_id, settings) if adapter else describe(
        repo_id, kind == "pipeline", read_distillation(folder), os.path.isdir(os.path.join(folder, "transformer")))
    sections = [f"# {repo_id}", about]
    samples = sample_grid(folder)
    if samples:
        caption = {"pipeline": "Samples for the validation prompts", "VAE": "Held-out images (top) and reconstructions",
                   "LoRA adapter": "Samples for the validation prompts, with the adapter"}[kind]
        sections.append(f"## Samples\n\n{caption}:\n\n![samples]({samples})")
    metrics_path = os.path.join(folder, METRICS)
    if os.path.isfile(metrics_path):
        with open(metrics_path) as file:
            rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in json.load(file).items())
        sections.append(f"## Metrics\n\nMeasured at the end of training:\n\n| metric | value |\n|---|---:|\n{rows}")
    if dataset:
        sections.append(f"## Data\n\nTrained on `{dataset}`." + (
            " The images are [OpenMoji](https://openmoji.org), the open-source emoji project, licensed under "
            "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/); models trained on them and images "
            "made with those models carry that attribution." if dataset == "openmoji" else ""))
    if settings:
        config = yaml.safe_dump(settings, sort_keys=False).strip()
        sections.append(f"## Training config\n\n`{RUN_CONFIG}`, as the run resolved it:\n\n```yaml\n{config}\n```")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def base_model_id(settings: dict) -> str | None:
    """The Hub id of the pipeline a LoRA adapts, for the card's `base_model`; None when it was a local
    folder, which the Hub would refuse there (it takes model ids only)."""
    base = settings.get("pretrained_model_name_or_path")
    return base if base and not os.path.isdir(base) and is_hub_id(base) else None


def describe(repo_id: str, is_pipeline: bool, distilled: dict, transformer: bool = False) -> str:
    if transformer:
        return ("A text-to-image latent diffusion pipeline (CLIP text encoder, PixArtTransformer2DModel, "
                "AutoencoderKL) in the diffusers layout, trained with ldm.\n\n```python\n"
                "from diffusers import PixArtAlphaPipeline  # or ldm's LatentTransformerPipeline\n\n"
                f'pipe = PixArtAlphaPipeline.from_pretrained("{repo_id}")\n'
                'image = pipe("red heart", num_inference_steps=25, use_resolution_binning=False, clean_caption=False,\n'
                '             max_sequence_length=pipe.tokenizer.model_max_length).images[0]\n```\n\n'
                f'or `python generate.py --model {repo_id} --prompt "red heart"`.')
    if distilled:
        steps, guidance = distilled["num_inference_steps"], distilled["guidance_scale"]
        return (f"A {steps}-step text-to-image latent diffusion pipeline, distilled with ldm by latent consistency "
                f"distillation (`{distilled['method']}`) from the pipeline `{distilled['teacher']}`. Its UNet takes "
                "the guidance scale as an input (`time_cond_proj_dim`), so each step is one UNet pass; its "
                "scheduler is an LCMScheduler.\n\n```python\n"
                "from diffusers import LatentConsistencyModelPipeline  # or StableDiffusionPipeline\n\n"
                f'pipe = LatentConsistencyModelPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
                f'image = pipe("red heart", num_inference_steps={steps}, guidance_scale={guidance}).images[0]\n'
                f'```\n\nor `python generate.py --model {repo_id} --prompt "red heart"` ({steps} steps by default).')
    if is_pipeline:
        return ("A text-to-image latent diffusion pipeline (CLIP text encoder, UNet2DConditionModel, AutoencoderKL) "
                "in the diffusers layout, trained with ldm.\n\n```python\n"
                "from diffusers import StableDiffusionPipeline  # or ldm.pipeline.LatentDiffusionPipeline\n\n"
                f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
                'image = pipe("red heart", num_inference_steps=25).images[0]\n```\n\n'
                f'or `python generate.py --model {repo_id} --prompt "red heart"`.')
    return ("The autoencoder (AutoencoderKL) of a latent diffusion model, trained with ldm. Its config.json "
            "carries the measured latent `scaling_factor`.\n\n```python\nfrom diffusers import AutoencoderKL\n\n"
            f'vae = AutoencoderKL.from_pretrained("{repo_id}")\n```')


def describe_lora(repo_id: str, settings: dict) -> str:
    base = settings.get("pretrained_model_name_or_path", "the base pipeline")
    where = f"`{base}`" if base_model_id(settings) else f"`{base}` (a local folder when it was trained, not on the Hub)"
    text_encoder = " and the text encoder's attention projections" if settings.get("train_text_encoder_lora") else ""
    targets = " ".join(settings.get("lora_target_modules") or [])
    concept = settings.get("lora_concept")
    # the concept's words after the subject, where the demo's captions put them
    prompt = f"red heart {concept}" if concept else "red heart"
    return (f"LoRA adapters (arXiv 2106.09685) for the text-to-image pipeline {where}, trained with ldm: rank "
            f"{settings.get('lora_rank')}, alpha {settings.get('lora_alpha') or settings.get('lora_rank')}, on the "
            f"UNet's `{targets}`{text_encoder}."
            + (f" Its training captions call what it learnt `{concept}`: put that in the prompt." if concept else "")
            + f" `{LORA_WEIGHTS}` is in diffusers' LoRA format.\n\n```python\n"
            "from diffusers import StableDiffusionPipeline  # or ldm.pipeline.LatentDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None)\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            f'image = pipe("{prompt}", num_inference_steps=25, cross_attention_kwargs={{"scale": 1.0}}).images[0]\n'
            f'```\n\nor `python generate.py --model {base} --lora {repo_id} --lora_scale 1.0 --prompt "{prompt}"`.')


def sample_grid(folder: str) -> str | None:
    """The last validation grid the trainer saved, as a path relative to `folder`."""
    validation = os.path.join(folder, "validation")
    grids = sorted(fnmatch.filter(os.listdir(validation), "step-*.png")) if os.path.isdir(validation) else []
    return f"validation/{grids[-1]}" if grids else None


