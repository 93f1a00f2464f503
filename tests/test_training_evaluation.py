"""The held-out numbers the denoiser trainers log: the validation loss at every validation step, the
latent bits/dim bound at evaluation steps and at the end, the best step, and a training run that is
the same with them or without them."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState

import train_unet
from ldm.config import ConfigError
from tests.test_train_unet import argv, unet_weights

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def history(folder):
    return [json.loads(line) for line in (folder / "validation_loss.jsonl").read_text().splitlines()]


def test_the_held_out_loss_and_bound_are_logged_and_the_best_step_reported(parts, tmp_path, openmoji_32):
    out = tmp_path / "run"
    result = train_unet.main(argv(parts, out, "--max_train_steps", "4", "--validation_steps", "2",
                                  "--evaluation_steps", "4", "--validation_loss_samples", "12",
                                  "--bound_samples", "4", "--bound_strata", "4"))
    steps = [entry["step"] for entry in history(out)]
    assert steps == [2, 4]  # step 2's validation, and the end of the run
    losses = {entry["step"]: entry["loss"] for entry in history(out)}
    assert result["validation_loss"] == losses[4]
    assert (result["best_validation_loss"], result["best_validation_step"]) == min(
        (loss, step) for step, loss in losses.items())
    assert result["latent_bits_per_dim"] > 0 and result["latent_bits_per_dim_se"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation_loss"] == result["validation_loss"]
    assert metrics["best_validation_step"] == result["best_validation_step"]


def test_the_held_out_images_change_nothing_in_training(parts, tmp_path, openmoji_32):
    """Their cache build and every evaluation leave the training's random state and weights alone (no
    validation grid here: these runs differ only in the held-out images). The text side is a pretrained CLIP:
    a tokenizer trained on the captions breaks ties between equally frequent pairs in no fixed order, so two
    runs that each train one can differ by that alone."""
    no_grid = tmp_path / "no_grid.yaml"
    no_grid.write_text("validation_prompts: []\n")
    common = ("--config", str(no_grid), "--text_encoder_name_or_path", str(parts / "clip"), "--max_train_steps", "3",
              "--validation_steps", "1", "--evaluation_steps", "2", "--bound_samples", "2", "--bound_strata", "2")
    train_unet.main(argv(parts, tmp_path / "with", *common, "--validation_loss_samples", "8", prompts=()))
    assert [entry["step"] for entry in history(tmp_path / "with")] == [1, 2, 3]
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train_unet.main(argv(parts, tmp_path / "without", *common, "--validation_loss_samples", "0", prompts=()))
    assert "validation_loss" not in result
    with_them, without = unet_weights(tmp_path / "with"), unet_weights(tmp_path / "without")
    assert all(torch.equal(with_them[name], without[name]) for name in with_them)


def test_a_resumed_run_reports_the_best_step_of_the_whole_run(parts, tmp_path, openmoji_32):
    out = tmp_path / "run"
    common = ("--validation_steps", "1", "--checkpointing_steps", "2", "--validation_loss_samples", "8",
              "--bound_samples", "2", "--bound_strata", "2")
    train_unet.main(argv(parts, out, "--max_train_steps", "2", *common))
    first = history(out)
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train_unet.main(argv(parts, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                                  *common))
    entries = history(out)
    assert entries[:len(first)] == first and [entry["step"] for entry in entries[len(first):]] == [3, 4]
    assert result["best_validation_loss"] == min(entry["loss"] for entry in entries)
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(argv(parts, out, "--max_train_steps", "1", *common))  # a new run: a new history
    assert [entry["step"] for entry in history(out)] == [1]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--validation_loss_samples", "-1", "validation_loss_samples = -1 is invalid"),
    ("--evaluation_steps", "0", "evaluation_steps = 0 is invalid"),
    ("--bound_strata", "0", "bound_strata = 0 is invalid"),
    ("--inception_weights", "missing.pth", "inception_weights 'missing.pth' is not a file"),
])
def test_bad_held_out_settings_fail_before_any_work(parts, tmp_path, flag, value, message):
    with pytest.raises(ConfigError, match=message):
        train_unet.main(argv(parts, tmp_path / "run", flag, value))


def test_kid_on_a_small_fixed_sample_at_evaluation_steps(parts, tmp_path, openmoji_32, inception_file):
    out = tmp_path / "run"
    result = train_unet.main(argv(parts, out, "--max_train_steps", "2", "--validation_steps", "5",
                                  "--evaluation_steps", "1", "--validation_loss_samples", "8", "--bound_samples", "2",
                                  "--bound_strata", "2", "--inception_weights", inception_file, "--kid_samples", "4"))
    assert [entry["step"] for entry in history(out)] == [1, 2]  # the evaluation at step 1, and the end
    assert "kid" in result and result["kid_std"] >= 0
    assert json.loads((out / "metrics.json").read_text())["kid"] == result["kid"]


def test_a_distillation_refuses_the_denoisers_evaluations(tmp_path):
    from ldm.config import parse_config
    from ldm.training.distill_config import DistillConfig

    with pytest.raises(ConfigError, match="evaluation_steps = 5 is invalid; expected null for distill.py"):
        parse_config(DistillConfig, ["--teacher", str(tmp_path), "--evaluation_steps", "5"])
