"""A trained model's noise path x_t = α_t·x₀ + σ_t·ε, as distillation steps along it: a DDPM schedule (ε, v or
x₀ prediction; α_t² = ᾱ_t) or a rectified flow (α = 1 − σ). Distillation needs four things of a path: the
coefficients at a point, the model's timestep input there, the points its methods train on, and the few-step
sampler that samples a student exactly as it was trained.

A point is an integer training timestep on a DDPM path, with −1 the clean image (DDIM's `set_alpha_to_one`).
On a flow path it is the unshifted position u ∈ [0, 1 − 1/T], σ = shift(u), with 0 the clean image: the grid
DPM-Solver's flow sigmas are drawn from, so that n steps from u = 1 − 1/T down to 0 nest inside 2n of them.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from ldm.diffusion import flow
from ldm.diffusion.objective import per_sample


def clean_and_noise(prediction: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                    prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents x̂₀ and the noise ε̂ that a model's `prediction` at x_t = α·x₀ + σ·ε implies."""
    alpha, sigma = per_sample(alpha, sample), per_sample(sigma, sample)
    if prediction_type == "epsilon":
        return (sample - sigma * prediction) / alpha, prediction
    if prediction_type == "v_prediction":  # α² + σ² = 1
        return alpha * sample - sigma * prediction, alpha * prediction + sigma * sample
    if prediction_type == "sample":
        return prediction, (sample - alpha * prediction) / sigma
    if prediction_type == flow.FLOW_PREDICTION:  # the velocity ε − x₀, α + σ = 1
        return sample - sigma * prediction, sample + alpha * prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample, "
                     f"{flow.FLOW_PREDICTION}")


def ddim_step(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM update to the point with coefficients (α, σ): α·x̂₀ + σ·ε̂. On a flow path it is
    exactly an Euler step of the flow ODE, x + (σ' − σ)·v."""
    return per_sample(alpha, clean) * clean + per_sample(sigma, clean) * noise


class DDPMPath:
    """A DDPM noise schedule's path, on its integer training timesteps."""

    is_flow = False
    progressive_prediction_type = "v_prediction"  # epsilon breaks at a few steps (Salimans & Ho 2022)

    def __init__(self, scheduler_config):
        self.scheduler_config = scheduler_config
        self.prediction_type = scheduler_config["prediction_type"]
        self.alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.float()
        self.train_timesteps = len(self.alphas_cumprod)

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) = (√ᾱ, √(1 − ᾱ)) at `timesteps`, with ᾱ = 1 below 0."""
        table = self.alphas_cumprod.to(timesteps.device)
        alpha_cumprod = torch.where(timesteps >= 0, table[timesteps.clamp(min=0)], 1.0)
        return alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def check_solver_steps(self, num_ddim_timesteps: int) -> None:
        if not 1 <= num_ddim_timesteps <= self.train_timesteps:
            raise ValueError(f"num_ddim_timesteps must be in [1, {self.train_timesteps}], got {num_ddim_timesteps}")

    def solver_grid(self, num_ddim_timesteps: int) -> torch.Tensor:
        """k−1, 2k−1, …, T−1 with k = T / num_ddim_timesteps: LCMScheduler's grid, and the LCM solver's."""
        self.check_solver_steps(num_ddim_timesteps)
        skip = self.train_timesteps // num_ddim_timesteps
        return torch.arange(1, num_ddim_timesteps + 1) * skip - 1

    def consistency_pairs(self, count: int, num_ddim_timesteps: int, generator, device):
        """`count` grid points t and the points max(t − k, 0) one DDIM solver step below them."""
        grid = self.solver_grid(num_ddim_timesteps).to(device)
        start = grid[torch.randint(0, len(grid), (count,), generator=generator, device=device)]
        return start, (start - self.train_timesteps // num_ddim_timesteps).clamp(min=0)

    def consistency_output(self, clean: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                           timestep_scaling: float) -> torch.Tensor:
        """f(x, t) = c_skip(t)·x + c_out(t)·x̂₀, the same arithmetic as LCMScheduler.step."""
        c_skip, c_out = boundary_scalings(timesteps, timestep_scaling)
        return per_sample(c_skip, sample) * sample + per_sample(c_out, sample) * clean

    def progressive_points(self, steps: int, count: int, generator, device):
        """Points t of DDIMScheduler's trailing grid at `steps` steps, and the points half and one step below."""
        start = trailing_timesteps(steps, self.train_timesteps).to(device)[
            torch.randint(0, steps, (count,), generator=generator, device=device)]
        jump = self.train_timesteps // steps  # DDIMScheduler's step from t at `steps` steps
        return start, start - jump // 2, start - jump

    def consistency_sampler(self, num_ddim_timesteps: int, timestep_scaling: float) -> LCMScheduler:
        """An LCMScheduler on this schedule, its grid the solver's."""
        return LCMScheduler.from_config(self.scheduler_config, original_inference_steps=num_ddim_timesteps,
                                        timestep_scaling=timestep_scaling)

    def progressive_sampler(self) -> DDIMScheduler:
        """DDIM (v-prediction, trailing timesteps, last step to x₀): a student samples in the steps it learnt."""
        return DDIMScheduler.from_config(self.scheduler_config, prediction_type=self.progressive_prediction_type,
                                         timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


class FlowPath:
    """A rectified flow's path, on unshifted positions u: σ = shift(u), α = 1 − σ."""

    is_flow = True
    prediction_type = progressive_prediction_type = flow.FLOW_PREDICTION

    def __init__(self, scheduler_config):
        self.shift = flow.flow_shift_of(scheduler_config)
        self.train_timesteps = scheduler_config["num_train_timesteps"]
        self.top = 1 - 1 / self.train_timesteps  # DPM-Solver's first flow point, before the shift

    def coefficients(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = flow.shifted(positions.float(), self.shift)
        return 1 - sigma, sigma

    def model_timesteps(self, positions: torch.Tensor) -> torch.Tensor:
        """σ·T, as the flow trainer feeds the model (ldm/diffusion/objective.py's model_timesteps)."""
        return flow.shifted(positions.float(), self.shift) * self.train_timesteps

    def check_solver_steps(self, num_ddim_timesteps: int) -> None:
        if num_ddim_timesteps < 1:
            raise ValueError(f"num_ddim_timesteps must be 1 or more, got {num_ddim_timesteps}")

    def consistency_pairs(self, count: int, num_ddim_timesteps: int, generator, device):
        """`count` positions u drawn uniformly from (0, 1 − 1/T], and u − (1 − 1/T)/num_ddim_timesteps, or 0.

        Uniform rather than on a grid: the student is sampled on DPM-Solver's flow points at any step count,
        and those of 3 or 7 steps lie on no fixed grid."""
        start = self.top * (1 - torch.rand(count, generator=generator, device=device))
        return start, (start - self.top / num_ddim_timesteps).clamp(min=0)

    def consistency_output(self, clean: torch.Tensor, sample: torch.Tensor, positions: torch.Tensor,
                           timestep_scaling: float) -> torch.Tensor:
        """f(x, σ) = x̂₀ = x − σ·v̂: the identity at σ = 0 by construction, so no boundary scalings are needed,
        and what a one-step-to-x₀ DDIM (DPM-Solver++ first order) sampler returns."""
        return clean

    def progressive_points(self, steps: int, count: int, generator, device):
        """Positions u = (1 − 1/T)·k/steps, k = 1 … steps (DPM-Solver's flow grid at `steps` steps), and the
        positions half a step and one step below."""
        k = torch.randint(1, steps + 1, (count,), generator=generator, device=device)
        start, step = self.top * k / steps, self.top / steps
        return start, start - step / 2, start - step

    def sampler(self) -> DPMSolverMultistepScheduler:
        """First-order DPM-Solver++ on flow sigmas, to σ = 0 at the end: each step is the DDIM (Euler) step the
        students learnt, on the points they learnt, and diffusers' StableDiffusion pipelines run it unchanged."""
        return DPMSolverMultistepScheduler(num_train_timesteps=self.train_timesteps,
                                           prediction_type=flow.FLOW_PREDICTION, use_flow_sigmas=True,
                                           flow_shift=self.shift, algorithm_type="dpmsolver++", solver_order=1,
                                           final_sigmas_type="zero", steps_offset=1)

    def consistency_sampler(self, num_ddim_timesteps: int, timestep_scaling: float) -> DPMSolverMultistepScheduler:
        return self.sampler()

    def progressive_sampler(self) -> DPMSolverMultistepScheduler:
        return self.sampler()


def path_of(scheduler_config) -> DDPMPath | FlowPath:
    """The noise path of the model a pipeline's scheduler config samples."""
    return FlowPath(scheduler_config) if flow.flow_shift_of(scheduler_config) is not None else DDPMPath(
        scheduler_config)


SIGMA_DATA = 0.5  # the data's standard deviation the boundary scalings assume, as LCMScheduler does


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of f(x, t) = c_skip·x + c_out·x̂₀, with c_skip(0) = 1 and c_out(0) = 0 so that
    f is the identity at the boundary; as LCMScheduler computes them, timesteps scaled by
    `timestep_scaling` so that the boundary region is narrow."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def trailing_timesteps(steps: int, train_timesteps: int) -> torch.Tensor:
    """The timesteps DDIMScheduler samples at with `timestep_spacing="trailing"`, first to last."""
    return (torch.arange(train_timesteps, 0, -train_timesteps / steps).round() - 1).long()
