"""train_vae.py's settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ldm.config import ConfigError, require
from ldm.training.config import TrainConfig


@dataclass
class VAEConfig(TrainConfig):
    """train_vae.py: an AutoencoderKL trained with the LDM recipe (Rombach et al. 2022, appendix G)."""

    vae_config: str = field(default="configs/models/vae_demo.json", metadata={
        "help": "a diffusers AutoencoderKL config.json: the architecture to train from scratch"})
    pretrained_vae_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "fine-tune this VAE (local folder or Hub id); its own architecture is used, not vae_config"})
    output_dir: str = "outputs/vae"
    adam_beta1: float = 0.5  # LDM's autoencoder betas (0.5, 0.9), as for GANs
    adam_beta2: float = 0.9
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term on the latent posterior"})
    lpips_weight: float = field(default=0.0, metadata={
        "help": "weight of the LPIPS perceptual loss (LDM: 1.0); needs the lpips package and its weights locally"})
    use_discriminator: bool = field(default=False, metadata={"help": "add a PatchGAN discriminator (hinge loss)"})
    disc_start: int = field(default=0, metadata={"help": "optimizer step at which the discriminator switches on"})
    disc_weight: float = field(default=0.5, metadata={"help": "multiplies the adaptive GAN weight"})
    disc_learning_rate: Optional[float] = field(default=None, metadata={"help": "default: learning_rate"})
    disc_channels: int = field(default=64, metadata={"help": "width of the discriminator's first layer"})
    disc_layers: int = field(default=3, metadata={"help": "strided conv layers of the discriminator"})
    scale_batches: Optional[int] = field(default=None, metadata={
        "help": "batches (of train_batch_size, all processes together) to measure the latent scale on; "
                "default: the whole training set"})
    latent_channel_stats: bool = field(default=False, metadata={
        "help": "also write per-channel latents_mean and latents_std into the VAE's config.json"})
    max_validation_samples: Optional[int] = field(default=None, metadata={
        "help": "held-out images to compute PSNR and SSIM on; default: all of them"})
    num_validation_images: int = field(default=8, metadata={"help": "originals/reconstructions in the image grid"})

    def validate(self) -> None:
        super().validate()
        if self.pretrained_vae_model_name_or_path is None and not os.path.isfile(self.vae_config):
            raise ConfigError(f"vae_config {self.vae_config!r} is not a file; give a diffusers config.json "
                              "(see configs/models/) or --pretrained_vae_model_name_or_path")
        for name in ("kl_weight", "lpips_weight", "disc_weight", "disc_start"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        for name in ("disc_channels", "disc_layers"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in ("disc_learning_rate", "scale_batches", "max_validation_samples"):
            value = getattr(self, name)
            require(value is None or value > 0, name, value, "a positive number or null")
        require(self.num_validation_images >= 0, "num_validation_images", self.num_validation_images, "0 or more")
        # The PatchGAN halves the image disc_layers times, then two 4x4 convolutions trim a pixel each.
        require(not self.use_discriminator or self.resolution // 2 ** self.disc_layers >= 3, "disc_layers",
                self.disc_layers, f"fewer layers: {self.resolution} px images shrink to nothing in the discriminator")
        require(not self.use_discriminator or self.disc_start < self.max_train_steps, "disc_start", self.disc_start,
                f"a step before max_train_steps = {self.max_train_steps}, or the discriminator never trains")
