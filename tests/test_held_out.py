import pytest
import torch

from ldm.diffusion.objective import loss_by_timestep_bin, noise_scheduler, normalise_latents
from ldm.evaluation.held_out import HeldOutSet, spread_timesteps
from ldm.evaluation.likelihood import unet_predictor

SAMPLES = 40


def gaussian_latents(samples=SAMPLES, seed=0):
    return torch.randn(samples, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def embeddings(samples=SAMPLES):
    return torch.randn(samples, 6, 32, generator=torch.Generator().manual_seed(1))


def optimal_epsilon(scheduler):
    """E[ε | z_t] = √(1 − ᾱ_t)·z_t for z ~ N(0, I): the best any model can do on these latents."""
    def predict(noisy, timesteps, embeddings):
        alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * noisy
    return predict


def test_the_same_model_gets_bit_identical_results_on_every_call(tiny_unet, single_thread):
    scheduler = noise_scheduler("epsilon")
    held = HeldOutSet.from_latents(gaussian_latents(), embeddings(), scheduler, seed=3, batch_size=16)
    first, second = held.evaluate(unet_predictor(tiny_unet)), held.evaluate(unet_predictor(tiny_unet))
    assert first == second
    remade = HeldOutSet.from_latents(gaussian_latents(), embeddings(), scheduler, seed=3, batch_size=16)
    assert remade.evaluate(unet_predictor(tiny_unet)) == first  # the draws come from the seed alone


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_better_model_has_a_lower_loss(prediction_type, tiny_unet, single_thread):
    scheduler = noise_scheduler(prediction_type)
    held = HeldOutSet.from_latents(gaussian_latents(), embeddings(), scheduler)
    if prediction_type == "epsilon":
        best = optimal_epsilon(scheduler)
    else:  # the optimal v for unit-variance Gaussian latents is 0: √ᾱ·E[ε|z_t] = √(1−ᾱ)·E[z|z_t]
        def best(noisy, timesteps, embeddings):
            return torch.zeros_like(noisy)
    worse = held.evaluate(unet_predictor(tiny_unet))
    assert held.evaluate(best).loss < worse.loss
    assert held.evaluate(lambda noisy, t, e: 2 * best(noisy, t, e) + 0.5).loss > held.evaluate(best).loss


def test_per_bin_counts_add_up_and_every_bin_is_covered():
    scheduler = noise_scheduler("epsilon")
    held = HeldOutSet.from_latents(gaussian_latents(45), None, scheduler)
    result = held.evaluate(optimal_epsilon(scheduler))
    assert result.count == 45 == sum(result.count_by_bin.values())
    assert set(result.by_bin) == set(range(10))
    assert set(result.count_by_bin.values()) == {4, 5}
    weighted = sum(result.by_bin[b] * n for b, n in result.count_by_bin.items()) / result.count
    assert weighted == pytest.approx(result.loss)


def test_the_bins_are_trainings_bins():
    timesteps = spread_timesteps(1000, 1000, 7, torch.Generator().manual_seed(0))
    bins = loss_by_timestep_bin(torch.ones(1000), timesteps, 1000, 7)
    counts = [bins[b][1] for b in range(7)]
    assert max(counts) - min(counts) <= 1
    assert len(timesteps.unique()) > 900  # stratified within each bin: spread, not piled up


def test_it_leaves_the_global_random_state_as_it_was():
    scheduler = noise_scheduler("epsilon")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    held = HeldOutSet.from_latents(gaussian_latents(), embeddings(), scheduler)

    def draws_global_noise(noisy, timesteps, embeddings):  # like dropout in train mode
        return noisy + 0.01 * torch.randn_like(noisy)

    held.evaluate(draws_global_noise)
    assert torch.equal(torch.get_rng_state(), before)


def test_from_posterior_draws_a_sample_and_normalises_it_as_training_does():
    scheduler = noise_scheduler("sample")  # the target is then the latent itself
    vae_config = {"scaling_factor": 0.5, "shift_factor": 0.2}
    mean = gaussian_latents(12)
    exact = HeldOutSet.from_posterior(mean, torch.zeros_like(mean), None, scheduler, vae_config)
    torch.testing.assert_close(exact.target, normalise_latents(mean, vae_config))
    spread = HeldOutSet.from_posterior(mean, torch.ones_like(mean), None, scheduler, vae_config)
    assert not torch.allclose(spread.target, exact.target)


@pytest.mark.parametrize("make, message", [
    (lambda s: HeldOutSet.from_latents(gaussian_latents(4), embeddings(3), s), "embeddings have 3 rows for 4"),
    (lambda s: HeldOutSet.from_latents(gaussian_latents(4), None, s, bins=1001), "bins 1001 must be an integer"),
    (lambda s: HeldOutSet.from_latents(gaussian_latents(4), None, s, bins=0), "bins 0 must be an integer"),
    (lambda s: HeldOutSet.from_latents(gaussian_latents(4), None, s, batch_size=0), "batch_size 0 must be"),
    (lambda s: HeldOutSet.from_latents(torch.zeros(0, 4, 8, 8), None, s), r"shape \(0, 4, 8, 8\) hold no samples"),
    (lambda s: HeldOutSet.from_latents(torch.full((2, 4, 8, 8), float("nan")), None, s), "contain 512 NaN"),
    (lambda s: HeldOutSet.from_posterior(gaussian_latents(2), torch.ones(2, 4), None, s, {"scaling_factor": 1}),
     r"std has shape \(2, 4\) but mean has \(2, 4, 8, 8\)"),
])
def test_bad_input_fails_with_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make(noise_scheduler("epsilon"))


def test_a_prediction_of_the_wrong_shape_is_named():
    held = HeldOutSet.from_latents(gaussian_latents(2), None, noise_scheduler("epsilon"))
    with pytest.raises(ValueError, match=r"predict returned shape \(2, 4\) for input \(2, 4, 8, 8\)"):
        held.evaluate(lambda noisy, t, e: noisy[:, :, 0, 0])
