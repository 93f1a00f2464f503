"""The trainers' shared machinery, on a real Accelerator with a tiny model: atomic checkpoints,
rotation, resume arithmetic, EMA in checkpoints, the NaN guard, per-batch noise, throughput."""

import os
import random
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL

from ldm.config import ConfigError, parse_config
from ldm.data.dataset import EpochDataset, dataloader
from ldm.training.checkpoints import (
    complete_checkpoints,
    find_checkpoint,
    resume_state,
    resumed_batches,
    save_checkpoint,
    save_run_config,
)
from ldm.training.config import TrainConfig
from ldm.training.loop import (
    NonFiniteLossError,
    Throughput,
    averaged_weights,
    batch_generator,
    check_finite,
    finish_training,
    make_accelerator,
    make_ema,
    make_optimizer,
)
from tests.conftest import TINY_VAE


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps process-wide state; each test builds its Accelerator from scratch."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


pytestmark = pytest.mark.usefixtures("single_thread")


def setup(tmp_path, **overrides):
    config = TrainConfig(output_dir=str(tmp_path / "run"), report_to="none", use_ema=True, **overrides)
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(TINY_VAE)
    optimizer, scheduler = make_optimizer(model.parameters(), config, accelerator)
    ema = make_ema(model, config, accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return config, accelerator, model, optimizer, scheduler, ema


def train_step(model, optimizer, scheduler, ema):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = (model(images).sample - images).abs().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    ema.step(model.parameters())


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_checkpoints_rotate_and_resume_restores_model_optimizer_schedule_and_ema(tmp_path):
    config, accelerator, model, optimizer, scheduler, ema = setup(
        tmp_path, checkpoints_total_limit=2, gradient_accumulation_steps=3, lr_warmup_steps=10)
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler, ema)
        save_checkpoint(accelerator, config.output_dir, step, config.checkpoints_total_limit, config)
    assert [os.path.basename(p) for p in complete_checkpoints(config.output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert not [name for name in os.listdir(config.output_dir) if name.endswith(".partial")]
    saved_config = tmp_path / "run" / "checkpoint-3" / "training_config.yaml"
    assert parse_config(TrainConfig, ["--config", str(saved_config)]) == config
    saved, saved_ema, saved_lr = weights(model), [p.clone() for p in ema.shadow_params], scheduler.get_last_lr()

    train_step(model, optimizer, scheduler, ema)  # moves everything on, past the checkpoint
    config.resume_from_checkpoint = "latest"
    # 7 optimizer steps per epoch; step 3 is 3 steps into epoch 0, i.e. 3 x 3 accumulated batches.
    assert resume_state(accelerator, config, steps_per_epoch=7) == (3, 0, 9)
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, saved_ema))
    assert ema.optimization_step == 3
    assert scheduler.get_last_lr() == saved_lr and optimizer.state_dict()["state"][0]["step"] == 3
    assert resume_state(accelerator, config, steps_per_epoch=2)[1:] == (1, 3)  # 3 = one step into epoch 1


def test_a_partial_checkpoint_is_never_resumed_and_is_replaced(tmp_path):
    config, accelerator, model, optimizer, scheduler, ema = setup(tmp_path)
    save_checkpoint(accelerator, config.output_dir, 1)
    # What a run killed while writing checkpoint-2 leaves behind.
    os.makedirs(os.path.join(config.output_dir, "checkpoint-2.partial"))
    assert find_checkpoint("latest", config.output_dir).endswith("checkpoint-1")
    train_step(model, optimizer, scheduler, ema)
    save_checkpoint(accelerator, config.output_dir, 2)
    save_checkpoint(accelerator, config.output_dir, 2)  # a rerun of the same step replaces it whole
    assert sorted(os.listdir(config.output_dir)) == ["checkpoint-1", "checkpoint-2"]
    assert "model.safetensors" in os.listdir(os.path.join(config.output_dir, "checkpoint-2"))


def test_find_checkpoint_names_bad_paths_and_starts_fresh_without_one(tmp_path):
    assert find_checkpoint(None, str(tmp_path)) is None
    assert find_checkpoint("latest", str(tmp_path / "missing")) is None
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-10.partial").mkdir()
    assert find_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-7")
    with pytest.raises(ConfigError, match=r"'.*checkpoint-10.partial' is not a complete checkpoint.*checkpoint-7"):
        find_checkpoint(str(tmp_path / "checkpoint-10.partial"), str(tmp_path))
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path / "checkpoint-8"), str(tmp_path))


def test_ema_weights_are_swapped_in_and_back(tmp_path):
    _, _, model, optimizer, scheduler, ema = setup(tmp_path)
    for _ in range(3):
        train_step(model, optimizer, scheduler, ema)
    own = weights(model)
    with averaged_weights(ema, model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
        assert not all(torch.equal(p, own[name]) for name, p in model.named_parameters())
    assert all(torch.equal(p, own[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_step(bad):
    check_finite(torch.tensor(0.5), 3)
    with pytest.raises(NonFiniteLossError, match=r"the loss is .*(nan|inf).* at step 12: training diverged"):
        check_finite(torch.tensor(bad), 12)


def test_schedule_warms_up_over_the_configured_steps(tmp_path):
    _, _, _, optimizer, scheduler, _ = setup(tmp_path, lr_warmup_steps=4, learning_rate=1e-3,
                                             lr_scheduler="constant_with_warmup")
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop(tmp_path):
    config, accelerator, model, optimizer, scheduler, _ = setup(tmp_path, learning_rate=1e-2, adam_weight_decay=0.1)
    assert optimizer.optimizer.defaults["fused"]
    plain_model = AutoencoderKL.from_config(TINY_VAE)
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    start = weights(plain_model)
    images_from, steps = torch.Generator().manual_seed(0), 5
    for _ in range(steps):
        # The same gradients for both: Adam divides by sqrt(v), so where v is tiny a rounding
        # difference in the forward would grow into a different step that says nothing of the update.
        images = torch.rand(2, 3, 16, 16, generator=images_from) * 2 - 1
        (model(images).sample - images).abs().mean().backward()
        for fused_parameter, parameter in zip(model.parameters(), plain_model.parameters()):
            parameter.grad = fused_parameter.grad.clone()
        for opt in (optimizer, plain):
            opt.step()
            opt.zero_grad()
    fused_weights, plain_weights = weights(model), weights(plain_model)
    # Every weight moved, not by how much: where the gradient is zero in exact arithmetic (a key's
    # bias under softmax) it is float32 noise far below eps, so Adam's step there is about
    # lr * noise / eps, a size that differs from CPU to CPU (such a tensor moved 8.4e-4 at most on a
    # Xeon, 1.4e-3 on an EPYC). Weight decay alone moves every nonzero weight by lr * weight_decay *
    # |w| a step, thousands of ulps (the zero-initialised ones, norms' biases, have real gradients),
    # so a weight where it started means the optimizer skipped it.
    unmoved = [name for name, p in fused_weights.items() if (p == start[name]).any()]
    assert not unmoved, f"{len(unmoved)} tensors with weights the fused AdamW left unchanged: {unmoved[:5]}"
    # The same update. The two kernels order their float32 operations differently (decay, both
    # moments, the denominator, the division, the add), each rounded to half an ulp of its result,
    # so a step can differ by a few ulps of the weight and of the step's size, which is at most
    # about lr. 8 ulps of |w| + lr a step bounds that with room (measured: under 4 over all 5
    # steps); it is 5e-6 of a step, and a wrong decay, bias correction, beta or eps is off by more.
    rtol = steps * 8 * torch.finfo(torch.float32).eps
    for name, p in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], p, rtol=rtol, atol=rtol * 1e-2,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_finish_training_frees_the_ddp_reducers_then_the_process_group(tmp_path):
    # A reducer dropping the last reference to a gloo group destroys it holding the GIL, which a
    # gloo thread freeing a collective's tensors may be waiting for (see finish_training).
    accelerator = make_accelerator(TrainConfig(output_dir=str(tmp_path / "run"), report_to="none"))
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    torch.distributed.all_reduce(torch.ones(3))
    finish_training(accelerator, model)
    assert "reducer" not in vars(model) and "logger" not in vars(model)
    assert not torch.distributed.is_initialized()


def test_batch_noise_depends_only_on_seed_process_and_batch():
    def draw(*key):
        return torch.randn(4, generator=batch_generator(*key, torch.device("cpu")))

    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    torch.randn(100)  # the global RNG moving on changes nothing
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    keys = [(0, 0, 5), (1, 0, 5), (0, 1, 5), (0, 0, 6)]
    assert len({tuple(draw(*key).tolist()) for key in keys}) == len(keys)


def test_throughput_counts_images_per_second_since_restart():
    meter = Throughput(window=5)
    assert meter.rate == 0.0
    time.sleep(0.1)
    meter.update(50)
    assert 50 / 0.2 < meter.rate <= 50 / 0.1
    meter.restart()
    assert meter.rate == 0.0


def test_run_config_is_saved_as_readable_yaml(tmp_path):
    config = TrainConfig(max_train_steps=7, learning_rate=3e-4)
    path = save_run_config(config, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "training_config.yaml")
    assert parse_config(TrainConfig, ["--config", path]) == config


class Draws(EpochDataset):
    """Rows whose 'augmentation' is a random draw per (epoch, row), as crops and flips are."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"index": index, "pixel_values": torch.tensor([self.random_for(index).random()]), "caption": ""}


def batches(accelerator, loader, first_epoch, skip, count):
    stream = resumed_batches(accelerator, loader, first_epoch, skip)
    return [(*divmod(number, len(loader)), batch["indices"], batch["pixel_values"].flatten().tolist())
            for (number, batch), _ in zip(stream, range(count))]


def test_resumed_batches_replay_any_epoch_from_any_batch(tmp_path):
    accelerator = make_accelerator(TrainConfig(output_dir=str(tmp_path), report_to="none"))
    loader = accelerator.prepare(dataloader(Draws(), batch_size=3, shuffle=True))  # 4 batches an epoch
    whole = batches(accelerator, loader, 0, 0, count=12)
    assert [position for _, position, _, _ in whole] == [0, 1, 2, 3] * 3
    epochs = [sorted(i for e, _, indices, _ in whole if e == epoch for i in indices) for epoch in range(3)]
    assert epochs == [list(range(10))] * 3  # every row once an epoch...
    assert whole[0][2] != whole[4][2] and whole[0][3] != whole[4][3]  # ...reshuffled and redrawn

    random.seed(123)
    torch.manual_seed(123)  # whatever happened to the global RNGs in between
    assert batches(accelerator, loader, 1, 2, count=6) == whole[6:]
