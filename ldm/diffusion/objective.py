"""The denoising objective as plain functions: noise, targets, loss weights, loss by timestep."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDPMScheduler

PredictionType = Literal["epsilon", "v_prediction", "sample"]


BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
SAMPLERS_KNOW = ("linear", "scaled_linear", "squaredcos_cap_v2")  # every diffusers sampler builds these itself


def noise_scheduler(prediction_type: PredictionType, zero_terminal_snr: bool = False,
                    beta_schedule: BetaSchedule = "scaled_linear", beta_start: float = 0.00085,
                    beta_end: float = 0.012, num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The DDPM noise schedule: Stable Diffusion's scaled-linear one by default; linear (Ho et al.
    2020), cosine (`squaredcos_cap_v2`, Nichol & Dhariwal 2021) or sigmoid (Jabri et al. 2022).
    Samplers are built from this config, so the saved pipeline samples on the same schedule. Only
    DDPMScheduler knows the sigmoid one, so its betas also go into the config as `trained_betas`,
    which every sampler reads instead of its own schedule.

    `zero_terminal_snr` rescales the betas so the last step is pure noise (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"); pair it with v-prediction.
    """
    # steps_offset=1 and clip_sample=False are SD v1's values; StableDiffusionPipeline rewrites
    # others when it loads a folder, and would then draw other images than ours.
    options = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                   beta_end=beta_end, clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    if beta_schedule not in SAMPLERS_KNOW:
        options["trained_betas"] = DDPMScheduler(**options).betas.tolist()  # before any zero-SNR rescale
    return DDPMScheduler(**options, rescale_betas_zero_snr=zero_terminal_snr)


def sample_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise, plus a per-channel constant of size `offset` (Guttenberg 2023, "Diffusion
    with offset noise"), which lets the model learn to change an image's overall brightness."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                             dtype=latents.dtype, device=latents.device)
    return noise


def noised(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           input_perturbation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t from x_0. With `input_perturbation`, x_t uses slightly different noise than the target,
    which reduces the train/test exposure bias (Ning et al. 2023, "Input Perturbation Reduces
    Exposure Bias in Diffusion Models")."""
    if input_perturbation:
        noise = noise + input_perturbation * torch.randn(noise.shape, generator=generator,
                                                         dtype=noise.dtype, device=noise.device)
    return scheduler.add_noise(latents, noise, timesteps)


def target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type {kind!r} is not one of epsilon, v_prediction, sample")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy").

    The recipe weights the x_0 error by min(SNR, gamma). Each prediction type's plain MSE already
    carries an implicit weight on that error: SNR for epsilon, SNR + 1 for v, 1 for sample. So the
    weight that turns each MSE into min(SNR, gamma)·|x_0 error|² is min(SNR, gamma) divided by it.
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR written as min(1, gamma / SNR): finite at zero terminal SNR too.
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def loss_by_timestep_bin(per_sample_loss: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
                         bins: int = 10) -> dict[int, tuple[float, int]]:
    """{bin: (summed loss, count)} over equal-width timestep bins: a cheap view of where the model
    is weak (high-noise bins learn composition, low-noise bins learn detail)."""
    bin_of = (timesteps.long() * bins // num_train_timesteps).clamp(max=bins - 1)
    totals = {}
    for b in bin_of.unique().tolist():
        in_bin = bin_of == b
        totals[b] = (per_sample_loss[in_bin].sum().item(), int(in_bin.sum()))
    return totals


def drop_conditioning(conditioning: torch.Tensor, empty: torch.Tensor, probability: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Swap each row (token ids or text embeddings) for the empty prompt's with `probability`, so
    one model learns both predictions that classifier-free guidance mixes (Ho & Salimans 2022)."""
    keep = torch.rand(conditioning.shape[0], generator=generator, device=conditioning.device) >= probability
    keep = keep.view(-1, *[1] * (conditioning.dim() - 1))
    return torch.where(keep, conditioning, empty.to(conditioning.dtype).expand_as(conditioning))


def latent_normalisation(vae_config) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(shift, scale) with diffusion-space latents = (z - shift) * scale, from a VAE's config:
    per-channel `latents_mean`/`latents_std` when set, else `shift_factor` and `scaling_factor`."""
    if vae_config.get("latents_mean") is not None and vae_config.get("latents_std") is not None:
        shift = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1)
        return shift, vae_config["scaling_factor"] / torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1)
    return vae_config.get("shift_factor") or 0.0, vae_config["scaling_factor"]


def normalise_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents to the unit-variance space the UNet is trained in."""
    shift, scale = latent_normalisation(vae_config)
    return (latents - _on(shift, latents)) * _on(scale, latents)


def denormalise_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of `normalise_latents`: what the VAE decoder takes."""
    shift, scale = latent_normalisation(vae_config)
    return latents / _on(scale, latents) + _on(shift, latents)


def _on(value, like: torch.Tensor):
    return value.to(like) if isinstance(value, torch.Tensor) else value
