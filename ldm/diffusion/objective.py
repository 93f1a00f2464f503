"""The denoising objective as plain functions: noise, targets, loss weights, loss by timestep."""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.diffusion import flow

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction"]
PREDICTION_TYPES = "epsilon, v_prediction, sample, flow_prediction"
# diffusers' SD3 loss weightings (training_utils.compute_loss_weighting_for_sd3), for flow only
WeightingScheme = Literal["none", "sigma_sqrt", "cosmap", "logit_normal"]


BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
SAMPLERS_KNOW = ("linear", "scaled_linear", "squaredcos_cap_v2")  # every diffusers sampler builds these itself


def noise_scheduler(prediction_type: PredictionType, zero_terminal_snr: bool = False,
                    beta_schedule: BetaSchedule = "scaled_linear", beta_start: float = 0.00085,
                    beta_end: float = 0.012, num_train_timesteps: int = 1000,
                    flow_shift: float = 1.0) -> SchedulerMixin:
    """The training schedule. For flow_prediction, the flow sampler the pipeline saves (ldm/diffusion/flow.py),
    whose config carries the shift; the betas do not apply. Otherwise the DDPM noise schedule: Stable
    Diffusion's scaled-linear one by default; linear (Ho et al. 2020), cosine (`squaredcos_cap_v2`, Nichol &
    Dhariwal 2021) or sigmoid (Jabri et al. 2022). Samplers are built from this config, so the saved
    pipeline samples on the same schedule. Only DDPMScheduler knows the sigmoid one, so its betas also go
    into the config as `trained_betas`, which every sampler reads instead of its own schedule.

    `zero_terminal_snr` rescales the betas so the last step is pure noise (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"); pair it with v-prediction.
    """
    if prediction_type == flow.FLOW_PREDICTION:
        return flow.flow_scheduler(num_train_timesteps, flow_shift)
    # steps_offset=1 and clip_sample=False are SD v1's values; StableDiffusionPipeline rewrites
    # others when it loads a folder, and would then draw other images than ours.
    options = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                   beta_end=beta_end, clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    if beta_schedule not in SAMPLERS_KNOW:
        options["trained_betas"] = DDPMScheduler(**options).betas.tolist()  # before any zero-SNR rescale
    return DDPMScheduler(**options, rescale_betas_zero_snr=zero_terminal_snr)


def trained_schedule(scheduler_config) -> SchedulerMixin:
    """The training schedule behind a pipeline's scheduler config, whichever sampler that config is of."""
    shift = flow.flow_shift_of(scheduler_config)
    if shift is not None:
        return flow.flow_scheduler(scheduler_config["num_train_timesteps"], shift)
    return DDPMScheduler.from_config(scheduler_config)


def objective_of(scheduler_config) -> tuple[str, float]:
    """(prediction type, flow shift) of the model a pipeline's scheduler config samples; epsilon for None (no
    pipeline). A FlowMatch scheduler's config says no prediction type: its shift marks it as flow."""
    shift = None if scheduler_config is None else flow.flow_shift_of(scheduler_config)
    if shift is not None:
        return flow.FLOW_PREDICTION, shift
    return (scheduler_config or {}).get("prediction_type", "epsilon"), 1.0


def is_flow(scheduler: SchedulerMixin) -> bool:
    return scheduler.config.get("prediction_type") == flow.FLOW_PREDICTION


def sigmas(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """A flow schedule's σ at each integer training timestep."""
    return flow.training_sigmas(timesteps, scheduler.config.num_train_timesteps, scheduler.config.flow_shift)


def sample_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise, plus a per-channel constant of size `offset` (Guttenberg 2023, "Diffusion
    with offset noise"), which lets the model learn to change an image's overall brightness."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                             dtype=latents.dtype, device=latents.device)
    return noise


def noised(scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           input_perturbation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t from x_0. With `input_perturbation`, x_t uses slightly different noise than the target,
    which reduces the train/test exposure bias (Ning et al. 2023, "Input Perturbation Reduces
    Exposure Bias in Diffusion Models")."""
    if input_perturbation:
        noise = noise + input_perturbation * torch.randn(noise.shape, generator=generator,
                                                         dtype=noise.dtype, device=noise.device)
    if is_flow(scheduler):
        sigma = per_sample(sigmas(scheduler, timesteps), latents)
        return (1 - sigma) * latents + sigma * noise
    return scheduler.add_noise(latents, noise, timesteps)


def model_timesteps(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep input: t itself, or for flow σ_t·T (floats), as flow samplers pass it."""
    if is_flow(scheduler):
        return sigmas(scheduler, timesteps) * scheduler.config.num_train_timesteps
    return timesteps


def target(scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == flow.FLOW_PREDICTION:
        return noise - latents
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type {kind!r} is not one of {PREDICTION_TYPES}")


def snr(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep; ((1 - σ) / σ)² for flow."""
    if is_flow(scheduler):
        sigma = sigmas(scheduler, timesteps)
        return ((1 - sigma) / sigma).square()
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy").

    The recipe weights the x_0 error by min(SNR, gamma). Each prediction type's plain MSE already
    carries an implicit weight on that error: SNR for epsilon, SNR + 1 for v, 1 for sample, and 1/σ² for
    flow (x̂₀ = x_t − σ·v̂, so |v̂ − v|² = |x̂₀ − x₀|²/σ², and 1/σ² = (1 + √SNR)²). So the weight that turns
    each MSE into min(SNR, gamma)·|x_0 error|² is min(SNR, gamma) divided by it: for flow
    min(SNR, gamma)·σ² = min((1 − σ)², gamma·σ²), which is 0 at pure noise, as for v.
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR written as min(1, gamma / SNR): finite at zero terminal SNR too.
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    if prediction_type == "sample":
        return clipped
    if prediction_type == flow.FLOW_PREDICTION:
        return clipped / (1 + snr_values.sqrt()).square()
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def sd3_weights(sigma: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """diffusers' SD3 loss weights: `sigma_sqrt` σ⁻², `cosmap` 2 / (π(1 − 2σ + 2σ²)) (SD3 §3.1), else 1
    (`logit_normal` is a timestep density, drawn by the timestep sampler instead)."""
    if weighting_scheme == "sigma_sqrt":
        return sigma.float().pow(-2)
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float().square()))
    return torch.ones_like(sigma, dtype=torch.float32)


def loss_weights(scheduler: SchedulerMixin, timesteps: torch.Tensor, snr_gamma: float | None,
                 weighting_scheme: str = "none") -> torch.Tensor:
    """Each sample's loss weight: min-SNR-gamma's, or for flow an SD3 weighting (the two are not combined)."""
    if snr_gamma:
        return min_snr_weights(snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    if is_flow(scheduler):
        return sd3_weights(sigmas(scheduler, timesteps), weighting_scheme)
    return torch.ones(timesteps.shape, device=timesteps.device)


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


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per sample, shaped to broadcast over `like` [N, ...], in its dtype."""
    return values.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _on(value, like: torch.Tensor):
    return value.to(like) if isinstance(value, torch.Tensor) else value
