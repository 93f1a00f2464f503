"""A bound on the negative log-likelihood of latents: the discrete-time variational bound of a DDPM, in bits/dim.

    −log p(z) ≤ L_prior + Σ_{t=1}^{T−1} L_t + L_dec                          (Ho et al. 2020, eq. 5)

in diffusers' conventions: timesteps 0..T−1, ᾱ_t the scheduler's cumulative alphas, ᾱ_{−1} = 1, and
z_t = √ᾱ_t z + √(1−ᾱ_t) ε. The model enters only through its estimate of the clean latent, x̂₀(z_t, t),
obtained from an ε-, v- or x₀-prediction with diffusers' `pred_original_sample` formulas, never clipped
(clipping to [−1, 1] is for pixels; latents are unbounded).

- L_prior = KL(q(z_{T−1} | z) ‖ N(0, I)): needs no model call; 0 under a zero-terminal-SNR schedule.
- L_t = KL(q(z_{t−1} | z_t, z) ‖ p(z_{t−1} | z_t)): both Gaussian. The posterior is N(c1·z + c2·z_t, β̃_t) and the
  model is N(c1·x̂₀ + c2·z_t, σ_t²) (Ho et al. 2020, eqs. 6–7), so the KL is closed-form given z_t.
- L_dec = −log N(z; x̂₀(z_0, 0), σ_0²): a continuous Gaussian decoder, since latents are continuous
  (improved-diffusion's discretised decoder is for 8-bit pixels).

Reverse variances σ_t² (Ho et al. 2020, §3.2):
- "fixed_large", σ_t² = β_t and σ_0² = β_0: the default. For Gaussian data it makes the model's reverse chain the
  true one, so the bound is then exactly −log p(z), which gives the tests an exact oracle.
- "fixed_small", σ_t² = β̃_t: the posterior's own variance. β̃_0 = 0, so the decoder uses β̃_1, as
  improved-diffusion's `posterior_log_variance_clipped` does.

The sum over t is estimated by stratified sampling: K contiguous strata of 1..T−1, one uniform t per stratum per
sample, weighted by the stratum's size. That is unbiased for any strata; their spacing sets the noise. Or it is
computed in full with `strata=None` (T−1 model calls per sample).

Why the strata are log-spaced by default: L_t falls steeply and roughly as 1/t. On SD's 1000-step schedule, for the
Gaussian oracle, L_t ≈ 0.5 bits/dim at t=1, 0.07 at t=10, 0.0085 at t=100, 0.0013 at t=500 (t·L_t stays within
0.5–0.85), and a third of Σ_t L_t ≈ 5.1 sits in t < 10. An equal-width stratum [1, 20] (K = 50) draws t=1 one time
in 20 and then weights it ×20: each sample's estimate is heavily right-skewed, the mean over samples is usually low
(1.92 ± 0.047 against an exact 2.047 was measured at K = 50) and its standard error understates the error; equal
width behaves only from K ≈ 100. A stratum [a, r·a] of a 1/t curve contributes a variance that does not depend on
a, so geometric strata (constant ratio r) spread the noise evenly; where a geometric stratum would hold under ~1.5
steps it is a single timestep, summed exactly (`strata_edges`). On the oracle with 1000 samples of 16 dims: log K =
16 gives SE ≈ 0.018 and K = 32 SE ≈ 0.015 bits/dim (about half of either is the spread of −log p(z) itself),
equal-width K = 32 SE ≈ 0.10; over 200 seeds both log estimates are unbiased and their SE matches their spread.
`spacing="uniform"` keeps the equal-width strata.

`standard_error` is the standard error of the mean over samples: every sample has its own z, its own t in each
stratum and its own noise, so the per-sample estimates are independent and their spread covers the data and the
Monte-Carlo noise of the draws together (with `strata=None`, only the data and the noise).

**The number is "latent bits/dim".** It bounds the density of the diffusion-space latents z = (x − shift)·scale
of a fixed VAE, per latent dimension. It is a density, not a code length (it can be negative), it is not
comparable with pixel bits/dim, and it depends on the VAE's normalisation: z' = s·z moves it by +log2 s
(s = 0.18215 moves it by −2.457). Compare checkpoints only on the same VAE, scale, shift and held-out latents,
and report the `scaling_factor` and `shift_factor` that the result carries.

Every term is computed in float64; the model sees z_t in the dtype of the latents given.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from diffusers import DDPMScheduler

from ldm.diffusion.objective import per_sample
from ldm.models.denoiser import denoise

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCES = ("fixed_large", "fixed_small")
SPACINGS = ("log", "uniform")  # of the strata over t = 1..T−1

Predict = Callable[..., torch.Tensor]  # predict(noisy_latents, timesteps[, embeddings]) -> prediction
NO_FLOW_BOUND = ("the latent bits/dim bound is a DDPM's discrete-time variational bound, and a flow_prediction "
                 "model has no beta schedule to take it over (its likelihood needs the probability-flow ODE's "
                 "change of variables, which is not implemented)")


class BoundUndefined(ValueError):
    """The bound does not apply to the model; the message says why (callers report it as skipped)."""


def check_bound_applies(prediction_type: str) -> None:
    if prediction_type == "flow_prediction":
        raise BoundUndefined(NO_FLOW_BOUND)


class LikelihoodBound(NamedTuple):
    """The negative ELBO per latent dimension, in bits, with its parts (prior + steps + decoder = bits_per_dim)."""

    bits_per_dim: float
    standard_error: float  # of the mean over the samples' independent estimates (see the module); nan for one
    prior: float
    steps: float
    decoder: float
    samples: int
    timesteps_per_sample: int  # model calls per sample: the strata (or T−1) plus the decoder's t=0
    variance: str
    scaling_factor: float | None  # the VAE normalisation the latents were made with, as the caller gave it
    shift_factor: float | None
    per_sample: torch.Tensor  # each sample's estimate in bits/dim (float64), for paired comparisons


def paired_difference(bound: LikelihoodBound, baseline: LikelihoodBound) -> tuple[float, float]:
    """`bound` − `baseline` in bits/dim and its standard error, from the per-sample differences. Two models
    scored with the same seed see the same timesteps and noise, so most of each estimate's noise cancels:
    the difference is known far better than either standard error suggests."""
    if bound.per_sample.shape != baseline.per_sample.shape:
        raise ValueError(f"paired bounds need the same samples: {bound.samples} against {baseline.samples}")
    differences = bound.per_sample - baseline.per_sample
    error = (differences.std() / math.sqrt(bound.samples)).item() if bound.samples > 1 else float("nan")
    return differences.mean().item(), error


def unet_predictor(unet: torch.nn.Module, embeddings: torch.Tensor | None = None) -> Predict:
    """`predict(noisy, timesteps, embeddings=None)` from a UNet (or a transformer, ldm/models/denoiser.py): one
    conditional call, no classifier-free guidance (the bound is for −log p(z | c) itself). The fixed `embeddings`
    (one caption, [1, L, C] or [L, C], or one row per sample) are used when a call passes none."""
    fixed = embeddings

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        rows = fixed if embeddings is None else embeddings
        if rows is None:
            raise ValueError("the UNet needs caption embeddings: give unet_predictor fixed ones or pass them per call")
        if rows.dim() == 2:
            rows = rows.unsqueeze(0)
        if rows.shape[0] == 1:
            rows = rows.expand(noisy.shape[0], *rows.shape[1:])
        return denoise(unet, noisy.to(unet.dtype), timesteps, rows.to(unet.device, unet.dtype))

    return predict


def schedule_float64(scheduler: DDPMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, β_t) in float64. ᾱ is recomputed as the float64 product of (1 − β) rather than cast from diffusers'
    float32 `alphas_cumprod` (which differs by ~5e-7), so α_t = 1 − β_t = ᾱ_t/ᾱ_{t−1} holds exactly in the
    posterior coefficients."""
    betas = scheduler.betas.detach().to(torch.float64).cpu()
    return torch.cumprod(1 - betas, dim=0), betas


def x0_from_prediction(prediction_type: str, prediction: torch.Tensor, noisy: torch.Tensor,
                       alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂₀ from a model output, as diffusers' DDPMScheduler computes `pred_original_sample`; not clipped."""
    alpha_bar = per_sample(alpha_bar, noisy)
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def prior_nats(latents: torch.Tensor, alpha_bar_last: torch.Tensor) -> torch.Tensor:
    """KL(N(√ᾱ z, 1−ᾱ) ‖ N(0, 1)) summed over each sample's dimensions, at ᾱ = ᾱ_{T−1}."""
    a = alpha_bar_last
    per_dim = 0.5 * (a * latents.square() + (1 - a) - torch.log1p(-a) - 1)
    return per_dim.flatten(1).sum(dim=1)


def posterior(alpha_bar: torch.Tensor, betas: torch.Tensor, t: torch.Tensor):
    """(c1, c2, β̃) of q(z_{t−1} | z_t, z) = N(c1·z + c2·z_t, β̃) at timesteps t ≥ 1 (Ho et al. 2020, eq. 7)."""
    previous = alpha_bar[t - 1]
    beta, now = betas[t], alpha_bar[t]
    c1 = beta * previous.sqrt() / (1 - now)
    c2 = (1 - previous) * (1 - beta).sqrt() / (1 - now)
    return c1, c2, beta * (1 - previous) / (1 - now)


def reverse_variance(variance: str, alpha_bar: torch.Tensor, betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """σ_t² of the model's p(z_{t−1} | z_t) (t ≥ 1) or of the decoder (t = 0)."""
    if variance == "fixed_large":
        return betas[t]  # σ_0² = β_0 = 1 − ᾱ_0
    if variance == "fixed_small":
        # β̃_0 = 0 would make the decoder a delta: use β̃_1 there, as improved-diffusion does.
        return posterior(alpha_bar, betas, t.clamp(min=1))[2]
    raise ValueError(f"variance {variance!r} is not one of {', '.join(VARIANCES)}")


def step_nats(latents: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
              betas: torch.Tensor, variance: str) -> torch.Tensor:
    """L_t = KL(N(μ̃, β̃_t) ‖ N(μ_θ, σ_t²)) summed over each sample's dimensions, with μ̃ − μ_θ = c1·(z − x̂₀)."""
    c1, _, beta_tilde = posterior(alpha_bar, betas, t)
    sigma2 = reverse_variance(variance, alpha_bar, betas, t)
    dims = latents[0].numel()
    constant = 0.5 * dims * (torch.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)
    error = (latents - x0_hat).square().flatten(1).sum(dim=1)
    return constant + 0.5 * c1.square() * error / sigma2


def decoder_nats(latents: torch.Tensor, x0_hat: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """−log N(z; x̂₀, σ_0²) summed over each sample's dimensions."""
    dims = latents[0].numel()
    error = (latents - x0_hat).square().flatten(1).sum(dim=1)
    return 0.5 * error / sigma2 + 0.5 * dims * torch.log(2 * math.pi * sigma2)


def strata_edges(strata: int, num_timesteps: int, spacing: str = "log") -> list[int]:
    """K + 1 integer edges 1 = e_0 < e_1 < … < e_K = T: stratum k is the timesteps e_k .. e_{k+1}−1, so the
    strata cover 1..T−1 once each and every stratum holds at least one step (K ≤ T−1).

    "uniform": near-equal sizes. "log": geometric in t. Each edge multiplies the last by the ratio that spreads
    what is left of [e_k, T] evenly over the strata left, rounded, but at least one step past it (and short enough
    to leave one step for each stratum after it). Where e_k·(r − 1) is under 1.5 this gives one-step strata — at
    K = 32, T = 1000, t = 1..7 each get their own — and beyond that ratios near constant (sizes 1, 1, …, 2, 3, …,
    143, 173). With K = T−1 either spacing is one step per stratum."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    if not 1 <= strata <= num_timesteps - 1:
        raise ValueError(f"strata {strata!r} must be an integer from 1 to T−1 = {num_timesteps - 1}")
    end = num_timesteps  # the edge past the last timestep, T−1
    if spacing == "uniform":
        return [1 + k * (end - 1) // strata for k in range(strata + 1)]
    edges = [1]
    for k in range(1, strata):
        low = edges[-1]
        target = round(low * (end / low) ** (1 / (strata - k + 1)))
        edges.append(min(max(target, low + 1), end - (strata - k)))
    return edges + [end]


def stratified_timesteps(samples: int, strata: int, num_timesteps: int, generator: torch.Generator,
                         spacing: str = "log") -> tuple[torch.Tensor, torch.Tensor]:
    """([samples, strata] timesteps, [strata] weights): the K contiguous strata of `strata_edges`, one uniform t
    per stratum per sample; each stratum's weight is its size, so Σ_k size_k·L_{t_k} is an unbiased estimate of
    Σ_t L_t whatever the spacing. With K = T−1 every stratum is one timestep and the estimate is the full sum."""
    edges = strata_edges(strata, num_timesteps, spacing)
    columns = [torch.randint(low, high, (samples,), generator=generator) for low, high in zip(edges, edges[1:])]
    sizes = torch.tensor([high - low for low, high in zip(edges, edges[1:])], dtype=torch.float64)
    return torch.stack(columns, dim=1), sizes


def check_bound_inputs(latents: torch.Tensor, scheduler: DDPMScheduler, strata: int | None, prediction_type: str,
                       variance: str, batch_size: int, conditioning: torch.Tensor | None,
                       spacing: str = "log") -> None:
    """Fail before the first model call, naming the bad value and what is valid."""
    check_bound_applies(prediction_type)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if variance not in VARIANCES:
        raise ValueError(f"variance {variance!r} is not one of {', '.join(VARIANCES)}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    if latents.dim() < 2 or latents.shape[0] < 1:
        raise ValueError(f"latents of shape {tuple(latents.shape)} hold no samples: give at least one, "
                         "as [samples, channels, height, width] (or [samples, dims])")
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise ValueError(f"latents contain {bad} NaN or infinite values: the bound needs finite latents")
    num_timesteps = len(scheduler.betas)
    if num_timesteps < 2:
        raise ValueError(f"the schedule has {num_timesteps} timestep(s): the bound needs at least 2")
    if strata is not None and (isinstance(strata, bool) or not isinstance(strata, int)
                               or not 1 <= strata <= num_timesteps - 1):
        raise ValueError(f"strata {strata!r} must be an integer from 1 to T−1 = {num_timesteps - 1} "
                         "(or None for the full sum over every timestep)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be a positive integer")
    if conditioning is not None and conditioning.shape[0] != latents.shape[0]:
        raise ValueError(f"conditioning has {conditioning.shape[0]} rows for {latents.shape[0]} latents: "
                         "give one row per latent")
    alpha_bar, _ = schedule_float64(scheduler)
    if prediction_type == "epsilon" and alpha_bar[-1] == 0:
        raise ValueError("the schedule has zero terminal SNR (ᾱ_{T−1} = 0), where an epsilon prediction gives "
                         "x̂₀ = (z_t − ε̂)/0 = ∞: use prediction_type v_prediction (or sample) with this schedule")


@torch.no_grad()
def variational_bound(predict: Predict, latents: torch.Tensor, scheduler: DDPMScheduler, *,
                      strata: int | None = 32, spacing: str = "log", variance: str = "fixed_large", seed: int = 0,
                      prediction_type: str | None = None, conditioning: torch.Tensor | None = None,
                      batch_size: int = 64, scaling_factor: float | None = None,
                      shift_factor: float | None = None) -> LikelihoodBound:
    """The negative ELBO of diffusion-space `latents` [N, ...] in latent bits/dim, averaged over the N samples.

    `predict(noisy, timesteps)` returns the model's output for the scheduler's prediction type (or
    `prediction_type`); with `conditioning` (one row per latent) it is called as `predict(noisy, timesteps,
    rows)`, which `unet_predictor` accepts. `strata` K gives K + 1 model calls per sample; None the full T-step sum.
    `spacing` is "log" (strata geometric in t: the default, accurate from K ≈ 16) or "uniform" (equal-width, which
    needs K ≳ 100 on a 1000-step schedule; see the module's note); it does not matter with `strata=None`.
    Timesteps and noise come from a private generator seeded with `seed` (the global RNG is not used), so every
    checkpoint is scored on the same draws; the same bits need the same thread count and `batch_size`.
    `scaling_factor` and `shift_factor` are the VAE normalisation the latents were made with: the bound depends
    on them (see the module's note) and the result carries them so that the number is never reported without.
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    check_bound_inputs(latents, scheduler, strata, prediction_type, variance, batch_size, conditioning, spacing)
    alpha_bar, betas = schedule_float64(scheduler)
    num_timesteps = len(betas)
    z = latents.detach().to(torch.float64).cpu()
    samples, dims = z.shape[0], z[0].numel()
    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on any device
    timesteps, sizes = stratified_timesteps(samples, strata or num_timesteps - 1, num_timesteps, generator, spacing)

    def model_x0(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        noisy = per_sample(alpha_bar[t], z).sqrt() * z + per_sample(1 - alpha_bar[t], z).sqrt() * noise
        return _x0_in_batches(predict, noisy, t, alpha_bar, prediction_type, latents, conditioning, batch_size)

    steps = torch.zeros(samples, dtype=torch.float64)
    for k in range(timesteps.shape[1]):
        t = timesteps[:, k]
        steps += sizes[k] * step_nats(z, model_x0(t), t, alpha_bar, betas, variance)
    zero = torch.zeros(samples, dtype=torch.long)
    decoder = decoder_nats(z, model_x0(zero), reverse_variance(variance, alpha_bar, betas, zero))
    prior = prior_nats(z, alpha_bar[-1])

    to_bits = 1 / (dims * math.log(2))
    total = (prior + steps + decoder) * to_bits
    error = (total.std() / math.sqrt(samples)).item() if samples > 1 else float("nan")
    return LikelihoodBound(bits_per_dim=total.mean().item(), standard_error=error,
                           prior=(prior.mean() * to_bits).item(), steps=(steps.mean() * to_bits).item(),
                           decoder=(decoder.mean() * to_bits).item(), samples=samples,
                           timesteps_per_sample=timesteps.shape[1] + 1, variance=variance,
                           scaling_factor=scaling_factor, shift_factor=shift_factor, per_sample=total)


def _x0_in_batches(predict: Predict, noisy: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                   prediction_type: str, latents: torch.Tensor, conditioning: torch.Tensor | None,
                   batch_size: int) -> torch.Tensor:
    """x̂₀ (float64, CPU) for every sample: the model sees z_t in the latents' dtype and device."""
    parts = []
    for start in range(0, noisy.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        model_in = noisy[rows].to(latents.device, latents.dtype)
        t_in = t[rows].to(latents.device)
        args = (model_in, t_in) if conditioning is None else (model_in, t_in, conditioning[rows])
        prediction = predict(*args)
        if prediction.shape != model_in.shape:
            raise ValueError(f"predict returned shape {tuple(prediction.shape)} for input {tuple(model_in.shape)}: "
                             "it must return one prediction of the input's shape")
        prediction = prediction.detach().to(torch.float64).cpu()
        if not torch.isfinite(prediction).all():
            raise ValueError(f"predict returned NaN or infinite values at timesteps {t[rows].unique().tolist()[:8]}")
        parts.append(x0_from_prediction(prediction_type, prediction, noisy[rows], alpha_bar[t[rows]]))
    return torch.cat(parts)
