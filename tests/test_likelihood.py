"""The variational bound against an exact oracle: for z ~ N(0, I) and the Bayes-optimal denoiser, the model's
reverse chain with σ_t² = β_t is the true one, so the bound equals −log p(z) exactly (research note §2.2)."""

import math

import pytest
import torch

from ldm.diffusion.objective import noise_scheduler
from ldm.evaluation.likelihood import (
    paired_difference,
    schedule_float64,
    strata_edges,
    stratified_timesteps,
    unet_predictor,
    variational_bound,
)

DIMS = 16
SAMPLES = 2000
STRATA = 32  # the default, log-spaced: SE ≈ 0.011 bits/dim at T = 1000 and 2000 samples
POPULATION_EXACT = 0.5 * math.log2(2 * math.pi * math.e)  # E[−log2 N(z; 0, 1)] ≈ 2.047 bits/dim


def optimal(prediction_type, scheduler, data_variance=1.0):
    """The Bayes-optimal prediction for z ~ N(0, data_variance·I): E[z | z_t] = √ᾱ·s²/(ᾱ·s² + 1 − ᾱ)·z_t,
    and the ε and v that imply it (v = √ᾱ·ε − √(1−ᾱ)·z, so for s² = 1 the optimal v is 0)."""
    alpha_bar, _ = schedule_float64(scheduler)

    def predict(noisy, timesteps):
        a = alpha_bar[timesteps].view(-1, *[1] * (noisy.dim() - 1))
        x0 = a.sqrt() * data_variance / (a * data_variance + 1 - a) * noisy
        eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]

    return predict


def gaussian_latents(samples=SAMPLES, seed=0):
    return torch.randn(samples, DIMS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_bits(z):
    """−log2 N(z; 0, I) per dimension, for these samples."""
    return 0.5 * math.log2(2 * math.pi) + 0.5 * z.square().mean().item() / math.log(2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_bound_of_the_optimal_model_is_the_exact_likelihood(prediction_type):
    scheduler = noise_scheduler(prediction_type)
    z = gaussian_latents()
    bound = variational_bound(optimal(prediction_type, scheduler), z, scheduler, strata=STRATA, batch_size=SAMPLES)
    assert abs(bound.bits_per_dim - exact_bits(z)) < 3 * bound.standard_error
    assert abs(bound.bits_per_dim - POPULATION_EXACT) < 3 * bound.standard_error
    assert bound.bits_per_dim == pytest.approx(bound.prior + bound.steps + bound.decoder)
    assert (bound.samples, bound.timesteps_per_sample) == (SAMPLES, STRATA + 1)


@pytest.mark.parametrize("seed", range(5))
def test_log_strata_at_32_are_accurate_and_far_less_noisy_than_equal_width(seed):
    """At K = 32 equal-width strata put t = 1..31 (a third of Σ L_t) in one stratum and the estimate is skewed
    low with an SE that understates it; log-spaced strata give every t ≤ 7 its own and land within 3 SE, with an
    SE ~6× smaller on the same draws count."""
    scheduler = noise_scheduler("epsilon")
    z = gaussian_latents(1000, seed=10 + seed)
    log = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=32, seed=seed, batch_size=1000)
    uniform = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=32, spacing="uniform",
                                seed=seed, batch_size=1000)
    assert abs(log.bits_per_dim - exact_bits(z)) < 3 * log.standard_error
    assert abs(log.bits_per_dim - POPULATION_EXACT) < 3 * log.standard_error
    assert log.timesteps_per_sample == uniform.timesteps_per_sample == 33
    assert log.standard_error < uniform.standard_error / 3


@pytest.mark.parametrize("spacing", ["log", "uniform"])
@pytest.mark.parametrize("num_timesteps, strata", [(1000, 1), (1000, 2), (1000, 16), (1000, 32), (1000, 100),
                                                   (1000, 998), (1000, 999), (100, 50), (100, 99), (2, 1)])
def test_the_strata_cover_every_timestep_once(spacing, num_timesteps, strata):
    edges = strata_edges(strata, num_timesteps, spacing)
    sizes = [high - low for low, high in zip(edges, edges[1:])]
    assert len(sizes) == strata and min(sizes) >= 1
    assert (edges[0], edges[-1], sum(sizes)) == (1, num_timesteps, num_timesteps - 1)
    timesteps, weights = stratified_timesteps(300, strata, num_timesteps, torch.Generator().manual_seed(0), spacing)
    assert weights.tolist() == sizes
    for k, (low, high) in enumerate(zip(edges, edges[1:])):
        assert ((timesteps[:, k] >= low) & (timesteps[:, k] < high)).all()
    if strata == num_timesteps - 1:
        assert (timesteps == torch.arange(1, num_timesteps)).all()  # each timestep once: the full sum


def test_log_strata_are_single_steps_where_l_t_is_largest_and_grow_geometrically():
    edges = strata_edges(32, 1000)
    sizes = [high - low for low, high in zip(edges, edges[1:])]
    assert sizes[:7] == [1] * 7 and sizes == sorted(sizes)
    assert sizes[-1] / sizes[-2] == pytest.approx(sizes[-2] / sizes[-3], rel=0.1)


def test_fixed_small_is_a_looser_bound():
    scheduler = noise_scheduler("epsilon")
    z = gaussian_latents(500)
    large = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=STRATA, batch_size=500)
    small = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=STRATA, batch_size=500,
                              variance="fixed_small")
    assert small.variance == "fixed_small"
    assert small.bits_per_dim > large.bits_per_dim + 3 * math.hypot(small.standard_error, large.standard_error)


@pytest.mark.parametrize("worse", ["scaled", "noisy"])
def test_a_worse_model_has_a_higher_bound(worse):
    scheduler = noise_scheduler("epsilon")
    best = optimal("epsilon", scheduler)
    generator = torch.Generator().manual_seed(1)

    def spoiled(noisy, timesteps):
        if worse == "scaled":
            return 1.5 * best(noisy, timesteps)
        return best(noisy, timesteps) + 0.3 * torch.randn(noisy.shape, generator=generator, dtype=noisy.dtype)

    z = gaussian_latents(500)
    good = variational_bound(best, z, scheduler, strata=50, batch_size=500)
    bad = variational_bound(spoiled, z, scheduler, strata=50, batch_size=500)  # the same draws: the same seed
    assert bad.bits_per_dim - good.bits_per_dim > 3 * math.hypot(bad.standard_error, good.standard_error)


def test_paired_bounds_tell_apart_models_their_standard_errors_cannot():
    scheduler = noise_scheduler("epsilon")
    best = optimal("epsilon", scheduler)
    z = gaussian_latents(100)
    good = variational_bound(best, z, scheduler, strata=STRATA, batch_size=100)
    bad = variational_bound(lambda noisy, t: 1.1 * best(noisy, t), z, scheduler, strata=STRATA, batch_size=100)
    difference, error = paired_difference(bad, good)
    assert difference == pytest.approx(bad.bits_per_dim - good.bits_per_dim)
    assert difference < math.hypot(bad.standard_error, good.standard_error)  # apart, the two overlap
    assert difference > 3 * error  # paired, the same draws cancel and the worse model stands out
    with pytest.raises(ValueError, match="paired bounds need the same samples: 50 against 100"):
        paired_difference(variational_bound(best, z[:50], scheduler, strata=STRATA, batch_size=50), good)


def test_the_full_sum_agrees_with_the_stratified_estimate():
    scheduler = noise_scheduler("v_prediction")
    z = gaussian_latents(200, seed=3)
    full = variational_bound(optimal("v_prediction", scheduler), z, scheduler, strata=None, batch_size=200)
    stratified = variational_bound(optimal("v_prediction", scheduler), z, scheduler, strata=100, batch_size=200)
    assert full.timesteps_per_sample == 1000  # T − 1 steps and the decoder
    assert abs(full.bits_per_dim - stratified.bits_per_dim) < 3 * math.hypot(full.standard_error,
                                                                            stratified.standard_error)
    assert abs(full.bits_per_dim - exact_bits(z)) < 3 * full.standard_error


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_scaling_the_latents_by_s_moves_the_bound_by_log2_s(scale):
    """The exact density moves by exactly log2 s; the bound of the optimal model of s·z (whose fixed variances
    no longer match exactly) stays within ~0.001 of that on SD's schedule, measured on the same draws."""
    scheduler = noise_scheduler("epsilon")
    z = gaussian_latents(200, seed=4)
    unit = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=None, batch_size=200)
    scaled = variational_bound(optimal("epsilon", scheduler, scale**2), scale * z, scheduler, strata=None,
                               batch_size=200, scaling_factor=scale)
    assert scaled.bits_per_dim - unit.bits_per_dim == pytest.approx(math.log2(scale), abs=0.01)
    assert (scaled.scaling_factor, scaled.shift_factor) == (scale, None)


def test_zero_terminal_snr_with_v_prediction_has_no_prior_term():
    scheduler = noise_scheduler("v_prediction", zero_terminal_snr=True)
    z = gaussian_latents(1000)
    bound = variational_bound(optimal("v_prediction", scheduler), z, scheduler, strata=STRATA, batch_size=1000)
    assert bound.prior == 0
    assert abs(bound.bits_per_dim - exact_bits(z)) < 3 * bound.standard_error


def test_the_same_seed_gives_the_same_number_and_another_seed_another():
    scheduler = noise_scheduler("epsilon", num_train_timesteps=100)
    z = gaussian_latents(50)
    first, again = (variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=10, seed=7)
                    for _ in range(2))
    other = variational_bound(optimal("epsilon", scheduler), z, scheduler, strata=10, seed=8)
    assert first[:-1] == again[:-1] and torch.equal(first.per_sample, again.per_sample)
    assert other.bits_per_dim != first.bits_per_dim


def test_a_unet_with_caption_embeddings_wraps_into_a_predictor(tiny_unet, single_thread):
    unet = tiny_unet
    scheduler = noise_scheduler("epsilon")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one_caption = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    fixed = variational_bound(unet_predictor(unet, one_caption), latents, scheduler, strata=1, batch_size=2,
                              scaling_factor=0.5, shift_factor=0.1)
    per_row = variational_bound(unet_predictor(unet), latents, scheduler, strata=1, batch_size=2,
                                conditioning=one_caption.expand(3, -1, -1), scaling_factor=0.5, shift_factor=0.1)
    assert math.isfinite(fixed.bits_per_dim) and math.isfinite(fixed.standard_error)
    assert fixed.bits_per_dim == pytest.approx(per_row.bits_per_dim, abs=1e-9)
    assert (fixed.timesteps_per_sample, fixed.scaling_factor, fixed.shift_factor) == (2, 0.5, 0.1)


def bound_of(latents=None, scheduler=None, **options):
    scheduler = scheduler or noise_scheduler("epsilon", num_train_timesteps=100)
    latents = gaussian_latents(4) if latents is None else latents
    return variational_bound(optimal("epsilon", scheduler), latents, scheduler, **options)


@pytest.mark.parametrize("options, message", [
    (dict(prediction_type="flow"), "prediction_type 'flow' is not one of epsilon, v_prediction, sample"),
    (dict(variance="learned"), "variance 'learned' is not one of fixed_large, fixed_small"),
    (dict(spacing="linear"), "spacing 'linear' is not one of log, uniform"),
    (dict(strata=0), "strata 0 must be an integer from 1 to T−1 = 99"),
    (dict(strata=-3), "strata -3 must be an integer from 1 to T−1 = 99"),
    (dict(strata=100), "strata 100 must be an integer from 1 to T−1 = 99"),
    (dict(batch_size=0), "batch_size 0 must be a positive integer"),
    (dict(latents=torch.zeros(0, DIMS)), r"latents of shape \(0, 16\) hold no samples"),
    (dict(latents=torch.tensor([[0.0, float("nan")]])), "latents contain 1 NaN or infinite values"),
    (dict(latents=torch.tensor([[float("inf"), 1.0]])), "latents contain 1 NaN or infinite values"),
    (dict(conditioning=torch.zeros(3, 2)), "conditioning has 3 rows for 4 latents"),
    (dict(scheduler=noise_scheduler("epsilon", zero_terminal_snr=True)), "zero terminal SNR.*use prediction_type "
                                                                         "v_prediction"),
])
def test_bad_input_fails_first_with_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        bound_of(**options)


def test_a_prediction_of_the_wrong_shape_is_named():
    scheduler = noise_scheduler("epsilon", num_train_timesteps=100)
    with pytest.raises(ValueError, match=r"predict returned shape \(4, 8\) for input \(4, 16\)"):
        variational_bound(lambda noisy, t: noisy[:, :8], gaussian_latents(4), scheduler, strata=5)
