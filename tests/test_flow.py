"""The rectified-flow objective and sampling a flow model: the formulas, the σ trained against the σ sampled
(diffusers#13243's double shift), parity with diffusers' pipelines, a hand-written Euler loop, edits, and the
clear refusals."""

import math
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3

from ldm.config import ConfigError, parse_config
from ldm.diffusion import objective
from ldm.diffusion.flow import shifted
from ldm.diffusion.schedulers import make_scheduler, set_timesteps
from ldm.evaluation.held_out import HeldOutSet
from ldm.evaluation.likelihood import BoundUndefined, variational_bound
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.training.unet_config import UNetConfig
from tests.test_editing import both_draw, picture, square_mask
from tests.test_pipeline import NEGATIVES, PROMPTS, both_pipelines

pytestmark = pytest.mark.usefixtures("single_thread")

SHIFT = 3.0
T = 1000


def flow_config(shift: float = SHIFT):
    return objective.noise_scheduler("flow_prediction", flow_shift=shift).config


def unshifted(sigmas: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """The inverse of the shift: σ = σ' / (s − (s − 1)·σ')."""
    return sigmas / (shift - (shift - 1) * sigmas)


# ---------------------------------------------------------------- the objective


def test_flow_noising_target_and_model_timesteps_follow_the_formulas():
    scheduler = objective.noise_scheduler("flow_prediction", flow_shift=SHIFT)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 1, 500, T - 1])
    sigma = SHIFT * (timesteps + 1) / T / (1 + (SHIFT - 1) * (timesteps + 1) / T)
    assert sigma[-1] == 1 and torch.isclose(sigma[0], torch.tensor(SHIFT / (T + SHIFT - 1)))
    expected = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
    assert torch.allclose(objective.noised(scheduler, latents, noise, timesteps), expected, atol=1e-6)
    assert torch.equal(objective.target(scheduler, latents, noise, timesteps), noise - latents)
    assert torch.allclose(objective.model_timesteps(scheduler, timesteps), sigma * T)
    # the DDPM objectives keep their integer timestep input
    assert torch.equal(objective.model_timesteps(objective.noise_scheduler("epsilon"), timesteps), timesteps)


def test_min_snr_for_flow_weights_the_x0_error_by_min_snr_gamma():
    """x̂₀ = x_t − σ·v̂, so the weighted velocity error is min(SNR, γ)·|x̂₀ − x₀|²."""
    scheduler = objective.noise_scheduler("flow_prediction", flow_shift=SHIFT)
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(5, 4, 2, 2, generator=generator), torch.randn(5, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([0, 10, 300, 700, 998])
    noisy = objective.noised(scheduler, latents, noise, timesteps)
    velocity = objective.target(scheduler, latents, noise, timesteps)
    predicted = velocity + 0.1 * torch.randn(velocity.shape, generator=generator)
    sigma = objective.sigmas(scheduler, timesteps).view(-1, 1, 1, 1)
    x0_error = ((noisy - sigma * predicted) - latents).square().mean(dim=(1, 2, 3))
    weights = objective.loss_weights(scheduler, timesteps, snr_gamma=5.0)
    snr = ((1 - sigma.flatten()) / sigma.flatten()).square()
    weighted = weights * (predicted - velocity).square().mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, torch.clamp(snr, max=5.0) * x0_error, rtol=1e-4)
    assert objective.loss_weights(scheduler, torch.tensor([T - 1]), snr_gamma=5.0) == 0  # pure noise: SNR 0


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none"])
def test_sd3_weighting_schemes_are_diffusers_own(scheme):
    scheduler = objective.noise_scheduler("flow_prediction", flow_shift=SHIFT)
    timesteps = torch.tensor([0, 250, 600, 999])
    ours = objective.loss_weights(scheduler, timesteps, snr_gamma=None, weighting_scheme=scheme)
    theirs = compute_loss_weighting_for_sd3(scheme, objective.sigmas(scheduler, timesteps))
    assert torch.allclose(ours, theirs.float(), rtol=1e-6)


def test_held_out_loss_works_for_flow_and_the_bound_refuses_with_its_reason():
    scheduler = objective.noise_scheduler("flow_prediction", flow_shift=SHIFT)
    latents = torch.randn(20, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    held_out = HeldOutSet.from_latents(latents, None, scheduler, bins=10)
    seen = []

    def exact(noisy, model_timesteps, embeddings):  # the velocity, recovered from the held-out set itself
        seen.append(model_timesteps)
        rows = torch.cat([(held_out.noisy == row).flatten(1).all(1).nonzero() for row in noisy]).flatten()
        return held_out.target[rows]

    result = held_out.evaluate(exact)
    assert result.loss == 0 and len(result.by_bin) == 10
    assert torch.allclose(torch.cat(seen), objective.model_timesteps(scheduler, held_out.timesteps))
    with pytest.raises(BoundUndefined, match="flow_prediction model has no beta schedule"):
        variational_bound(lambda noisy, t: noisy, latents, scheduler)


# ---------------------------------------------------------------- the σ trained against the σ sampled


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
def test_flow_match_samplers_run_on_the_trained_sigmas_once_shifted(name):
    """The first step is the trained σ = 1 (t = T−1), the last the trained σ_min = shift(1/T) (t = 0), and
    between them the unshifted sigmas are evenly spaced: one shift, the training one. Their own set_timesteps
    shifts σ_min twice (diffusers#13243)."""
    scheduler = make_scheduler(name, flow_config())
    set_timesteps(scheduler, 6, "cpu")
    trained = objective.noise_scheduler("flow_prediction", flow_shift=SHIFT)
    ends = objective.model_timesteps(trained, torch.tensor([T - 1, 0]))
    assert torch.allclose(scheduler.timesteps[[0, -1]], ends)
    steps = torch.unique_consecutive(scheduler.sigmas[:-1])
    assert torch.allclose(unshifted(steps).diff(), torch.full((5,), (1 / T - 1) / 5), atol=1e-6)
    naive = make_scheduler(name, flow_config())
    naive.set_timesteps(6)
    assert naive.sigmas[-2] > 2 * scheduler.sigmas[-2]  # the double shift it avoids: σ_min never reached


def test_the_saved_sampler_uses_the_training_shift_within_the_trained_range():
    saved = make_scheduler("dpm++2m", flow_config())
    saved.set_timesteps(8)
    steps = saved.sigmas[:-1]
    lowest, highest = (shifted(torch.tensor(value), SHIFT) for value in (1 / T, 1.0))
    assert lowest <= steps.min() and steps.max() <= highest
    assert torch.allclose(unshifted(steps).diff(), unshifted(steps).diff()[:1].expand(7), atol=1e-6)
    assert saved.config.flow_shift == SHIFT and saved.config.prediction_type == "flow_prediction"


# ---------------------------------------------------------------- sampling


@pytest.fixture
def flow_components(tiny_components):
    return dict(tiny_components, scheduler=make_scheduler("dpm++2m", flow_config()))


@pytest.mark.parametrize("name", ["dpm++2m", "unipc"])
def test_flow_model_draws_as_stable_diffusion_pipeline(name, flow_components):
    ours, theirs = both_pipelines(flow_components, flow_config(), name)
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=4,
                guidance_scale=6.0, output_type="np")
    drawn = [pipe(**args, generator=torch.Generator().manual_seed(7)).images for pipe in (ours, theirs)]
    assert np.abs(drawn[0] - drawn[1]).max() <= 1e-4


def test_flow_euler_is_the_euler_step_of_the_flow_ode(flow_components):
    """x ← x + (σ_next − σ)·v̂, from x = ε at σ = 1, v̂ the guided velocity at timestep σ·T."""
    pipe = LatentDiffusionPipeline(**flow_components)
    pipe.set_scheduler("flow_euler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    drawn = pipe("red heart", num_inference_steps=5, guidance_scale=4.0, latents=noise, output_type="latent").images
    embeddings = torch.cat([pipe.encode_text([""], "cpu"), pipe.encode_text(["red heart"], "cpu")])
    sigmas = shifted(torch.linspace(1, 1 / T, 5), SHIFT).tolist() + [0.0]
    x = noise.clone()
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:]):
            unconditional, conditional = pipe.unet(torch.cat([x, x]), torch.tensor(sigma * T),
                                                   encoder_hidden_states=embeddings).sample.chunk(2)
            x = x + (following - sigma) * (unconditional + 4.0 * (conditional - unconditional))
    assert torch.allclose(drawn, x, atol=1e-5)


def test_flow_heun_draws(flow_components):
    pipe = LatentDiffusionPipeline(**flow_components)
    pipe.set_scheduler("flow_heun")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("red heart", num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_flow_euler_image_to_image_starts_from_scale_noise(strength, flow_components):
    """diffusers' flow img2img start: (1 − σ)·x₀ + σ·ε at the first σ of the last `strength` of the steps."""
    pipe = LatentDiffusionPipeline(**flow_components)
    pipe.set_scheduler("flow_euler")
    pixels = pipe.image_processor.preprocess(picture(16))
    set_timesteps(pipe.scheduler, 6, "cpu")
    timesteps = pipe.edit_timesteps(6, strength)
    start, image_latents, noise = pipe.prepare_edit_latents(pixels, 1, timesteps, False, strength, torch.float32,
                                                            torch.device("cpu"), torch.Generator().manual_seed(4))
    sigma = pipe.scheduler.sigmas[6 - int(6 * strength)]
    assert torch.allclose(start, (1 - sigma) * image_latents + sigma * noise, atol=1e-6)
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    set_timesteps(reference, 6, "cpu")
    reference.set_begin_index(6 - int(6 * strength))
    assert torch.allclose(start, reference.scale_noise(image_latents, timesteps[:1], noise), atol=1e-6)


@pytest.mark.parametrize("diffusers_class", [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline])
def test_flow_edits_draw_as_diffusers_edit_pipelines(diffusers_class, flow_components):
    ours, theirs = both_pipelines(flow_components, flow_config(), "dpm++2m", diffusers_class)
    mask = {"mask_image": square_mask(16, (4, 4, 12, 12))} if diffusers_class is StableDiffusionInpaintPipeline else {}
    a, b = both_draw(ours, theirs, False, image=picture(16), strength=0.6, output_type="np", **mask)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
def test_flow_match_inpainting_keeps_the_unmasked_latents(name, flow_components):
    pipe = LatentDiffusionPipeline(**flow_components)
    pipe.set_scheduler(name)
    pipe.set_progress_bar_config(disable=True)
    image = picture(16)
    edited = pipe("red heart", image=image, mask_image=square_mask(16, (0, 0, 8, 16)), num_inference_steps=4,
                  strength=0.75, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    original = pipe.encode_image(pipe.image_processor.preprocess(image), torch.Generator().manual_seed(0))
    assert (edited[..., 4:] - original[..., 4:]).abs().max() == 0
    assert (edited[..., :4] - original[..., :4]).abs().mean() > 0.05


# ---------------------------------------------------------------- refusals


def test_a_ddpm_sampler_on_a_flow_model_and_a_flow_sampler_on_an_epsilon_model_fail_listing_the_valid():
    for name in ("ddim", "ddpm", "lms", "pndm", "euler", "euler_a", "heun", "lcm", "tcd", "dpm++2m_karras"):
        with pytest.raises(ConfigError, match=rf"scheduler '{re.escape(name)}' cannot sample a flow_prediction "
                                              r"model; the ones that can: dpm\+\+2m, unipc, flow_euler, flow_heun"):
            make_scheduler(name, flow_config())
    epsilon = objective.noise_scheduler("epsilon").config
    for name in ("flow_euler", "FlowMatchHeunDiscreteScheduler"):
        with pytest.raises(ConfigError, match="samples flow_prediction models only.*'epsilon'; its samplers: ddpm"):
            make_scheduler(name, epsilon)


@pytest.mark.parametrize("flags, message", [
    (["--flow_shift", "0"], "flow_shift = 0.0 is invalid; expected a positive number"),
    (["--flow_shift", "nan"], "flow_shift = nan is invalid; expected a positive number"),
    (["--zero_terminal_snr", "true"], "zero_terminal_snr = True is invalid; expected false with flow_prediction"),
    (["--beta_schedule", "linear"], "beta_schedule = 'linear' is invalid; expected unset"),
    (["--beta_end", "0.02"], "beta_end = 0.02 is invalid; expected unset"),
    (["--weighting_scheme", "cosmap"], "snr_gamma = 5.0 is invalid; expected 0 with --weighting_scheme cosmap"),
    (["--weighting_scheme", "logit_normal", "--timestep_sampling", "importance"],
     "timestep_sampling = 'importance' is invalid; expected logit_normal"),
])
def test_bad_flow_settings_fail_at_parse_time(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(UNetConfig, ["--prediction_type", "flow_prediction", *flags])


def test_flow_settings_without_flow_and_diffusers_names_for_samplers():
    with pytest.raises(ConfigError, match="flow_shift = 2.0 is invalid; expected 1 unless --prediction_type"):
        parse_config(UNetConfig, ["--flow_shift", "2"])
    with pytest.raises(ConfigError, match="weighting_scheme = 'cosmap' is invalid; expected none unless"):
        parse_config(UNetConfig, ["--weighting_scheme", "cosmap"])
    config = parse_config(UNetConfig, ["--prediction_type", "flow_prediction", "--weighting_scheme", "logit_normal",
                                       "--logit_mean", "0.5"])
    assert config.timestep_sampling == "logit_normal" and config.logit_mean == 0.5
    assert math.isclose(parse_config(UNetConfig, ["--prediction_type", "flow_prediction", "--flow_shift", "3",
                                                  "--weighting_scheme", "sigma_sqrt", "--snr_gamma", "0"]
                                     ).flow_shift, 3.0)


def test_a_fine_tuning_takes_the_objective_it_is_not_given_from_its_base_and_a_lora_must_keep_it():
    flow_base, epsilon_base = flow_config(), objective.noise_scheduler("epsilon").config

    def adopted(base, *flags):
        config = parse_config(UNetConfig, ["--pretrained_model_name_or_path", "base", *flags])
        config.adopt_base_objective(base)
        return config.prediction_type, config.flow_shift

    for lora in ([], ["--lora_rank", "4"]):
        assert adopted(flow_base, *lora) == ("flow_prediction", SHIFT)
        assert adopted(epsilon_base, *lora) == ("epsilon", 1.0)
        assert adopted(None, *lora) == ("epsilon", 1.0)  # a UNet folder: no scheduler to read
        assert adopted(flow_base, *lora, "--prediction_type", "flow_prediction", "--flow_shift", "3") == (
            "flow_prediction", SHIFT)
    # the whole UNet may change objective (its saved scheduler says the new one), but only when told to
    assert adopted(flow_base, "--prediction_type", "v_prediction") == ("v_prediction", 1.0)
    assert adopted(flow_base, "--flow_shift", "1") == ("flow_prediction", 1.0)
    assert adopted(epsilon_base, "--prediction_type", "flow_prediction") == ("flow_prediction", 1.0)
    with pytest.raises(ConfigError, match="flow_shift = 1.0 is invalid; expected unset or 3.0, the base pipeline's"):
        adopted(flow_base, "--lora_rank", "4", "--flow_shift", "1")
    with pytest.raises(ConfigError, match="prediction_type = 'v_prediction' is invalid; expected unset or 'epsilon'"):
        adopted(epsilon_base, "--lora_rank", "4", "--prediction_type", "v_prediction")
    with pytest.raises(ConfigError, match="weighting_scheme = 'cosmap' is invalid; expected none unless"):
        adopted(epsilon_base, "--lora_rank", "4", "--weighting_scheme", "cosmap", "--snr_gamma", "0")
    assert adopted(flow_base, "--lora_rank", "4", "--weighting_scheme", "cosmap", "--snr_gamma", "0")[0] == (
        "flow_prediction")
