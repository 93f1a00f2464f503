"""Which timesteps a training batch is noised to, and how each sample's loss is weighted for it.

- `uniform`: t ~ U{0, ..., T-1}, as DDPM and Stable Diffusion train.
- `logit_normal`: t/T = sigmoid(u), u ~ N(mean, std) (Esser et al. 2024, "Scaling Rectified Flow
  Transformers", §3.1): more samples at middle timesteps, where the loss is hardest to lower. It is a
  reweighting of the objective by design, so the losses are not corrected for it.
- `importance`: p(t) ∝ √E[L_t²] over the last `history` losses of each timestep, after a uniform
  warm-up until every timestep has them all (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
  Probabilistic Models", §3.3). Each sample's loss is weighted by 1 / (T·p(t)), so the expected
  loss is the uniform one and only its variance falls. With several processes the losses of all of
  them feed one history, so every process samples from the same p(t); it is saved in checkpoints.

Each sampler's `sample(count, generator)` returns (timesteps, loss weights); `update(timesteps,
losses)` takes the batch's per-sample losses.
"""

from __future__ import annotations

import torch

UNIFORM_SHARE = 0.001  # of p(t) kept uniform after the warm-up, so no timestep is never drawn (as the paper)


class UniformTimesteps:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        timesteps = torch.randint(0, self.num_timesteps, (count,), generator=generator, device=device)
        return timesteps, torch.ones(count, device=device)

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1 / self.num_timesteps)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""


class LogitNormalTimesteps(UniformTimesteps):
    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0):
        super().__init__(num_timesteps)
        self.mean, self.std = mean, std

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        u = torch.randn(count, generator=generator, device=device) * self.std + self.mean
        timesteps = (torch.sigmoid(u) * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        return timesteps, torch.ones(count, device=device)

    def probabilities(self) -> torch.Tensor:
        """The probability of each timestep: the logit-normal's mass over [t/T, (t+1)/T)."""
        edges = torch.linspace(0, 1, self.num_timesteps + 1, dtype=torch.float64)
        normal = torch.distributions.Normal(self.mean, self.std)
        mass = normal.cdf(torch.logit(edges))  # logit(0) = -inf, logit(1) = inf: the tails fall in the ends
        return (mass[1:] - mass[:-1]).float()


class ImportanceTimesteps(UniformTimesteps):
    def __init__(self, num_timesteps: int, history: int = 10, gather=None):
        """`gather(tensor)` concatenates a tensor across processes (Accelerator.gather); None for one."""
        super().__init__(num_timesteps)
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)
        self.gather = gather

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts >= self.losses.shape[1]).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up:
            return super().probabilities()
        weights = self.losses.square().mean(dim=1).sqrt()
        weights = weights / weights.sum()
        return (weights * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / self.num_timesteps).float()

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warmed_up:
            return super().sample(count, generator)
        p = self.probabilities().to(generator.device)
        timesteps = torch.multinomial(p, count, replacement=True, generator=generator)
        return timesteps, 1 / (self.num_timesteps * p[timesteps])

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Add every process's (timestep, loss) pairs, in process order, to the history."""
        pairs = torch.stack([timesteps.to(losses.dtype), losses.detach()])
        if self.gather is not None:
            pairs = self.gather(pairs.T.contiguous()).T
        history = self.losses.shape[1]
        for t, loss in zip(pairs[0].long().tolist(), pairs[1].tolist()):
            self.losses[t, self.counts[t] % history] = loss
            self.counts[t] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def mass_by_bin(probabilities: torch.Tensor, bins: int) -> list[float]:
    """p(t) summed over equal-width timestep bins (the bins the loss is logged in)."""
    bin_of = torch.arange(len(probabilities)) * bins // len(probabilities)
    return torch.zeros(bins).index_add_(0, bin_of, probabilities.float().cpu()).tolist()


def timestep_sampler(kind: str, num_timesteps: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                     history: int = 10, gather=None) -> UniformTimesteps:
    if kind == "uniform":
        return UniformTimesteps(num_timesteps)
    if kind == "logit_normal":
        return LogitNormalTimesteps(num_timesteps, logit_mean, logit_std)
    if kind == "importance":
        return ImportanceTimesteps(num_timesteps, history, gather)
    raise ValueError(f"timestep_sampling {kind!r} is not one of uniform, logit_normal, importance")
