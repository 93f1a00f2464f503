import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from ldm.diffusion.schedulers import SCHEDULERS, make_scheduler, resolve_scheduler, scheduler_name, scheduler_names

EXPECTED = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler, "dpm++2m_karras": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler, "tcd": TCDScheduler,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_short_name_builds_its_class_from_the_pipeline_config(name, tiny_scheduler):
    scheduler = make_scheduler(name, tiny_scheduler.config)
    assert type(scheduler) is EXPECTED[name]
    # The noise schedule the model was trained with carries over.
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == 0.012
    assert scheduler_name(scheduler) == name


def test_the_listed_names_are_all_there():
    assert set(SCHEDULERS) == set(EXPECTED)


def test_dpm_solver_names_fix_their_options(tiny_scheduler):
    karras = make_scheduler("dpm++2m_karras", tiny_scheduler.config)
    assert karras.config.use_karras_sigmas is True
    assert karras.config.algorithm_type == "dpmsolver++" and karras.config.solver_order == 2
    # Built from a Karras config, plain "dpm++2m" still means no Karras sigmas.
    plain = make_scheduler("dpm++2m", karras.config)
    assert plain.config.use_karras_sigmas is False
    assert scheduler_name(plain) == "dpm++2m"


def test_diffusers_class_names_are_accepted(tiny_scheduler):
    assert type(make_scheduler("EulerDiscreteScheduler", tiny_scheduler.config)) is EulerDiscreteScheduler
    assert type(make_scheduler("KDPM2DiscreteScheduler", tiny_scheduler.config)) is KDPM2DiscreteScheduler
    assert "KDPM2DiscreteScheduler" in scheduler_names()


def test_a_class_name_with_no_short_name_is_reported_by_class_name(tiny_scheduler):
    assert scheduler_name(make_scheduler("KDPM2DiscreteScheduler", tiny_scheduler.config)) == "KDPM2DiscreteScheduler"


@pytest.mark.parametrize("name", ["euler-a", "DDIM", "VQDiffusionScheduler", ""])
def test_an_unknown_name_fails_listing_the_valid_ones(name):
    with pytest.raises(ValueError, match=f"unknown scheduler '{name}'; valid names: ddpm, ddim, .*euler_a.*"
                                         r"dpm\+\+2m_karras, unipc, .*EulerDiscreteScheduler"):
        resolve_scheduler(name)
