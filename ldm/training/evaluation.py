"""What the trainers measure on held-out data, on draws fixed once: the validation loss every
`validation_steps` (kohya's and SimpleTuner's signal: it moves only when the model does) and at the
end, with the best step so far; for train_unet.py also the latent bits/dim bound every
`evaluation_steps` and at the end, and KID of a small fixed sample with `inception_weights`; for
distill.py its method's own loss instead of the denoising one.

The held-out images are the first `validation_loss_samples` of the validation split, encoded once
through the latent cache (center crops, no flips). Their captions are encoded at each evaluation by
the text encoder as it is then, since the demo's trains with the UNet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable

import datasets
import torch
from accelerate import Accelerator
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.data.caches import load_or_build_latents
from ldm.data.captions import caption_list
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.openmoji import default_cache_dir
from ldm.diffusion.objective import normalise_latents
from ldm.evaluation.denoising import caption_embeddings, held_out_loss, latent_bound
from ldm.evaluation.held_out import HeldOutLoss, summarise
from ldm.evaluation.image_metrics import ImageFeatures, InceptionFeatures, MetricResult, kid, to_uint8
from ldm.evaluation.likelihood import BoundUndefined, LikelihoodBound
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.training.distill_config import DistillConfig
from ldm.training.unet_config import UNetConfig

logger = logging.getLogger(__name__)


HISTORY = "validation_loss.jsonl"  # every held-out loss of the run, beside its checkpoints
BATCH = 64  # held-out images per model call
DistillationLosses = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class HeldOutImages:
    """The held-out images' VAE posteriors and captions, and the history of their loss."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], rows: datasets.Dataset,
                 config: UNetConfig | DistillConfig):
        self.mean, self.std, self.captions, self.rows, self.config = mean, std, captions, rows, config
        self.history = os.path.join(config.output_dir, HISTORY)
        self.inception: InceptionFeatures | None = None
        self.real_features: ImageFeatures | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def loss(self, pipeline: LatentDiffusionPipeline, scheduler: SchedulerMixin) -> HeldOutLoss:
        return held_out_loss(pipeline, scheduler, self.mean, self.std, self.captions, self.config.seed,
                             self.config.loss_bins)

    def bound(self, pipeline: LatentDiffusionPipeline, scheduler: SchedulerMixin) -> LikelihoodBound:
        count = min(self.config.bound_samples, len(self))
        return latent_bound(pipeline, scheduler, self.mean[:count], self.captions[:count], self.config.bound_strata,
                            self.config.seed)

    @torch.no_grad()
    def kid(self, pipeline: LatentDiffusionPipeline, steps: int, guidance: float) -> MetricResult:
        """KID of `kid_samples` images drawn for the first held-out captions (image i with seed + i) against
        those images themselves. The Inception and the real images' features are made at the first call."""
        count = min(self.config.kid_samples, len(self))
        if self.inception is None:
            self.inception = InceptionFeatures(self.config.inception_weights, with_logits=False)
            real = ImageCaptionDataset.from_config(self.rows.select(range(count)), self.config, train=False)
            pixels = torch.stack([real[i]["pixel_values"] for i in range(count)])
            self.real_features = self.inception(to_uint8(pixels * 0.5 + 0.5), name="held-out", progress=False)
        size = self.config.resolution
        with torch.random.fork_rng(devices=[]):
            images = pipeline(self.captions[:count], num_inference_steps=steps, guidance_scale=guidance, height=size,
                              width=size, output_type="pt",
                              generator=[torch.Generator().manual_seed(self.config.seed + i) for i in range(count)])
        drawn = self.inception(to_uint8(images.images.float().cpu()), progress=False)
        return kid(self.real_features, drawn, subset_size=count, seed=self.config.seed)

    @torch.no_grad()
    def distillation_loss(self, teacher: LatentDiffusionPipeline, losses: DistillationLosses) -> HeldOutLoss:
        """A distillation method's own loss on the held-out images: each batch's latent sample, noise, timesteps
        and guidance come from its own generator, seeded from the run's seed and the batch's number, so every
        evaluation sees the same draws. `losses(latents, embeddings, generator)` gives (per-image loss, the
        timestep each image was noised to)."""
        embeddings = caption_embeddings(teacher, self.captions)
        per_image, timesteps = [], []
        with torch.random.fork_rng(devices=[]):
            for number, start in enumerate(range(0, len(self), BATCH)):
                rows = slice(start, start + BATCH)
                generator = torch.Generator(teacher.device).manual_seed(self.config.seed + number)
                mean, std = self.mean[rows].to(teacher.device), self.std[rows].to(teacher.device)
                draw = torch.randn(mean.shape, generator=generator, device=teacher.device)
                loss, t = losses(normalise_latents(mean + std * draw, teacher.vae.config), embeddings[rows], generator)
                per_image.append(loss.double().cpu())
                timesteps.append(t.cpu())
        return summarise(torch.cat(per_image), torch.cat(timesteps).clamp(min=0),
                         teacher.scheduler.config.num_train_timesteps, self.config.loss_bins)

    def record(self, loss: float, step: int) -> None:
        """Kept in a file, so that the best step of a run killed and resumed counts the evaluations before
        the kill too (a resumed run repeats the steps after its checkpoint bit for bit, and their losses)."""
        with open(self.history, "a") as file:
            file.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def best(self) -> tuple[float, int]:
        """(loss, step) of the lowest held-out loss the run has logged."""
        with open(self.history) as file:
            entries = [json.loads(line) for line in file if line.strip()]
        best = min(entries, key=lambda entry: (entry["loss"], entry["step"]))
        return best["loss"], best["step"]


def held_out_images(config: UNetConfig | DistillConfig, accelerator: Accelerator, rows: datasets.Dataset | None,
                    vae, resuming: bool) -> HeldOutImages | None:
    """The held-out images through the latent cache, built by every process (as the training cache is),
    with the global random state left as it was: the training run is the same with or without them.
    A run that starts afresh starts a new history of their loss."""
    if rows is None or not config.validation_loss_samples or len(rows) == 0:
        return None
    history = os.path.join(config.output_dir, HISTORY)
    if accelerator.is_main_process and not resuming and os.path.exists(history):
        os.remove(history)
    rows = rows.select(range(min(config.validation_loss_samples, len(rows))))
    with torch.random.fork_rng(devices=[]):
        cache = load_or_build_latents(vae, ImageCaptionDataset.from_config(rows, config, train=False), False,
                                      config.cache_dir or default_cache_dir(), config.cache_dtype,
                                      config.cache_chunk_rows, config.cache_batch_size, processes=accelerator)
    table = cache.take(list(range(len(cache))))  # an unreadable image is not in the cache
    mean, std = (cache.tensor(table.column(name), name)[:, 0].float() for name in ("mean", "std"))
    captions = [caption_list(value)[0] for value in table.column("captions").to_pylist()]
    logger.info(f"{len(captions)} held-out images for the validation loss (latent cache {cache.folder})")
    return HeldOutImages(mean, std, captions, rows.select(table.column("row").to_pylist()), config)


def evaluation_due(config: UNetConfig | DistillConfig, step: int) -> bool:
    return config.evaluation_steps is not None and step % config.evaluation_steps == 0


def log_held_out(accelerator: Accelerator, held_out: HeldOutImages, step: int, loss: Callable[[], HeldOutLoss],
                 bound: Callable[[], LikelihoodBound] | None = None,
                 kid_now: Callable[[], MetricResult] | None = None) -> dict:
    """Compute, log and return the held-out numbers at `step` (main process only): `loss()`, and `bound()` and
    `kid_now()` when given, each timed. A bound that does not apply to the model (a flow model's) is reported as
    skipped, with the reason, in the log and in the returned numbers."""
    start = time.perf_counter()
    result = loss()
    held_out.record(result.loss, step)
    numbers = {"validation/loss": result.loss, "validation/seconds": time.perf_counter() - start}
    numbers |= {f"validation/loss_by_timestep/bin_{b:02d}": value for b, value in result.by_bin.items()}
    message = f"step {step}: held-out loss {result.loss:.5f} over {result.count} images"
    skipped = None
    if bound is not None:
        start = time.perf_counter()
        try:
            measured = bound()
        except BoundUndefined as reason:
            skipped = str(reason)
            message += f"; latent bits/dim skipped: {skipped}"
        else:
            numbers |= {"validation/latent_bits_per_dim": measured.bits_per_dim,
                        "validation/latent_bits_per_dim_se": measured.standard_error,
                        "validation/bound_seconds": time.perf_counter() - start}
            message += f"; latent bits/dim {measured.bits_per_dim:.4f} ± {measured.standard_error:.4f}"
    if kid_now is not None:
        start = time.perf_counter()
        distance = kid_now()
        numbers |= {"validation/kid": distance.value, "validation/kid_std": distance.std,
                    "validation/kid_seconds": time.perf_counter() - start}
        message += f"; {distance.name} {distance.value:.4f} ± {distance.std:.4f} ({distance.count} images)"
    accelerator.log(numbers, step=step)
    logger.info(message)
    return numbers if skipped is None else {**numbers, "validation/latent_bits_per_dim_skipped": skipped}


def log_distillation_loss(accelerator: Accelerator, held_out: HeldOutImages | None, teacher: LatentDiffusionPipeline,
                          student: torch.nn.Module, losses: DistillationLosses, step: int) -> dict:
    """A distillation method's held-out loss (main process only), with the student in eval mode."""
    if held_out is None or not accelerator.is_main_process:
        return {}
    was_training = student.training
    student.eval()
    try:
        return log_held_out(accelerator, held_out, step, lambda: held_out.distillation_loss(teacher, losses))
    finally:
        student.train(was_training)


def summary(held_out: HeldOutImages | None, final: dict) -> dict:
    """The run's held-out numbers for metrics.json: the final loss and bound, and the best step."""
    if held_out is None or not final:
        return {}
    best_loss, best_step = held_out.best()
    numbers = {"validation_loss": final["validation/loss"], "validation_loss_seconds": final["validation/seconds"],
               "best_validation_loss": best_loss, "best_validation_step": best_step}
    if "validation/kid" in final:
        numbers |= {"kid": final["validation/kid"], "kid_std": final["validation/kid_std"]}
    if "validation/latent_bits_per_dim" in final:
        numbers |= {"latent_bits_per_dim": final["validation/latent_bits_per_dim"],
                    "latent_bits_per_dim_se": final["validation/latent_bits_per_dim_se"],
                    "bound_seconds": final["validation/bound_seconds"]}
    if "validation/latent_bits_per_dim_skipped" in final:
        numbers["latent_bits_per_dim_skipped"] = final["validation/latent_bits_per_dim_skipped"]
    return {name: value for name, value in numbers.items() if not (isinstance(value, float) and math.isnan(value))}
