"""ldm/diffusion/consistency.py against what diffusers computes: the guidance embedding, the boundary scalings,
the DDIM solver step; and the zero-initialised student."""

import pytest
import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from ldm.diffusion import objective
from ldm.diffusion.consistency import DDIMSolver, boundary_scalings, clean_and_noise, guidance_embedding, student_from


@pytest.mark.parametrize("dim", [32, 33])
def test_the_guidance_embedding_is_the_one_the_pipelines_compute(dim):
    scales = torch.tensor([1.0, 2.5, 5.0, 9.0])
    ours = guidance_embedding(scales, dim)
    for pipeline_class in (StableDiffusionPipeline, LatentConsistencyModelPipeline):
        # both pipelines embed g - 1 (their `w`); the method reads nothing from the pipeline
        theirs = pipeline_class.get_guidance_scale_embedding(None, scales - 1, embedding_dim=dim)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_the_student_starts_as_its_teacher_and_its_guidance_input_is_trainable(tiny_unet):
    teacher = tiny_unet
    student = student_from(teacher, embedding_dim=16).eval()
    latents, text = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 32)
    timesteps = torch.tensor([10, 500, 999])
    condition = guidance_embedding(torch.tensor([2.0, 5.0, 8.0]), 16)
    with torch.no_grad():
        expected = teacher(latents, timesteps, text).sample
        torch.testing.assert_close(student(latents, timesteps, text, timestep_cond=condition).sample, expected,
                                   rtol=0, atol=0)
    assert student.time_embedding.cond_proj.weight.requires_grad
    with pytest.raises(ValueError, match="already has a guidance input"):
        student_from(student, embedding_dim=16)


def test_the_boundary_scalings_make_the_identity_at_zero_and_match_lcm_scheduler():
    scheduler = LCMScheduler(timestep_scaling=10.0)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 19, 500, 999]), timestep_scaling=10.0)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)
    for index, t in enumerate([0, 1, 19, 500, 999]):
        expected_skip, expected_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert c_skip[index].item() == pytest.approx(float(expected_skip), rel=1e-6)
        assert c_out[index].item() == pytest.approx(float(expected_out), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_solver_step_is_ddim_scheduler_step(prediction_type):
    teacher_schedule = objective.noise_scheduler(prediction_type)
    solver = DDIMSolver(teacher_schedule.alphas_cumprod, num_ddim_timesteps=50)
    assert solver.timesteps[0].item() == 19 and solver.timesteps[-1].item() == 999
    ddim = DDIMScheduler.from_config(teacher_schedule.config, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    torch.manual_seed(0)
    for t in [19, 39, 499, 999]:  # 19 steps to t = -1, where DDIM uses alpha_cumprod[0] as solver does at 0
        sample, prediction = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        expected = ddim.step(prediction, t, sample, eta=0.0).prev_sample
        timesteps = torch.full((2,), t)
        clean, noise = clean_and_noise(prediction, sample, solver.alpha_cumprod(timesteps), prediction_type)
        previous = (timesteps - solver.skip).clamp(min=0)
        torch.testing.assert_close(solver.step(clean, noise, previous), expected, rtol=1e-5, atol=1e-5)


def test_the_solver_draws_grid_points_and_the_points_one_step_below():
    solver = DDIMSolver(objective.noise_scheduler("epsilon").alphas_cumprod, num_ddim_timesteps=25)
    start, end = solver.draw(1000, torch.Generator().manual_seed(0), "cpu")
    assert set(start.tolist()) == set(solver.timesteps.tolist())
    assert torch.equal(end, (start - 40).clamp(min=0))
    with pytest.raises(ValueError, match="num_ddim_timesteps must be in"):
        DDIMSolver(torch.ones(1000), 0)
