"""`python -m ldm.evaluate MODEL --reference DATA`: a model measured on held-out data, with a table
printed and `evaluation.json` written beside it.

    python -m ldm.evaluate outputs/unet-demo --reference openmoji
    python -m ldm.evaluate outputs/unet-demo --reference openmoji --inception_weights weights.pth --guidance 1 5

The model loads through generate.py's own code, so a LoRA (`--lora`), a distilled student and an ONNX
export (`--backend onnx`) are evaluated as generate.py draws them. The reference's held-out split gives
the real images and the captions the model draws, one image per caption, image i with seed + i:
- the held-out denoising loss at fixed draws and the latent bits/dim bound (PyTorch, not distilled);
- FID, KID, Inception Score, precision/recall/density/coverage with `--inception_weights`;
- the CLIP score with `--clip_model`.
A metric whose weights are not given is listed as skipped, with the flag that enables it. Every input is
checked before a model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from ldm.config import ConfigError
from ldm.data.captions import caption_list
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, load_splits
from ldm.data.openmoji import default_cache_dir
from ldm.diffusion.objective import trained_schedule
from ldm.evaluation.clip_score import clip_score, load_clip
from ldm.evaluation.config import EvaluateConfig
from ldm.evaluation.denoising import held_out_loss, latent_bound, posteriors
from ldm.evaluation.image_metrics import (
    InceptionFeatures,
    ReferenceSet,
    check_enough_images,
    image_metrics,
    reference_features,
)
from ldm.evaluation.likelihood import BoundUndefined
from ldm.generation.config import GenerateConfig
from ldm.generation.loading import configure, load_model, settle
from ldm.generation.output import draw, image_jobs, in_batches
from ldm.hub.files import read_distillation
from ldm.pipelines.latent_diffusion import scaled_lora_layers
from ldm.pipelines.latent_transformer import LatentTransformerPipeline, pipeline_class

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    """MODEL may come first, without its flag, as in `python -m ldm.evaluate outputs/unet-demo`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    parser = HfArgumentParser(EvaluateConfig, prog="python -m ldm.evaluate",
                              description="Measure a text-to-image model on a reference dataset's held-out split.")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    config.validate()
    return config


def native_resolution(config: EvaluateConfig) -> int:
    """The size the model draws at, from its config files alone (no weights are read)."""
    vae_folder = "vae_decoder" if config.backend == "onnx" else "vae"
    denoiser_folder = "transformer" if pipeline_class(config.model, config.revision) is LatentTransformerPipeline \
        else "unet"
    try:
        denoiser = UNet2DConditionModel.load_config(config.model, subfolder=denoiser_folder, revision=config.revision)
        vae = AutoencoderKL.load_config(config.model, subfolder=vae_folder, revision=config.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {config.model!r}: cannot read its {denoiser_folder}/ and {vae_folder}/ configs: "
                          f"{error}") from None
    return denoiser["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def reference_rows(config: EvaluateConfig, resolution: int):
    """The reference's held-out rows, as many as the images asked for, checked before any model loads."""
    data = data_config(config, resolution)
    held_out = load_splits(data)[1]
    if len(held_out) < config.num_samples:
        raise ConfigError(f"num_samples {config.num_samples} is more than the {len(held_out)} held-out images of "
                          f"the reference {config.reference!r}; ask for at most {len(held_out)}")
    return data, held_out.select(range(config.num_samples))


def is_imagefolder(path: str) -> bool:
    """A folder of images with metadata.jsonl or metadata.csv, at its root or in split folders (train/, ...)."""
    if not os.path.isdir(path):
        return False
    folders = [path] + [entry.path for entry in os.scandir(path) if entry.is_dir()]
    return any(os.path.isfile(os.path.join(folder, name)) for folder in folders
               for name in ("metadata.jsonl", "metadata.csv"))


def data_config(config: EvaluateConfig, resolution: int) -> DataConfig:
    folder = is_imagefolder(config.reference)
    data = DataConfig(dataset_name=config.reference, train_data_dir=config.reference if folder else None,
                      image_column=config.image_column,
                      caption_column=config.caption_column, resolution=resolution, cache_dir=config.cache_dir)
    data.validate()
    return data


def real_images(data: DataConfig, rows) -> tuple[torch.Tensor, list[str]]:
    """The reference images as uint8 (N, 3, H, W), center-cropped to the model's size, and one caption each."""
    dataset = ImageCaptionDataset.from_config(rows, data, train=False)
    samples = [dataset[i] for i in range(len(dataset))]
    unreadable = [sample["index"] for sample in samples if sample.get("skipped")]
    if unreadable:
        raise ConfigError(f"reference rows {unreadable[:10]} cannot be read as images; fix or drop them")
    pixels = torch.stack([sample["pixel_values"] for sample in samples])
    captions = [caption_list(value)[0] for value in rows[data.caption_column]]
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), captions


def generation_config(config: EvaluateConfig, guidance: float | None) -> GenerateConfig:
    return GenerateConfig(model=config.model, prompt=["-"], guidance_scale=guidance, scheduler=config.scheduler,
                          num_inference_steps=config.num_inference_steps, seed=config.seed,
                          batch_size=config.batch_size, revision=config.revision, lora=config.lora,
                          lora_scale=config.lora_scale, backend=config.backend, device=config.device)


def generated_images(pipe, captions: list[str], settings: GenerateConfig) -> torch.Tensor:
    """One image per caption through generate.py's own draw, as uint8 (N, 3, H, W)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    batches = in_batches(image_jobs(captions, settings), settings.batch_size)
    for batch in tqdm(batches, desc=f"drawing at guidance {settings.guidance_scale:g}", unit="batch"):
        images += [np.asarray(image.convert("RGB")) for image, _ in draw(pipe, batch, settings)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def denoising_numbers(config: EvaluateConfig, pipe, data: DataConfig, rows, captions: list[str]) -> dict:
    """The held-out loss and latent bits/dim, or why they do not apply."""
    if config.validation_loss_samples == 0:
        return {"skipped": "--validation_loss_samples 0"}
    if config.backend != "torch":
        return {"skipped": "the ONNX export has no PyTorch UNet to score (use the PyTorch model)"}
    if pipe.denoiser.config.get("time_cond_proj_dim") is not None:
        return {"skipped": "a distilled student takes the guidance scale as an input: no denoising loss or bound"}
    count = min(config.validation_loss_samples, len(rows))
    pixels = torch.stack([sample["pixel_values"] for sample in ImageCaptionDataset.from_config(
        rows.select(range(count)), data, train=False)])
    mean, std = posteriors(pipe, pixels)
    schedule = trained_schedule(pipe.scheduler.config)
    # The UNet is called directly here, not through the pipeline: --lora_scale is applied as the pipeline would.
    with scaled_lora_layers(pipe.denoiser, config.lora_scale), scaled_lora_layers(pipe.text_encoder, config.lora_scale):
        start = time.perf_counter()
        loss = held_out_loss(pipe, schedule, mean, std, captions[:count], config.seed, bins=10)
        loss_seconds, start = time.perf_counter() - start, time.perf_counter()
        numbers = {"held_out_loss": loss.loss, "held_out_loss_by_bin": loss.by_bin, "held_out_images": loss.count,
                   "held_out_loss_seconds": loss_seconds}
        bound_count = min(config.bound_samples, count)
        try:
            bound = latent_bound(pipe, schedule, mean[:bound_count], captions[:bound_count], config.bound_strata,
                                 config.seed)
        except BoundUndefined as reason:
            return {**numbers, "bound_skipped": str(reason)}
    return {**numbers, "latent_bits_per_dim": bound.bits_per_dim,
            "latent_bits_per_dim_se": bound.standard_error, "bound_images": bound.samples,
            "bound_model_calls_per_image": bound.timesteps_per_sample, "bound_seconds": time.perf_counter() - start,
            "scaling_factor": bound.scaling_factor, "shift_factor": bound.shift_factor}


def image_numbers(config: EvaluateConfig, generated: torch.Tensor, captions: list[str], reference, extractor,
                  clip) -> dict:
    """FID, KID, IS, PR, density, coverage and the CLIP score of one guidance scale's images."""
    numbers = {}
    if extractor is not None:
        start = time.perf_counter()
        features = extractor(generated, name="generated", progress=True)
        results = image_metrics(reference, features, splits=inception_score_splits(config), seed=config.seed)
        numbers |= {key: {"name": r.name, "value": r.value, "std": r.std, "standard": r.standard, "images": r.count}
                    for key, r in results.items()}
        numbers["inception_seconds"] = time.perf_counter() - start
    if clip is not None:
        start = time.perf_counter()
        score = clip_score(generated, captions, clip)
        numbers["clip_score"] = {"name": "CLIP score", "value": score.score,
                                 "per_pair_mean": score.per_pair.mean().item(), "images": score.count}
        numbers["clip_seconds"] = time.perf_counter() - start
    return numbers


def inception_score_splits(config: EvaluateConfig) -> int:
    """The standard 10 splits, fewer for a set of fewer than 10 images."""
    return min(10, config.num_samples)


def skipped(config: EvaluateConfig) -> dict[str, str]:
    reasons = {}
    if config.inception_weights is None:
        reasons["FID, KID, Inception Score, precision/recall/density/coverage"] = "pass --inception_weights PATH"
    if config.clip_model is None:
        reasons["CLIP score"] = "pass --clip_model DIR (a local CLIP folder)"
    return reasons


def table(report: dict) -> str:
    """The printed report: a row per number, a column per guidance scale."""
    scales = list(report["by_guidance"])
    lines = ["| metric | " + " | ".join(f"guidance {scale}" for scale in scales) + " |",
             "|---|" + "---:|" * len(scales)]
    denoising = report["denoising"]
    if "held_out_loss" in denoising:
        lines.append(f"| held-out loss ({denoising['held_out_images']} images) | "
                     + " | ".join([f"{denoising['held_out_loss']:.5f}"] * len(scales)) + " |")
    if "latent_bits_per_dim" in denoising:
        lines.append(f"| latent bits/dim (scaling {denoising['scaling_factor']:.4g}, shift "
                     f"{denoising['shift_factor'] or 0:g}; {denoising['bound_images']} images) | "
                     + " | ".join([f"{denoising['latent_bits_per_dim']:.4f} ± "
                                   f"{denoising['latent_bits_per_dim_se']:.4f}"] * len(scales)) + " |")
    keys = [key for key, value in report["by_guidance"][scales[0]].items() if isinstance(value, dict)]
    for key in keys:
        cells = []
        for scale in scales:
            entry = report["by_guidance"][scale][key]
            cells.append(f"{entry['value']:.4f}" + (f" ± {entry['std']:.4f}" if entry.get("std") else ""))
        lines.append(f"| {report['by_guidance'][scales[0]][key]['name']} | " + " | ".join(cells) + " |")
    seconds = [" / ".join(f"{report['by_guidance'][scale].get(name, 0):.0f}" for name in (
        "drawing_seconds", "inception_seconds", "clip_seconds")) for scale in scales]
    lines.append("| seconds: drawing / Inception metrics / CLIP score | " + " | ".join(seconds) + " |")
    skips = dict(report["skipped"])
    if "skipped" in denoising:
        skips["held-out loss, latent bits/dim"] = denoising["skipped"]
    if "bound_skipped" in denoising:
        skips["latent bits/dim"] = denoising["bound_skipped"]
    lines += [f"| {name} | skipped: {reason} |" + " |" * (len(scales) - 1) for name, reason in skips.items()]
    return "\n".join(lines)


def evaluate(config: EvaluateConfig) -> dict:
    """Check every input, load the model, measure, and write `evaluation.json`. Returns the report."""
    # 1. What needs no model: the reference's size, the weights files.
    resolution = native_resolution(config)
    data, rows = reference_rows(config, resolution)
    extractor = None
    if config.inception_weights:
        check_enough_images(config.num_samples, splits=inception_score_splits(config))
        extractor = InceptionFeatures(config.inception_weights, config.feature_size)
    clip = load_clip(config.clip_model) if config.clip_model else None
    # 2. The model, through generate.py's loading code.
    base = generation_config(config, None)
    pipe = load_model(base)
    distilled = read_distillation(config.model, config.revision)
    real, captions = real_images(data, rows)
    # 3. The reference's features, cached by every setting that makes them.
    reference = None
    if extractor is not None:
        identity = ReferenceSet(config.reference, f"{rows._fingerprint}:{data.image_column}", len(rows), resolution)
        reference = reference_features(real, identity, extractor,
                                       os.path.join(data.cache_dir or default_cache_dir(), "reference-features"))
    report = {"settings": {**vars(config), "resolution": resolution, "distilled": distilled,
                           "versions": {name: version(name) for name in ("torch", "diffusers", "transformers",
                                                                         "torchmetrics")}},
              "denoising": denoising_numbers(config, pipe, data, rows, captions),
              "skipped": skipped(config), "by_guidance": {}}
    if extractor is not None:
        report["settings"]["inception_weights_sha256"] = extractor.weights_sha256
    # 4. Each guidance scale's images, and their metrics.
    for scale in config.guidance or [None]:
        settings = generation_config(config, scale)
        settle(pipe, settings, distilled)
        configure(pipe, settings)
        start = time.perf_counter()
        generated = generated_images(pipe, captions, settings)
        numbers = {"steps": settings.num_inference_steps, "drawing_seconds": time.perf_counter() - start}
        numbers |= image_numbers(config, generated, captions, reference, extractor, clip)
        report["by_guidance"][f"{settings.guidance_scale:g}"] = numbers
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "evaluation.json"), "w") as file:
        json.dump(report, file, indent=2, default=str)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv)
        report = evaluate(config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"python -m ldm.evaluate: error: {error}", file=sys.stderr)
        return 2
    print(f"\n{config.model} against {config.reference} ({config.num_samples} images)\n\n{table(report)}\n\n"
          f"wrote {os.path.join(config.output_dir, 'evaluation.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
