"""A held-out validation loss on the same draws at every evaluation.

The training loss moves with every batch's random timesteps and noise, so two checkpoints' losses differ by
more than their quality. Here the latent sample, the noise and the timesteps are drawn once, from a private
generator, when the set is made; every `evaluate` then scores a model on exactly those noisy latents (the idea
of kohya's fixed-timestep validation loss and of SimpleTuner's eval loss). The timesteps are stratified within
each of training's loss bins, so every bin is covered once there are at least `bins` latents, and the result
breaks the loss down by the same bins as training's `loss_by_timestep/bin_XX` logs.

The loss is training's unweighted MSE to `objective.target` (no min-SNR weights, no noise offset, no input
perturbation): a fixed yardstick, whatever the training recipe. Identical bits need the same thread count,
batch size and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.diffusion import objective

BINS = 10  # training's default loss_bins

Predict = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class HeldOutLoss(NamedTuple):
    loss: float  # mean over every held-out latent
    by_bin: dict[int, float]  # timestep bin → mean loss, for the bins that hold latents
    count: int
    count_by_bin: dict[int, int]


def spread_timesteps(count: int, num_timesteps: int, bins: int, generator: torch.Generator) -> torch.Tensor:
    """`count` timesteps, near-equally many in each of `bins` equal-width bins (the bins of
    `objective.loss_by_timestep_bin`) and stratified within each bin, in a random order."""
    bin_of_sample = torch.arange(count) * bins // count  # every bin gets count // bins or one more
    timesteps = torch.empty(count, dtype=torch.long)
    for b in range(bins):
        members = (bin_of_sample == b).nonzero().flatten()
        low, high = -(-b * num_timesteps // bins), -(-(b + 1) * num_timesteps // bins)  # t·bins // T == b
        strata = (torch.arange(len(members)) + torch.rand(len(members), generator=generator)) / max(len(members), 1)
        timesteps[members] = low + (strata * (high - low)).long().clamp(max=high - low - 1)
    return timesteps[torch.randperm(count, generator=generator)]


@dataclass(frozen=True, eq=False)
class HeldOutSet:
    """Fixed noisy held-out latents, their targets and caption embeddings; made by `from_latents` or
    `from_posterior`, scored by `evaluate`."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor  # integer training timesteps: the bins
    model_timesteps: torch.Tensor  # what the model is given for them (σ·T for flow)
    embeddings: torch.Tensor | None
    num_train_timesteps: int
    bins: int
    batch_size: int

    @classmethod
    def from_latents(cls, latents: torch.Tensor, embeddings: torch.Tensor | None, scheduler: SchedulerMixin, *,
                     seed: int = 0, bins: int = BINS, batch_size: int = 64) -> HeldOutSet:
        """From diffusion-space latents [N, C, h, w] (already normalised, as the UNet trains on them) and one
        embedding row per latent (None for an unconditional predictor). Draws noise and timesteps once."""
        return draw_held_out(latents, embeddings, scheduler, torch.Generator().manual_seed(seed), bins, batch_size)

    @classmethod
    def from_posterior(cls, mean: torch.Tensor, std: torch.Tensor, embeddings: torch.Tensor | None,
                       scheduler: SchedulerMixin, vae_config, *, seed: int = 0, bins: int = BINS,
                       batch_size: int = 64) -> HeldOutSet:
        """From the VAE posterior's mean and std (as training's `posterior(vae, batch)` gives them): draws one
        latent sample, mean + std·e, once, normalises it with the VAE's config as training does, then draws the
        noise and timesteps from the same private generator."""
        check_latents(mean, "mean")
        if std.shape != mean.shape:
            raise ValueError(f"std has shape {tuple(std.shape)} but mean has {tuple(mean.shape)}: give one std "
                             "per mean value")
        generator = torch.Generator().manual_seed(seed)
        draw = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        latents = objective.normalise_latents(mean + std * draw, vae_config)
        return draw_held_out(latents, embeddings, scheduler, generator, bins, batch_size)

    @torch.no_grad()
    def evaluate(self, predict: Predict) -> HeldOutLoss:
        """The mean MSE of `predict(noisy, timesteps, embeddings)` to the training target, overall and per
        timestep bin, in batches. Any global random numbers that `predict` draws (dropout in train mode) are
        given back afterwards, so the trainer's random state is as it was."""
        losses = []
        with untouched_global_rng(self.noisy.device):
            for start in range(0, len(self.timesteps), self.batch_size):
                rows = slice(start, start + self.batch_size)
                embeddings = None if self.embeddings is None else self.embeddings[rows]
                prediction = predict(self.noisy[rows], self.model_timesteps[rows], embeddings)
                if prediction.shape != self.noisy[rows].shape:
                    raise ValueError(f"predict returned shape {tuple(prediction.shape)} for input "
                                     f"{tuple(self.noisy[rows].shape)}: it must return one prediction of that shape")
                per_sample = F.mse_loss(prediction.float(), self.target[rows].float(), reduction="none")
                losses.append(per_sample.flatten(1).mean(dim=1).cpu())
        return summarise(torch.cat(losses), self.timesteps.cpu(), self.num_train_timesteps, self.bins)


def summarise(per_sample: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int, bins: int) -> HeldOutLoss:
    """Per-sample losses as their mean, overall and per timestep bin (training's bins)."""
    per_sample = per_sample.to(torch.float64)
    by_bin = objective.loss_by_timestep_bin(per_sample, timesteps, num_train_timesteps, bins)
    return HeldOutLoss(loss=per_sample.mean().item(), by_bin={b: total / n for b, (total, n) in sorted(by_bin.items())},
                       count=len(per_sample), count_by_bin={b: n for b, (_, n) in sorted(by_bin.items())})


def draw_held_out(latents: torch.Tensor, embeddings: torch.Tensor | None, scheduler: SchedulerMixin,
                  generator: torch.Generator, bins: int, batch_size: int) -> HeldOutSet:
    """Timesteps, then noise, from the CPU `generator` (the same draws on any device); the noisy latents and
    targets made from them as training makes its own."""
    num_timesteps = scheduler.config.num_train_timesteps
    check_latents(latents, "latents")
    if embeddings is not None and embeddings.shape[0] != latents.shape[0]:
        raise ValueError(f"embeddings have {embeddings.shape[0]} rows for {latents.shape[0]} latents: "
                         "give one caption embedding per latent")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= num_timesteps:
        raise ValueError(f"bins {bins!r} must be an integer from 1 to the {num_timesteps} training timesteps")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be a positive integer")
    timesteps = spread_timesteps(latents.shape[0], num_timesteps, bins, generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    return HeldOutSet(noisy=objective.noised(scheduler, latents, noise, timesteps),
                      target=objective.target(scheduler, latents, noise, timesteps), timesteps=timesteps,
                      model_timesteps=objective.model_timesteps(scheduler, timesteps),
                      embeddings=embeddings, num_train_timesteps=num_timesteps, bins=bins, batch_size=batch_size)


def check_latents(latents: torch.Tensor, name: str) -> None:
    if latents.dim() < 2 or latents.shape[0] < 1:
        raise ValueError(f"{name} of shape {tuple(latents.shape)} hold no samples: give at least one, "
                         "as [samples, channels, height, width]")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{name} contain {int((~torch.isfinite(latents)).sum())} NaN or infinite values")


def untouched_global_rng(device: torch.device):
    """Restore torch's global CPU random state (and the accelerator's, on one) when the block ends."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)
