"""Timestep sampling: uniform, logit-normal (SD3) and importance sampling (Nichol & Dhariwal 2021)."""

import json
import os
import subprocess

import pytest
import torch

from ldm.diffusion.timesteps import (
    UNIFORM_SHARE,
    ImportanceTimesteps,
    LogitNormalTimesteps,
    UniformTimesteps,
    mass_by_bin,
    timestep_sampler,
)
from tests.conftest import two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_draws_what_the_trainer_always_drew():
    timesteps, weights = UniformTimesteps(1000).sample(64, generator())
    assert torch.equal(timesteps, torch.randint(0, 1000, (64,), generator=generator()))
    assert torch.equal(weights, torch.ones(64))


@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_logit_normal_draws_follow_its_probabilities(mean):
    sampler = LogitNormalTimesteps(1000, mean=mean, std=1.0)
    timesteps, weights = sampler.sample(200_000, generator())
    assert torch.equal(weights, torch.ones(200_000)) and 0 <= timesteps.min() and timesteps.max() < 1000
    p = sampler.probabilities()
    assert abs(p.sum() - 1) < 1e-5
    drawn = torch.tensor(mass_by_bin(torch.bincount(timesteps, minlength=1000).float() / 200_000, 20))
    assert (drawn - torch.tensor(mass_by_bin(p, 20))).abs().max() < 0.005
    # the middle is favoured (mean 0), or the noisy end (mean 1: t/T = sigmoid(u) leans to 1)
    middle, ends = sum(mass_by_bin(p, 4)[1:3]), mass_by_bin(p, 4)[0] + mass_by_bin(p, 4)[3]
    assert (middle > 0.6) if mean == 0 else (mass_by_bin(p, 4)[3] > mass_by_bin(p, 4)[0] * 3)
    assert middle + ends == pytest.approx(1, abs=1e-5)


def synthetic_loss(timesteps):
    """A loss that is large at low t and falls off, as epsilon-prediction losses do."""
    return 0.05 + 2.0 * torch.exp(-timesteps.double() / 60)


def warmed(sampler, seed=0):
    g = generator(seed)
    while not sampler.warmed_up:
        timesteps, weights = sampler.sample(64, g)
        assert torch.equal(weights, torch.ones(64))  # uniform, unweighted, during the warm-up
        sampler.update(timesteps, synthetic_loss(timesteps) * (1 + 0.1 * torch.randn(64, generator=g)))
    return sampler


def test_importance_sampling_keeps_the_expected_loss_of_uniform_sampling():
    sampler = warmed(ImportanceTimesteps(200, history=10))
    p = sampler.probabilities()
    assert abs(p.sum() - 1) < 1e-5 and p.min() >= UNIFORM_SHARE / 200
    assert p[:10].mean() > 5 * p[-10:].mean()  # the loud timesteps are drawn more often
    # p(t) ∝ √E[L_t²] over the history, with a uniform share mixed in
    expected = sampler.losses.square().mean(dim=1).sqrt()
    torch.testing.assert_close(p.double(), expected / expected.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / 200,
                               rtol=1e-5, atol=1e-7)
    timesteps, weights = sampler.sample(400_000, generator(1))
    torch.testing.assert_close(weights, 1 / (200 * p[timesteps]))
    uniform_mean = synthetic_loss(torch.arange(200)).mean()
    weighted_mean = (weights.double() * synthetic_loss(timesteps)).mean()
    assert abs(weighted_mean - uniform_mean) < 0.01 * uniform_mean  # unbiased...
    assert synthetic_loss(timesteps).mean() > 1.5 * uniform_mean  # ...though the draws themselves are not
    spread = (weights.double() * synthetic_loss(timesteps)).var()
    uniform_spread = synthetic_loss(torch.randint(0, 200, (400_000,), generator=generator(2))).var()
    assert spread < uniform_spread  # and with less variance: the point of it


def test_importance_history_round_trips_and_sampling_continues_identically():
    sampler = warmed(ImportanceTimesteps(50, history=3))
    copy = ImportanceTimesteps(50, history=3)
    copy.load_state_dict(sampler.state_dict())
    for one in (sampler, copy):
        one.update(torch.tensor([3, 3, 7]), torch.tensor([9.0, 8.0, 7.0]))
    assert torch.equal(sampler.sample(16, generator(5))[0], copy.sample(16, generator(5))[0])
    assert sampler.losses[3].tolist().count(8.0) == 1 and sampler.counts[3] > 3


def test_names_and_bins():
    assert isinstance(timestep_sampler("importance", 10), ImportanceTimesteps)
    with pytest.raises(ValueError, match="not one of uniform, logit_normal, importance"):
        timestep_sampler("cosine", 10)
    assert mass_by_bin(torch.full((10,), 0.1), 4) == pytest.approx([0.3, 0.2, 0.3, 0.2])


GATHER = """
import json, sys
import torch
from accelerate import Accelerator
from ldm.diffusion.timesteps import ImportanceTimesteps
from ldm.training.loop import finish_training
accelerator = Accelerator()
sampler = ImportanceTimesteps(6, history=2, gather=accelerator.gather)
rank = accelerator.process_index
for step in range(4):  # each process feeds losses of its own; 6 timesteps x 2 losses are filled by then
    timesteps = torch.tensor([(2 * step + rank) % 6, (2 * step + rank + 3) % 6])
    sampler.update(timesteps, timesteps.float() + 10 * rank + step)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # one file each: two processes' prints interleave
    json.dump({"p": sampler.probabilities().tolist(), "warm": sampler.warmed_up}, f)
finish_training(accelerator)  # a barrier, then the process group closed, as the trainers end
"""


def test_with_two_processes_every_process_samples_from_the_same_gathered_history(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(
        [*two_processes(17), str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["p"] == reports[1]["p"] and reports[0]["warm"]
    # and it is the history one process would keep from both processes' losses, in process order
    alone = ImportanceTimesteps(6, history=2)
    for step in range(4):
        for rank in (0, 1):
            timesteps = torch.tensor([(2 * step + rank) % 6, (2 * step + rank + 3) % 6])
            alone.update(timesteps, timesteps.float() + 10 * rank + step)
    assert reports[0]["p"] == pytest.approx(alone.probabilities().tolist())
