"""ldm/diffusion/consistency.py and noise_paths.py against what diffusers computes: the guidance embedding, the
boundary scalings, the DDIM solver step on a DDPM and on a flow path, the flow points; and the zero-initialised
student."""

import pytest
import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from ldm.diffusion import objective
from ldm.diffusion.consistency import guidance_embedding, student_from
from ldm.diffusion.noise_paths import DDPMPath, FlowPath, boundary_scalings, clean_and_noise, ddim_step, path_of


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
    path = path_of(teacher_schedule.config)
    assert isinstance(path, DDPMPath) and path.solver_grid(50)[[0, -1]].tolist() == [19, 999]
    ddim = DDIMScheduler.from_config(teacher_schedule.config, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    torch.manual_seed(0)
    for t in [19, 39, 499, 999]:  # 19 steps to t = -1, where DDIM uses alpha_cumprod[0] as solver does at 0
        sample, prediction = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        expected = ddim.step(prediction, t, sample, eta=0.0).prev_sample
        timesteps = torch.full((2,), t)
        clean, noise = clean_and_noise(prediction, sample, *path.coefficients(timesteps), prediction_type)
        previous = (timesteps - 20).clamp(min=0)
        torch.testing.assert_close(ddim_step(clean, noise, *path.coefficients(previous)), expected,
                                   rtol=1e-5, atol=1e-5)


def test_the_solver_draws_grid_points_and_the_points_one_step_below():
    path = path_of(objective.noise_scheduler("epsilon").config)
    start, end = path.consistency_pairs(1000, 25, torch.Generator().manual_seed(0), "cpu")
    assert set(start.tolist()) == set(path.solver_grid(25).tolist())
    assert torch.equal(end, (start - 40).clamp(min=0))
    with pytest.raises(ValueError, match="num_ddim_timesteps must be in"):
        path.consistency_pairs(1, 0, None, "cpu")


SHIFT = 2.5


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_on_a_flow_path_a_ddim_step_is_the_saved_samplers_step_on_its_own_points(steps):
    """The flow students' sampler (first-order DPM-Solver++ on flow sigmas) steps exactly as distillation does:
    from the points progressive distillation draws at `steps` steps, by the DDIM (Euler) step, to σ = 0."""
    path = path_of(objective.noise_scheduler("flow_prediction", flow_shift=SHIFT).config)
    assert isinstance(path, FlowPath) and path.shift == SHIFT
    sampler = path.sampler()
    sampler.set_timesteps(steps)
    starts = torch.stack([path.progressive_points(steps, 1, torch.Generator().manual_seed(seed), "cpu")[0]
                          for seed in range(200)]).flatten()
    grid = sorted(set(starts.tolist()), reverse=True)
    torch.testing.assert_close(path.coefficients(torch.tensor(grid))[1], sampler.sigmas[:-1].float())
    assert sampler.sigmas[-1] == 0
    torch.testing.assert_close(path.model_timesteps(torch.tensor(grid)).long(), sampler.timesteps)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    for index, timestep in enumerate(sampler.timesteps):
        velocity = torch.randn(2, 4, 8, 8)
        point = torch.full((2,), grid[index])
        clean, noise = clean_and_noise(velocity, sample, *path.coefficients(point), "flow_prediction")
        below = (point - path.top / steps).clamp(min=0)
        ours = ddim_step(clean, noise, *path.coefficients(below))
        sample = sampler.step(velocity, timestep, sample).prev_sample
        torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def test_flow_consistency_pairs_are_one_solver_step_apart_and_end_at_the_clean_image():
    path = path_of(objective.noise_scheduler("flow_prediction", flow_shift=SHIFT).config)
    start, end = path.consistency_pairs(10_000, 10, torch.Generator().manual_seed(0), "cpu")
    assert 0 < start.min() and start.max() <= path.top
    torch.testing.assert_close(end, (start - path.top / 10).clamp(min=0))
    assert (end == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    # at the clean end the consistency function is the identity, with no boundary scalings
    sample, velocity = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    zero = torch.zeros(3)
    clean, _ = clean_and_noise(velocity, sample, *path.coefficients(zero), "flow_prediction")
    assert torch.equal(path.consistency_output(clean, sample, zero, 10.0), sample)


def test_the_flow_prediction_gives_back_the_clean_image_and_the_noise():
    torch.manual_seed(0)
    clean, noise, sigma = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    sample = (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise
    found = clean_and_noise(noise - clean, sample, 1 - sigma, sigma, "flow_prediction")
    torch.testing.assert_close(found, (clean, noise))
