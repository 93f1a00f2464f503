"""The autoencoder objective of Latent Diffusion (Rombach et al. 2022, appendix G), itself the
taming-transformers loss (Esser et al. 2021) with a KL term in place of vector quantisation:

    L_vae  = rec(x, x̂) + lpips_weight · LPIPS(x, x̂) + kl_weight · KL(q(z|x) ‖ N(0, I)) + λ · GAN_g(x̂)
    L_disc = hinge(D(x), D(x̂))

with λ = disc_weight · ‖∇ rec‖ / ‖∇ GAN_g‖ at the decoder's last layer, once the discriminator is on.

LDM sums the reconstruction and KL over each image and averages over the batch. We divide that
whole objective by the image's 3·H·W values: the same minimiser and the same relative weights (so
kl_weight = 1e-6 means what it means there), but a loss of the same size at any resolution, so a
learning rate and max_grad_norm carry over between configs. The adaptive weight absorbs the scale.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm.config import ConfigError
from ldm.training.vae_config import VAEConfig

VGG16_WEIGHTS = "vgg16-397923af.pth"  # torchvision's file name for the VGG16 that LPIPS builds on
ADAPTIVE_WEIGHT_MAX = 1e4  # LDM's clamp: keeps λ finite when the GAN gradient vanishes


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (l1, LDM's choice: sharper edges) or squared (l2) error per pixel value."""
    if kind == "l1":
        return F.l1_loss(reconstructions, images)
    if kind == "l2":
        return F.mse_loss(reconstructions, images)
    raise ConfigError(f"reconstruction_loss {kind!r} is not one of l1, l2")


def kl_loss(posterior: DiagonalGaussianDistribution, values_per_image: int) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)), summed over each image's latent, averaged over the batch, per pixel value."""
    return posterior.kl().mean() / values_per_image


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The autoencoder wants the discriminator to score its reconstructions as real."""
    return -fake_logits.mean()


def hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator (Lim & Ye 2017), as LDM uses: real above +1, fake below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(reconstruction: torch.Tensor, generator: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """λ = disc_weight · ‖∇rec‖ / ‖∇gan‖ at the decoder's last layer (Esser et al. 2021, eq. 7):
    the GAN term pulls on the output about as hard as the reconstruction term, whatever the
    scale of either. Computed with autograd.grad, which leaves `.grad` alone."""
    rec_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(generator, last_layer, retain_graph=True)
    ratio = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return disc_weight * ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradients for `module`'s weights while the autoencoder trains through it: what
    PyTorch Lightning's `toggle_optimizer` did for LDM. Its input still gets gradients."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)


def autoencoder_loss(images: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussianDistribution,
                     config: VAEConfig, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None,
                     last_layer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """L_vae and its terms. Pass the (unwrapped) discriminator once it is switched on."""
    reconstruction = reconstruction_loss(images, reconstructions, config.reconstruction_loss)
    if perceptual is not None:
        reconstruction = reconstruction + config.lpips_weight * perceptual(reconstructions, images).mean()
    kl = kl_loss(posterior, images[0].numel())
    loss = reconstruction + config.kl_weight * kl
    terms = {"reconstruction": reconstruction, "kl": kl}
    if discriminator is not None:
        with frozen(discriminator):
            generator = generator_loss(discriminator(reconstructions))
        weight = adaptive_weight(reconstruction, generator, last_layer, config.disc_weight)
        loss = loss + weight * generator
        terms.update(generator=generator, adaptive_weight=weight)
    return {"loss": loss, **terms}


def discriminator_loss(discriminator: nn.Module, images: torch.Tensor,
                       reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_disc on real images and (detached) reconstructions, in one call so that DDP sees one
    forward per backward; the per-sample GroupNorm keeps the two halves independent."""
    real, fake = discriminator(torch.cat([images, reconstructions.detach()])).chunk(2)
    return {"discriminator": hinge_loss(real, fake), "logits_real": real.mean(), "logits_fake": fake.mean()}


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix): a few strided 4×4 convolutions that score each
    overlapping patch as real or fake, so it judges texture and leaves layout to the
    reconstruction loss. GroupNorm instead of pix2pix's BatchNorm: no batch statistics to
    synchronise between processes, and real and fake images never normalise each other."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        widths = [channels * min(2 ** i, 8) for i in range(layers + 1)]
        blocks = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(32, widths[i]), widths[i]), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) convolutions and N(1, 0.02) norm scales (Radford et al. 2016), as taming does."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def load_lpips(weight: float) -> nn.Module | None:
    """LPIPS (Zhang et al. 2018) on VGG16, frozen but differentiable; None when `weight` is 0.

    Nothing may be downloaded at run time, so missing weights are a ConfigError at start rather
    than a failed download later.
    """
    if weight == 0:
        return None
    backbone = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS)
    if importlib.util.find_spec("lpips") is None or not os.path.isfile(backbone):
        raise ConfigError(f"lpips_weight = {weight} needs the `lpips` package and its VGG16 weights at {backbone}, "
                          "and neither may be downloaded at run time; install them, or set --lpips_weight 0")
    import lpips

    # Frozen weights, but not no_grad: gradients must reach the reconstruction (the diffusers
    # research script ran LPIPS under no_grad, which made it a constant that trained nothing).
    return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
