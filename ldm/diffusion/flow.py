"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3) as
diffusers' SD3 scripts train it: x_t = (1 − σ)·x₀ + σ·ε, the model learns the velocity ε − x₀, and its
timestep input is σ·T (σ·1000 on the default schedule).

Training keeps drawing integer timesteps t ∈ {0, ..., T−1} (ldm/diffusion/timesteps.py, so the per-bin
losses and importance sampling work unchanged) and maps them to σ_t = shift((t + 1)/T): the grid
FlowMatchEulerDiscreteScheduler holds, from shift(1/T) (nearly clean) to exactly 1 (pure noise). The
shift σ' = s·σ / (1 + (s − 1)·σ) (SD3 §5.3.2) moves the draws towards noise for s > 1.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

FLOW_PREDICTION = "flow_prediction"  # diffusers' prediction_type for the velocity ε − x₀


def shifted(sigmas, shift: float):
    """σ' = s·σ / (1 + (s − 1)·σ): the same map diffusers' flow schedulers apply (`shift`, `flow_shift`)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigmas(timesteps: torch.Tensor, num_train_timesteps: int, shift: float) -> torch.Tensor:
    """σ of each integer training timestep: shift((t + 1)/T), in float32 on the timesteps' device."""
    return shifted((timesteps.float() + 1) / num_train_timesteps, shift)


def flow_scheduler(num_train_timesteps: int, shift: float) -> DPMSolverMultistepScheduler:
    """The saved pipeline's sampler: DPM-Solver++ (2M) on flow sigmas with the training shift. It keeps the
    standard interface (init_noise_sigma, scale_model_input, add_noise), so diffusers' StableDiffusion
    pipelines sample the folder as it is. steps_offset=1: StableDiffusionPipeline rewrites any other value."""
    return DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type=FLOW_PREDICTION,
                                       use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++",
                                       solver_order=2, steps_offset=1)


def flow_shift_of(config) -> float | None:
    """The shift of a flow scheduler's config; None for a scheduler of a DDPM-type (ε, v, x₀) model.

    DPM-Solver, UniPC and DEIS say `use_flow_sigmas` and `flow_shift`; the FlowMatch schedulers, the only
    diffusers schedulers with a `shift` option, say `shift`."""
    if config.get("use_flow_sigmas"):
        return config.get("flow_shift", 1.0)
    return config.get("shift")


def is_flow_match(scheduler) -> bool:
    """The FlowMatch schedulers, which lack init_noise_sigma, scale_model_input and add_noise."""
    return isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler))


def set_flow_match_timesteps(scheduler, num_inference_steps: int, device) -> None:
    """The FlowMatch schedulers' timesteps, on the trained σ range [shift(1/T), 1].

    Their own `set_timesteps(n)` spaces σ between the already shifted σ_min and σ_max and then shifts
    again, so σ_min comes out shifted twice (diffusers#13243, still in 0.42.1). Euler takes the unshifted
    sigmas explicitly; Heun takes no `sigmas=`, so it is given its unshifted σ_min for the call."""
    num_train_timesteps = scheduler.config.num_train_timesteps
    unshifted = np.linspace(1.0, 1 / num_train_timesteps, num_inference_steps)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=unshifted, device=device)
        return
    shifted_min = scheduler.sigma_min
    scheduler.sigma_min = 1 / num_train_timesteps
    try:
        scheduler.set_timesteps(num_inference_steps, device=device)
    finally:
        scheduler.sigma_min = shifted_min
