"""A pipeline's denoising numbers on held-out images: the loss at fixed draws, and the latent bits/dim
bound. The trainers log them as they train (ldm/training/evaluation.py); `python -m ldm.evaluate`
reports them for a saved model. Both condition the UNet on each image's own caption, without guidance."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.data.captions import text_states, tokenize
from ldm.diffusion.objective import normalise_latents
from ldm.evaluation.held_out import HeldOutLoss, HeldOutSet
from ldm.evaluation.likelihood import LikelihoodBound, check_bound_applies, unet_predictor, variational_bound
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline


def caption_embeddings(pipeline: LatentDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    ids = tokenize(pipeline.tokenizer, captions).to(pipeline.device)
    with torch.no_grad():
        return text_states(pipeline.text_encoder, ids, pipeline.text_padding_eos).float()


@torch.no_grad()
def posteriors(pipeline: LatentDiffusionPipeline, pixel_values: torch.Tensor,
               batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior of images in [-1, 1], as the trainers' caches hold them."""
    means, stds = [], []
    for batch in pixel_values.split(batch_size):
        posterior = pipeline.vae.encode(batch.to(pipeline.device, pipeline.vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def held_out_loss(pipeline: LatentDiffusionPipeline, scheduler: SchedulerMixin, mean: torch.Tensor,
                  std: torch.Tensor, captions: list[str], seed: int, bins: int) -> HeldOutLoss:
    """The training loss of `pipeline`'s UNet on the images' posteriors, at draws fixed by `seed`."""
    held_out = HeldOutSet.from_posterior(mean.to(pipeline.device), std.to(pipeline.device),
                                         caption_embeddings(pipeline, captions), scheduler, pipeline.vae.config,
                                         seed=seed, bins=min(bins, scheduler.config.num_train_timesteps))
    return held_out.evaluate(unet_predictor(pipeline.denoiser))


def latent_bound(pipeline: LatentDiffusionPipeline, scheduler: SchedulerMixin, mean: torch.Tensor,
                 captions: list[str], strata: int, seed: int) -> LikelihoodBound:
    """Latent bits/dim of the posterior means under `pipeline`'s UNet: a bound on the density of the latents of
    this VAE, which moves with its scaling_factor and shift_factor (the result carries both). A flow model has
    none: BoundUndefined says so before any model runs."""
    check_bound_applies(scheduler.config.prediction_type)
    vae = pipeline.vae.config
    latents = normalise_latents(mean.to(pipeline.device), vae)
    strata = min(strata, scheduler.config.num_train_timesteps - 1)  # a short schedule has fewer timesteps
    return variational_bound(unet_predictor(pipeline.denoiser), latents, scheduler, strata=strata, seed=seed,
                             conditioning=caption_embeddings(pipeline, captions),
                             scaling_factor=vae.scaling_factor, shift_factor=vae.get("shift_factor"))
