import pytest
import torch

from ldm.diffusion.objective import (
    drop_conditioning,
    loss_by_timestep_bin,
    min_snr_weights,
    noise_scheduler,
    noised,
    sample_noise,
    snr,
    target,
)

GAMMA = 5.0


def x0_estimate(scheduler, x_t, output, t):
    """x_0 implied by a model output of each prediction type, straight from the DDPM equations."""
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - s * output) / a
    if kind == "v_prediction":
        return a * x_t - s * output
    return output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighted_mse_equals_clipped_snr_times_x0_error(prediction_type):
    """For every prediction type, weight · |output error|² must equal min(SNR, γ) · |x_0 error|²."""
    torch.manual_seed(0)
    scheduler = noise_scheduler(prediction_type)
    x0, noise = torch.randn(6, 4, 4, 4), torch.randn(6, 4, 4, 4)
    t = torch.tensor([1, 50, 200, 500, 800, 999])
    x_t = noised(scheduler, x0, noise, t)
    goal = target(scheduler, x0, noise, t)
    output = goal + 0.1 * torch.randn_like(goal)  # an imperfect model
    output_error = ((output - goal) ** 2).mean(dim=(1, 2, 3))
    x0_error = ((x0_estimate(scheduler, x_t, output, t) - x0) ** 2).mean(dim=(1, 2, 3))
    snr_t = snr(scheduler, t)
    weighted = min_snr_weights(snr_t, GAMMA, prediction_type) * output_error
    torch.testing.assert_close(weighted, torch.clamp(snr_t, max=GAMMA) * x0_error, rtol=2e-3, atol=1e-6)


def test_min_snr_weights_known_values():
    snr_t = torch.tensor([0.0, 1.0, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr_t, GAMMA, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(snr_t, GAMMA, "v_prediction"),
                               torch.tensor([0.0, 0.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(min_snr_weights(snr_t, GAMMA, "sample"), torch.tensor([0.0, 1.0, 5.0, 5.0]))


def test_zero_terminal_snr_reaches_pure_noise():
    plain, rescaled = noise_scheduler("v_prediction"), noise_scheduler("v_prediction", zero_terminal_snr=True)
    last = torch.tensor([999])
    assert snr(plain, last).item() > 1e-3
    assert snr(rescaled, last).item() < 1e-6
    assert torch.isfinite(min_snr_weights(snr(rescaled, last), GAMMA, "epsilon")).all()


def test_offset_noise_shifts_whole_channels():
    latents = torch.zeros(256, 4, 8, 8)
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(0))
    offset = sample_noise(latents, offset=1.0, generator=torch.Generator().manual_seed(0))
    channel_means = lambda x: x.mean(dim=(2, 3)).std().item()  # noqa: E731
    assert channel_means(plain) < 0.2 < 0.8 < channel_means(offset)


def test_input_perturbation_changes_x_t_but_not_target():
    scheduler = noise_scheduler("epsilon")
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([300, 600])
    assert torch.equal(noised(scheduler, x0, noise, t), scheduler.add_noise(x0, noise, t))
    assert not torch.equal(noised(scheduler, x0, noise, t, input_perturbation=0.1), scheduler.add_noise(x0, noise, t))


def test_caption_dropout_rate():
    embeddings = torch.ones(20000, 3, 2)
    empty = torch.zeros(1, 3, 2)
    dropped = drop_conditioning(embeddings, empty, 0.1, generator=torch.Generator().manual_seed(0))
    rows_dropped = (dropped.sum(dim=(1, 2)) == 0).float().mean().item()
    assert abs(rows_dropped - 0.1) < 0.01
    ids = torch.full((1000, 5), 7)
    assert torch.equal(drop_conditioning(ids, torch.zeros(1, 5, dtype=torch.long), 0.0), ids)


def test_loss_by_timestep_bin():
    bins = loss_by_timestep_bin(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 99, 100, 999]), 1000)
    assert bins == {0: (3.0, 2), 1: (3.0, 1), 9: (4.0, 1)}


@pytest.mark.parametrize("vae_config", [
    {"scaling_factor": 0.5},
    {"scaling_factor": 0.5, "shift_factor": 0.1},
    {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.0, 0.3], "latents_std": [1.0, 2.0, 0.5, 1.5]},
])
def test_latent_normalisation_round_trips(vae_config):
    from ldm.diffusion.objective import denormalise_latents, normalise_latents

    z = torch.randn(2, 4, 3, 3)
    normalised = normalise_latents(z, vae_config)
    torch.testing.assert_close(denormalise_latents(normalised, vae_config), z)
    if "latents_std" in vae_config:  # channel 1: (z + 0.2) * 0.5 / 2
        torch.testing.assert_close(normalised[:, 1], (z[:, 1] + 0.2) * 0.25)
    else:
        torch.testing.assert_close(normalised, (z - vae_config.get("shift_factor", 0.0)) * 0.5)
