"""The LDM autoencoder objective, term by term, against hand-computed values."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.config import ConfigError, parse_config
from ldm.training.vae_config import VAEConfig
from ldm.training.vae_loss import (
    ADAPTIVE_WEIGHT_MAX,
    PatchDiscriminator,
    adaptive_weight,
    autoencoder_loss,
    discriminator_loss,
    frozen,
    generator_loss,
    hinge_loss,
    kl_loss,
    load_lpips,
    reconstruction_loss,
)
from tests.conftest import TINY_VAE

pytestmark = pytest.mark.usefixtures("single_thread")


def test_reconstruction_losses_are_per_value_means():
    images, reconstructions = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    reconstructions[0] = -1.0
    assert reconstruction_loss(images, reconstructions, "l1").item() == pytest.approx((1.0 + 0.5) / 2)
    assert reconstruction_loss(images, reconstructions, "l2").item() == pytest.approx((1.0 + 0.25) / 2)
    with pytest.raises(ConfigError, match="reconstruction_loss 'l3' is not one of l1, l2"):
        reconstruction_loss(images, reconstructions, "l3")


def test_kl_is_the_closed_form_sum_per_image_divided_by_its_pixel_values():
    mean, logvar = torch.full((2, 4, 2, 2), 0.5), torch.full((2, 4, 2, 2), -1.0)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    per_latent = 0.5 * (0.5 ** 2 + torch.exp(torch.tensor(-1.0)) - 1 - (-1.0))
    assert kl_loss(posterior, values_per_image=3 * 8 * 8).item() == pytest.approx(per_latent * 16 / 192)


def test_hinge_and_generator_losses():
    confident = hinge_loss(real_logits=torch.tensor([2.0, 1.5]), fake_logits=torch.tensor([-3.0, -1.0]))
    assert confident.item() == 0.0  # beyond the margins: nothing to learn
    fooled = hinge_loss(real_logits=torch.tensor([-1.0]), fake_logits=torch.tensor([1.0]))
    assert fooled.item() == pytest.approx(0.5 * (2.0 + 2.0))
    assert generator_loss(torch.tensor([[1.0, 3.0]])).item() == -2.0


def test_adaptive_weight_is_the_clamped_ratio_of_gradient_norms():
    last_layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    reconstruction = (last_layer ** 2).sum()  # gradient 2w = (2, 4)
    generator = 0.1 * last_layer.sum()  # gradient (0.1, 0.1)
    weight = adaptive_weight(reconstruction, generator, last_layer, disc_weight=0.5)
    expected = 0.5 * (20 ** 0.5) / (0.02 ** 0.5 + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad and last_layer.grad is None  # .grad untouched
    flat = 0.0 * last_layer.sum()  # a GAN term with no gradient would give an infinite weight
    assert adaptive_weight(reconstruction, flat, last_layer, 1.0).item() == ADAPTIVE_WEIGHT_MAX


def test_generator_term_trains_the_decoder_through_a_frozen_discriminator():
    torch.manual_seed(0)
    vae, critic = AutoencoderKL.from_config(TINY_VAE), PatchDiscriminator(channels=8, layers=2)
    config = VAEConfig(kl_weight=1e-3, disc_weight=0.5)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(images).latent_dist
    reconstructions = vae.decode(posterior.sample()).sample
    last_layer = vae.decoder.conv_out.weight
    terms = autoencoder_loss(images, reconstructions, posterior, config, discriminator=critic, last_layer=last_layer)

    expected = terms["reconstruction"] + 1e-3 * terms["kl"] + terms["adaptive_weight"] * terms["generator"]
    assert terms["loss"].item() == pytest.approx(expected.item())
    assert terms["adaptive_weight"] > 0
    terms["loss"].backward()
    assert last_layer.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())  # the discriminator does not help the autoencoder
    assert all(p.requires_grad for p in critic.parameters())  # ...and is trainable again afterwards

    d_terms = discriminator_loss(critic, images, reconstructions)
    d_terms["discriminator"].backward()
    assert all(p.grad is not None for p in critic.parameters())


def test_without_discriminator_there_is_no_gan_term():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(TINY_VAE)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(images).latent_dist
    terms = autoencoder_loss(images, vae.decode(posterior.mode()).sample, posterior, VAEConfig())
    assert set(terms) == {"loss", "reconstruction", "kl"}


def test_frozen_restores_requires_grad_even_after_an_error():
    module = torch.nn.Linear(2, 2)
    module.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(module):
        assert not module.weight.requires_grad
        raise RuntimeError
    assert module.weight.requires_grad and not module.bias.requires_grad


@pytest.mark.parametrize("resolution, layers, patches", [(32, 3, 2), (16, 2, 2), (256, 3, 30)])
def test_patch_discriminator_scores_patches(resolution, layers, patches):
    critic = PatchDiscriminator(channels=8, layers=layers)
    assert critic(torch.zeros(2, 3, resolution, resolution)).shape == (2, 1, patches, patches)


def test_a_discriminator_too_deep_for_the_images_is_a_config_error():
    with pytest.raises(ConfigError, match="disc_layers = 3 is invalid; expected fewer layers: 16 px"):
        parse_config(VAEConfig, ["--use_discriminator", "true", "--resolution", "16", "--disc_layers", "3"])
    with pytest.raises(ConfigError, match="disc_start = 10 is invalid.*max_train_steps = 10"):
        parse_config(VAEConfig, ["--use_discriminator", "true", "--disc_start", "10", "--max_train_steps", "10"])


def test_lpips_asked_for_but_unavailable_fails_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no VGG16 weights in it
    assert load_lpips(0.0) is None
    with pytest.raises(ConfigError, match=r"lpips_weight = 1.0 needs the `lpips` package and its VGG16 weights "
                                          r".*vgg16-397923af.pth.*--lpips_weight 0"):
        load_lpips(1.0)
