"""train_vae.py's work: an AutoencoderKL trained with the LDM recipe (see ldm/training/vae_loss.py),
validated on held-out images (PSNR, SSIM, an image grid), its latent scale measured, and saved as
a diffusers folder that `AutoencoderKL.from_pretrained(output_dir)` loads.

`train` is the one training loop; the functions below it are what it calls once in a while.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from ldm.config import ConfigError, require_divisible
from ldm.data.dataset import ImageCaptionDataset, SkipCounter, dataloader, load_splits
from ldm.models.architecture import read_architecture, vae_scale_factor, vae_subfolder
from ldm.training.checkpoints import find_checkpoint, resume_state, resumed_batches, save_run_config
from ldm.training.loop import (
    Throughput,
    apply_gradients,
    averaged_weights,
    batch_generator,
    check_finite,
    checkpoint_or_stop,
    finish_run,
    finish_training,
    make_accelerator,
    make_ema,
    make_optimizer,
    shard,
    stop_on_signal,
    unreadable_rows,
)
from ldm.training.preemption import StopOnSignal
from ldm.training.vae_config import VAEConfig
from ldm.training.vae_loss import PatchDiscriminator, autoencoder_loss, discriminator_loss, load_lpips
from ldm.training.validation import save_validation_grid

logger = get_logger(__name__)


class Autoencode(torch.nn.Module):
    """Encode, sample the posterior, decode: one forward, so that it runs through the prepared
    (DDP) module. Calling the inner VAE's encode and decode directly bypasses DDP's gradient
    synchronisation, which is what the diffusers research script did."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator=generator)
        # DDP wants tensors out, so the posterior leaves as its parameters: mean and log-variance, stacked.
        return self.vae.decode(latents).sample, latents, posterior.parameters


def train(config: VAEConfig) -> dict:
    """Train, validate, checkpoint, measure the latent scale, save. Returns the final numbers."""
    # 1. Everything that can be checked is checked before anything expensive.
    architecture = vae_architecture(config)
    require_divisible(config.resolution, vae_scale_factor(architecture), "VAE")
    find_checkpoint(config.resume_from_checkpoint, config.output_dir)
    perceptual = load_lpips(config.lpips_weight)
    accelerator = make_accelerator(config, "train_vae")
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir)

    # 2. Models and optimizers. Weights stay fp32; mixed precision only autocasts the forward.
    vae = load_vae(config, architecture).train()
    autoencoder = Autoencode(vae)
    optimizer, scheduler = make_optimizer(vae.parameters(), config, accelerator)
    ema = make_ema(vae, config, accelerator)
    discriminator = PatchDiscriminator(config.disc_channels, config.disc_layers) if config.use_discriminator else None
    if perceptual is not None:
        perceptual.to(accelerator.device)

    # 3. Data. Corrupt images come back as skipped rows, counted here.
    with accelerator.main_process_first():  # one process builds the dataset cache, the others read it
        train_rows, validation_rows = load_splits(config)
    if config.max_validation_samples is not None:
        validation_rows = validation_rows.select(range(min(config.max_validation_samples, len(validation_rows))))
    loader = dataloader(ImageCaptionDataset.from_config(train_rows, config, seed=config.seed), config.train_batch_size,
                        shuffle=True, num_workers=config.dataloader_num_workers)
    autoencoder, optimizer, scheduler, loader = accelerator.prepare(autoencoder, optimizer, scheduler, loader)
    if discriminator is not None:
        d_optimizer, d_scheduler = make_optimizer(discriminator.parameters(), config, accelerator,
                                                  config.disc_learning_rate, config.max_train_steps - config.disc_start)
        discriminator, d_optimizer, d_scheduler = accelerator.prepare(discriminator, d_optimizer, d_scheduler)
        critic = accelerator.unwrap_model(discriminator)  # scores reconstructions for the autoencoder's loss
    models = [m for m in (autoencoder, discriminator) if m is not None]

    # 4. Resume: weights, optimizers, schedules, EMA, RNG states, step, and position in the data.
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    global_step, first_epoch, batches_to_skip = resume_state(accelerator, config, steps_per_epoch)
    logger.info(f"{len(train_rows)} training and {len(validation_rows)} held-out images; "
                f"{steps_per_epoch} steps per epoch on each of {accelerator.num_processes} process(es)")

    # 5. The loop.
    skipped, meter = SkipCounter(), Throughput()
    running, micro_batches, images, stopping = None, 0, 0, False
    # A stop signal from here on is deferred: in the loop it ends the run after the step in progress,
    # with a checkpoint; after the loop, the final save completes.
    with StopOnSignal(config.save_on_signal) as stop:
        with tqdm(total=config.max_train_steps, initial=global_step, desc="train_vae",
                  disable=not accelerator.is_local_main_process) as progress:
            for batch_number, batch in resumed_batches(accelerator, loader, first_epoch, batches_to_skip):
                if global_step >= config.max_train_steps:
                    break
                skipped.update(batch)
                if not batch["indices"]:  # every image of this batch was unreadable
                    if len(skipped.rows) == len(train_rows):
                        raise ConfigError(f"none of the {len(train_rows)} training images can be read: check "
                                          "image_column and the files")
                    continue
                pixels = batch["pixel_values"]
                with accelerator.accumulate(*models):
                    noise = batch_generator(config.seed, accelerator.process_index, batch_number, accelerator.device)
                    reconstructions, latents, moments = autoencoder(pixels, noise)
                    gan_on = discriminator is not None and global_step >= config.disc_start
                    terms = autoencoder_loss(pixels, reconstructions, DiagonalGaussianDistribution(moments), config,
                                             perceptual, critic if gan_on else None, vae.decoder.conv_out.weight)
                    if gan_on:
                        d_terms = discriminator_loss(discriminator, pixels, reconstructions)
                        terms.update(d_terms)
                    terms["latent_std"] = latents.detach().std()
                    values = accelerator.reduce(torch.stack([t.detach().float() for t in terms.values()]), "mean")
                    check_finite(values[0], global_step + 1)  # values[0] is the loss, averaged over processes

                    apply_gradients(accelerator, terms["loss"], list(autoencoder.parameters()), optimizer, scheduler,
                                    config.max_grad_norm)
                    if gan_on:
                        apply_gradients(accelerator, d_terms["discriminator"], list(discriminator.parameters()),
                                        d_optimizer, d_scheduler, config.max_grad_norm)

                running = values if running is None else running + values
                micro_batches += 1
                images += len(batch["indices"]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                if ema is not None:
                    ema.step(vae.parameters())
                meter.update(images)
                logs = {f"train/{name}": value.item() for name, value in zip(terms, running / micro_batches)}
                logs.update({"train/learning_rate": scheduler.get_last_lr()[0], "train/images_per_second": meter.rate})
                accelerator.log(logs, step=global_step)
                progress.update(1)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{meter.rate:.0f}")
                running, micro_batches, images = None, 0, 0

                stopping = checkpoint_or_stop(accelerator, config, global_step, stop, meter)
                if stopping:
                    break
                if global_step % config.validation_steps == 0 and global_step < config.max_train_steps:
                    with averaged_weights(ema, vae):
                        validate(vae, validation_rows, config, accelerator, global_step)
                    meter.restart()

        if stopping:
            stop_on_signal(accelerator, stop, global_step, config.output_dir, *models)

        # 6. The final model: EMA weights if any, validated, its latent scale measured, saved.
        accelerator.wait_for_everyone()
        if ema is not None:
            ema.copy_to(vae.parameters())
        metrics = validate(vae, validation_rows, config, accelerator, global_step)
        stats = latent_statistics(vae, train_rows, config, accelerator)
        unreadable = unreadable_rows(skipped, len(train_rows), accelerator)
        if accelerator.is_main_process:
            save_vae(vae, stats, config)
        accelerator.log({"latents/scaling_factor": stats["scaling_factor"], "latents/std": stats["std"],
                         "data/unreadable_images": len(unreadable)}, step=global_step)
        logger.info(f"latent std {stats['std']:.4f}: scaling_factor = {stats['scaling_factor']:.4f}; "
                    f"skipped {len(unreadable)} unreadable training image(s) {unreadable[:20]}; "
                    f"saved the VAE to {config.output_dir}")
        finish_training(accelerator, *models)
        result = {"global_step": global_step, "scaling_factor": stats["scaling_factor"], **metrics,
                  "unreadable_images": unreadable}
        if accelerator.is_main_process:
            finish_run(config, result)
        return result


def vae_architecture(config: VAEConfig) -> dict:
    """The architecture train_vae.py will train: the pretrained model's, or `vae_config`'s."""
    if config.pretrained_vae_model_name_or_path is not None:
        subfolder = vae_subfolder(config.pretrained_vae_model_name_or_path, None, "pretrained_vae_model_name_or_path")
        return dict(AutoencoderKL.load_config(config.pretrained_vae_model_name_or_path, subfolder=subfolder))
    return read_architecture(config.vae_config, AutoencoderKL)


def load_vae(config: VAEConfig, architecture: dict) -> AutoencoderKL:
    """Pretrained weights for fine-tuning, or a freshly initialised model of `architecture`."""
    path = config.pretrained_vae_model_name_or_path
    if path is not None:
        subfolder = vae_subfolder(path, None, "pretrained_vae_model_name_or_path")
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    return AutoencoderKL.from_config(architecture)


def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mean and decode: the deterministic reconstruction."""
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for pixel values in [-1, 1] (peak-to-peak 2)."""
    mse = ((images - reconstructions) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(images: torch.Tensor, reconstructions: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): an 11×11 Gaussian window (σ = 1.5)
    over the valid positions of each channel, on values rescaled to [0, 1], averaged."""
    x, y = (images + 1) / 2, (reconstructions + 1) / 2
    size = min(window, x.shape[-1], x.shape[-2])
    offsets = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    gauss = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = torch.outer(gauss, gauss) / gauss.sum() ** 2
    kernel = kernel.expand(x.shape[1], 1, size, size)

    def local_mean(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # K1, K2 of the paper, for a dynamic range of 1
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)


@torch.no_grad()
def validate(vae: AutoencoderKL, rows, config: VAEConfig, accelerator: Accelerator, step: int) -> dict:
    """PSNR and SSIM over the held-out rows (split across processes), and an image grid."""
    if len(rows) == 0:
        logger.warning("no held-out images: skipping validation (raise validation_fraction)")
        return {"psnr": None, "ssim": None}
    vae.eval()
    dataset = ImageCaptionDataset.from_config(rows, config, train=False)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # PSNR sum, SSIM sum, images
    for batch in dataloader(shard(dataset, accelerator), config.train_batch_size, shuffle=False):
        if batch["indices"]:
            images = batch["pixel_values"].to(accelerator.device)
            restored = reconstruct(vae, images)
            totals += torch.stack([psnr(images, restored).sum(), ssim(images, restored).sum(),
                                   torch.tensor(float(len(images)), device=images.device)]).double()
    totals = accelerator.reduce(totals, "sum")
    metrics = {"psnr": (totals[0] / totals[2]).item(), "ssim": (totals[1] / totals[2]).item()}
    if accelerator.is_main_process and config.num_validation_images:
        save_validation_grid(comparison_grid(vae, dataset, config.num_validation_images, accelerator.device),
                             config.output_dir, accelerator, step, "reconstructions")
    vae.train()
    accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
    logger.info(f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
    return metrics


def comparison_grid(vae: AutoencoderKL, dataset: ImageCaptionDataset, count: int, device) -> np.ndarray:
    """The first `count` readable held-out images on the top row, their reconstructions below (HWC uint8)."""
    rows = (dataset[i] for i in range(len(dataset)))
    images = torch.stack([row["pixel_values"] for row in rows if not row.get("skipped")][:count]).to(device)
    pair = torch.cat([images, reconstruct(vae, images)], dim=2)  # each column: original above reconstruction
    strip = torch.cat(list(pair), dim=2)
    return ((strip.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, rows, config: VAEConfig, accelerator: Accelerator) -> dict:
    """Mean and standard deviation of the latents z ~ q(z|x) the UNet will train on, over the
    training images (or `scale_batches` batches of them), all processes together.

    LDM rescales latents by 1 / std so the diffusion model sees unit variance (Rombach et al.
    2022, sec. 4.3.2); Stable Diffusion's 0.18215 is that number for its own VAE, not a constant.
    The expectation over the sampling noise is taken exactly: E[z²] = μ² + σ² per latent.
    """
    vae.eval()
    if config.scale_batches is not None:
        count = min(len(rows), config.scale_batches * config.train_batch_size)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))
        rows = rows.select(order[:count].tolist())
    dataset = ImageCaptionDataset.from_config(rows, config, train=False)
    channels = vae.config.latent_channels
    sums = torch.zeros(3, channels, dtype=torch.float64, device=accelerator.device)  # Σμ, Σ(μ²+σ²), count
    for batch in dataloader(shard(dataset, accelerator), config.train_batch_size, shuffle=False):
        if batch["indices"]:
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
            mean, var = posterior.mean.double(), posterior.var.double()
            sums[0] += mean.sum((0, 2, 3))
            sums[1] += (mean ** 2 + var).sum((0, 2, 3))
            sums[2] += mean[:, 0].numel()
    sums = accelerator.reduce(sums, "sum")
    channel_mean = sums[0] / sums[2]
    channel_std = (sums[1] / sums[2] - channel_mean ** 2).sqrt()
    std = (sums[1].sum() / sums[2].sum() - (sums[0].sum() / sums[2].sum()) ** 2).sqrt().item()
    vae.train()
    return {"scaling_factor": 1.0 / std, "std": std, "mean": channel_mean.tolist(), "channel_std": channel_std.tolist()}


def save_vae(vae: AutoencoderKL, stats: dict, config: VAEConfig) -> None:
    """config.json (with the measured scale) and safetensors weights at the root of output_dir."""
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    if config.latent_channel_stats:
        vae.register_to_config(latents_mean=stats["mean"], latents_std=stats["channel_std"])
    vae.save_pretrained(config.output_dir, safe_serialization=True)
