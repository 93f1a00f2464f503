"""The arithmetic of latent consistency distillation (Luo et al. 2023, arXiv 2310.04378), as plain
functions that ldm/training/distill.py's loop and the tests share: the guidance embedding, the student built
from its teacher, the boundary scalings, and the skipping-step DDIM solver.

Guidance follows the pipelines' convention: a user's scale g combines the conditional and
unconditional predictions as u + g (c − u), and the UNet is told g − 1 (`timestep_cond`).
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel

from ldm.diffusion.objective import per_sample

SIGMA_DATA = 0.5  # the data's standard deviation the boundary scalings assume, as LCMScheduler does


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N×dim) of g − 1 for each scale g, the `timestep_cond` that diffusers'
    pipelines pass to a UNet with `time_cond_proj_dim` (VDM's embedding of 1000·w)."""
    w = (guidance_scale.float() - 1.0) * 1000.0
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32,
                                                                           device=w.device))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))


def student_from(teacher: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance input (`time_cond_proj_dim`) whose projection starts at
    zero, so that before any training the student computes exactly what the teacher computes."""
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError(f"the teacher's UNet already has a guidance input (time_cond_proj_dim "
                         f"{teacher.config.time_cond_proj_dim}): it is distilled already")
    # without "_use_default_values", which would put back the default (None) of a field it names
    config = {key: value for key, value in teacher.config.items() if key != "_use_default_values"}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"teacher and student differ beyond the guidance input: missing {missing}, "
                           f"unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.dtype)


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of f(x, t) = c_skip·x + c_out·x̂₀, with c_skip(0) = 1 and c_out(0) = 0 so that
    f is the identity at the boundary; as LCMScheduler computes them, timesteps scaled by
    `timestep_scaling` so that the boundary region is narrow."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def clean_and_noise(prediction: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor,
                    prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents x̂₀ and the noise ε̂ that a UNet's `prediction` at x_t implies."""
    alpha, sigma = per_sample(alpha_cumprod.sqrt(), sample), per_sample((1 - alpha_cumprod).sqrt(), sample)
    if prediction_type == "epsilon":
        return (sample - sigma * prediction) / alpha, prediction
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * prediction, alpha * prediction + sigma * sample
    if prediction_type == "sample":
        return prediction, (sample - alpha * prediction) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample")


class DDIMSolver:
    """Deterministic DDIM steps on a grid of `num_ddim_timesteps` of the teacher's training timesteps.

    The grid is k−1, 2k−1, …, T−1 with k = T / num_ddim_timesteps; one step goes from a grid point t to
    max(t − k, 0), the step DDIMScheduler (eta 0, `set_alpha_to_one` false) takes with that many
    inference steps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        train_timesteps = len(alphas_cumprod)
        if not 1 <= num_ddim_timesteps <= train_timesteps:
            raise ValueError(f"num_ddim_timesteps must be in [1, {train_timesteps}], got {num_ddim_timesteps}")
        self.skip = train_timesteps // num_ddim_timesteps
        self.timesteps = (torch.arange(1, num_ddim_timesteps + 1) * self.skip).round().long() - 1
        self.alphas_cumprod = alphas_cumprod.float()

    def draw(self, count: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` grid points t and the points t − k one step below them."""
        index = torch.randint(0, len(self.timesteps), (count,), generator=generator, device=device)
        start = self.timesteps.to(device)[index]
        return start, (start - self.skip).clamp(min=0)

    def alpha_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(timesteps.device)[timesteps]

    def step(self, clean: torch.Tensor, noise: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """x at the `previous` timesteps from the predicted x̂₀ and ε̂ (DDIM with eta 0)."""
        return ddim_step(clean, noise, self.alpha_cumprod(previous))


def ddim_step(clean: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM update: x at the timestep whose ᾱ is `alpha_cumprod`, from x̂₀ and ε̂."""
    return per_sample(alpha_cumprod.sqrt(), clean) * clean + per_sample((1 - alpha_cumprod).sqrt(), clean) * noise
