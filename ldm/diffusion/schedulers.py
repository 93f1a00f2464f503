"""Swappable samplers: a short name (or a diffusers class name) → a diffusers scheduler built
from the pipeline's own scheduler config, so the noise schedule the model was trained with
(betas, prediction type, number of training steps; for a flow model its shift) carries over to
whichever sampler runs. A sampler that cannot run the model's kind (a DDPM-type sampler on a flow
model, or a FlowMatch one on an ε model) fails here, before anything is drawn.

The FlowMatch schedulers lack init_noise_sigma, scale_model_input and add_noise: the functions at the
end give every sampler the same interface, and flow ones their trained σ range.
"""

from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from ldm.config import ConfigError
from ldm.diffusion.flow import FLOW_PREDICTION, flow_shift_of, is_flow_match, set_flow_match_timesteps

# Short name → (class, options the name stands for). The options are set explicitly, so
# "dpm++2m" after a Karras-sigma config still means plain DPM-Solver++ 2M.
_DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, _DPMPP_2M),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, dict(_DPMPP_2M, use_karras_sigmas=True)),
    "unipc": (UniPCMultistepScheduler, {}),
    # for a consistency-distilled UNet (ldm/training/distill.py): a few steps, guidance as its input
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

FLOW_MATCH_CLASSES = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
# Samplers of flow_prediction models only (ldm/diffusion/flow.py).
FLOW_MATCH_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow_heun": (FlowMatchHeunDiscreteScheduler, {}),
}

# The class names diffusers itself declares interchangeable for an epsilon/v-prediction UNet
# (the `compatibles` of DDIM, Euler, ...), and the FlowMatch ones; other schedulers expect other model families.
CLASS_NAMES = sorted([member.name for member in KarrasDiffusionSchedulers]
                     + [cls.__name__ for cls, _ in FLOW_MATCH_SCHEDULERS.values()])


def scheduler_names() -> list[str]:
    """Every name `make_scheduler` accepts: the short names, then the class names."""
    return list(SCHEDULERS) + list(FLOW_MATCH_SCHEDULERS) + CLASS_NAMES


def runs_flow(name: str) -> bool:
    """Whether sampler `name` can run a flow model: the FlowMatch schedulers, and those that take flow sigmas
    (DPM-Solver, UniPC, DEIS, ...) unless the name asks for Karras sigmas, which replace the flow ones."""
    cls, options = resolve_scheduler(name)
    takes_flow_sigmas = "use_flow_sigmas" in inspect.signature(cls.__init__).parameters
    return issubclass(cls, FLOW_MATCH_CLASSES) or (takes_flow_sigmas and not options.get("use_karras_sigmas"))


def flow_scheduler_names() -> list[str]:
    return [name for name in scheduler_names() if runs_flow(name)]


def denoising_scheduler_names() -> list[str]:
    """The names for an ε-, v- or x₀-prediction model: all but the FlowMatch ones."""
    return [name for name in scheduler_names() if not issubclass(resolve_scheduler(name)[0], FLOW_MATCH_CLASSES)]


def resolve_scheduler(name: str) -> tuple[type[SchedulerMixin], dict]:
    """The scheduler class and the config options that `name` stands for.

    Raises ValueError naming the valid names, so a typo fails before any model is loaded.
    """
    if name in SCHEDULERS or name in FLOW_MATCH_SCHEDULERS:
        cls, options = SCHEDULERS[name] if name in SCHEDULERS else FLOW_MATCH_SCHEDULERS[name]
        # A short name means exactly what it says: no Karras sigmas unless the name asks for them.
        if "use_karras_sigmas" in inspect.signature(cls.__init__).parameters:
            options = {"use_karras_sigmas": False, **options}
        return cls, options
    if name in CLASS_NAMES:
        return getattr(diffusers, name), {}
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}")


def make_scheduler(name: str, config) -> SchedulerMixin:
    """A fresh scheduler `name` built from `config` (a scheduler's `.config` or a dict). For a flow model's
    config the sampler gets the model's shift, under the option name its class uses."""
    cls, options = resolve_scheduler(name)
    shift = flow_shift_of(config)
    if shift is None:
        if issubclass(cls, FLOW_MATCH_CLASSES):
            raise ConfigError(f"scheduler {name!r} samples flow_prediction models only, and this model predicts "
                              f"{config.get('prediction_type', 'epsilon')!r}; its samplers: "
                              f"{', '.join(denoising_scheduler_names())}")
        return cls.from_config(config, **options)
    if not runs_flow(name):
        raise ConfigError(f"scheduler {name!r} cannot sample a flow_prediction model; the ones that can: "
                          f"{', '.join(flow_scheduler_names())}")
    if issubclass(cls, FLOW_MATCH_CLASSES):  # from its own options only: a DPM-Solver config has many it lacks
        own = inspect.signature(cls.__init__).parameters
        return cls.from_config({key: value for key, value in config.items() if key in own}, **options, shift=shift)
    return cls.from_config(config, **options, use_flow_sigmas=True, prediction_type=FLOW_PREDICTION, flow_shift=shift)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name that rebuilds `scheduler`, or its class name when none does."""
    for name in [*SCHEDULERS, *FLOW_MATCH_SCHEDULERS]:
        cls, options = resolve_scheduler(name)
        if type(scheduler) is cls and all(scheduler.config.get(key) == value for key, value in options.items()):
            return name
    return type(scheduler).__name__


# ---------------------------------------------------------------- the interface every sampler gets


def set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, device) -> None:
    if is_flow_match(scheduler):
        set_flow_match_timesteps(scheduler, num_inference_steps, device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)


def init_noise_sigma(scheduler: SchedulerMixin) -> float:
    """The scale of the starting noise; a FlowMatch scheduler starts from σ = 1, ε itself."""
    return 1.0 if is_flow_match(scheduler) else scheduler.init_noise_sigma


def scale_model_input(scheduler: SchedulerMixin, sample: torch.Tensor, timestep) -> torch.Tensor:
    """A flow model takes x_t as it is, unscaled."""
    return sample if is_flow_match(scheduler) else scheduler.scale_model_input(sample, timestep)


def add_noise(scheduler: SchedulerMixin, clean: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """Clean latents noised to `timesteps`; for a FlowMatch scheduler (1 − σ)·x₀ + σ·ε by its `scale_noise`, which
    reads σ from the step it is at (or its begin index before the first step), as diffusers' flow img2img does."""
    if is_flow_match(scheduler):
        return scheduler.scale_noise(clean, timesteps, noise)
    return scheduler.add_noise(clean, noise, timesteps)
