"""Swappable samplers: a short name (or a diffusers class name) → a diffusers scheduler built
from the pipeline's own scheduler config, so the noise schedule the model was trained with
(betas, prediction type, number of training steps) carries over to whichever sampler runs.
"""

from __future__ import annotations

import inspect

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

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

# The class names diffusers itself declares interchangeable for an epsilon/v-prediction UNet
# (the `compatibles` of DDIM, Euler, ...); other schedulers expect other model families.
CLASS_NAMES = sorted(member.name for member in KarrasDiffusionSchedulers)


def scheduler_names() -> list[str]:
    """Every name `make_scheduler` accepts: the short names, then the class names."""
    return list(SCHEDULERS) + CLASS_NAMES


def resolve_scheduler(name: str) -> tuple[type[SchedulerMixin], dict]:
    """The scheduler class and the config options that `name` stands for.

    Raises ValueError naming the valid names, so a typo fails before any model is loaded.
    """
    if name in SCHEDULERS:
        cls, options = SCHEDULERS[name]
        # A short name means exactly what it says: no Karras sigmas unless the name asks for them.
        if "use_karras_sigmas" in inspect.signature(cls.__init__).parameters:
            options = {"use_karras_sigmas": False, **options}
        return cls, options
    if name in CLASS_NAMES:
        return getattr(diffusers, name), {}
    raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}")


def make_scheduler(name: str, config) -> SchedulerMixin:
    """A fresh scheduler `name` built from `config` (a scheduler's `.config` or a dict)."""
    cls, options = resolve_scheduler(name)
    return cls.from_config(config, **options)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The short name that rebuilds `scheduler`, or its class name when none does."""
    for name in SCHEDULERS:
        cls, options = resolve_scheduler(name)
        if type(scheduler) is cls and all(scheduler.config.get(key) == value for key, value in options.items()):
            return name
    return type(scheduler).__name__
