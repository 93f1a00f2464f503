"""distill.py end to end on a tiny teacher: real folders, real pipelines (ours and diffusers'), real
subprocesses."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import distill
import train_unet
from ldm import generate
from ldm.config import ConfigError, DistillConfig, parse_config
from ldm.hub import model_card
from ldm.pipeline import LatentDiffusionPipeline
from tests.conftest import two_processes
from tests.test_train_unet import argv as unet_argv

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def teacher(parts, tmp_path_factory, openmoji_32):
    """A tiny pipeline folder that train_unet.py wrote (3 steps), with a pretrained-style CLIP."""
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    train_unet.main(unet_argv(parts, folder, "--max_train_steps", "3", "--validation_steps", "100",
                              "--text_encoder_name_or_path", str(parts / "clip")))
    AcceleratorState._reset_state(reset_partial_state=True)
    return folder


def argv(teacher, output_dir, *extra):
    return ["--teacher", str(teacher), "--output_dir", str(output_dir), "--resolution", "16",
            "--max_train_samples", "20", "--train_batch_size", "8", "--report_to", "none",
            "--num_ddim_timesteps", "10", "--guidance_embedding_dim", "16", "--learning_rate", "1e-3",
            "--validation_prompts", "red heart", "cat face", "--validation_inference_steps", "1", "2",
            "--lr_scheduler", "constant", *extra]


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_a_two_step_distillation_writes_a_folder_that_three_pipelines_draw_alike(teacher, tmp_path):
    out = tmp_path / "lcm"
    result = distill.main(argv(teacher, out, "--max_train_steps", "2", "--validation_steps", "1"))
    assert result["global_step"] == 2
    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.original_inference_steps == 10
    assert json.loads((out / "distillation.json").read_text()) == {
        "method": "lcm", "teacher": str(teacher), "num_inference_steps": 2, "guidance_scale": 5.0}
    # a validation grid with a row for each step count (1 and 2), a column for each prompt
    assert Image.open(out / "validation" / "step-000001.png").size == (2 * 16, 2 * 16)
    # the steps trained the student away from the teacher, and the guidance input with it
    student, taught = unet_weights(out), unet_weights(teacher)
    assert not torch.equal(student["conv_in.weight"], taught["conv_in.weight"])
    assert student["time_embedding.cond_proj.weight"].abs().sum() > 0

    pipelines = [LatentDiffusionPipeline.from_pretrained(out),
                 StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                         requires_safety_checker=False),
                 LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                                requires_safety_checker=False)]
    images = []
    for pipe in pipelines:
        assert isinstance(pipe.scheduler, LCMScheduler)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(["red heart", "cat face"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                           generator=torch.Generator().manual_seed(3)).images)
    for other in images[1:]:
        assert np.abs(images[0] - other).max() <= 1e-4

    # generate.py samples it with its own step count and guidance unless told otherwise; tcd runs it too
    for flags in ([], ["--scheduler", "tcd", "--num_inference_steps", "1"]):
        assert generate.main(["--model", str(out), "--prompt", "red heart", "--output_dir", str(tmp_path / "s"),
                              *flags]) == 0
        drawn = Image.open(next((tmp_path / "s").glob("0000-*.png"))).text
        expected = ("tcd", "1") if flags else ("lcm", "2")
        assert (drawn["scheduler"], drawn["num_inference_steps"], drawn["guidance_scale"]) == (*expected, "5.0")
    card = model_card(str(out), "someone/lcm", True, {})
    assert "distilled with ldm by latent consistency distillation" in card and "num_inference_steps=2" in card


def test_a_resumed_distillation_ends_with_the_same_weights(teacher, tmp_path):
    """Stopped after its checkpoint at step 2 and resumed to 4 (into the second epoch of 3 steps), it
    ends where an uninterrupted run does: student, target (the saved UNet), optimizer, data order."""
    common = ["--checkpointing_steps", "2", "--validation_steps", "100"]
    distill.main(argv(teacher, tmp_path / "straight", "--max_train_steps", "4", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    distill.main(argv(teacher, tmp_path / "resumed", "--max_train_steps", "2", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    distill.main(argv(teacher, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                      *common))
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)  # the targets
    student = {run: load_file(tmp_path / run / "checkpoint-4" / "model.safetensors") for run in ("straight", "resumed")}
    assert all(torch.equal(student["straight"][name], student["resumed"][name]) for name in student["straight"])
    at_two = load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors")
    assert not all(torch.equal(at_two[name], student["resumed"][name]) for name in at_two)


def test_two_process_distillation(teacher, tmp_path):
    out = tmp_path / "lcm"
    launched = subprocess.run(
        [*two_processes(31), "distill.py",
         *argv(teacher, out, "--max_train_steps", "2", "--validation_steps", "100", "--checkpointing_steps", "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    assert LatentDiffusionPipeline.from_pretrained(out).unet.config.time_cond_proj_dim == 16


def test_a_teacher_that_is_not_a_pipeline_fails_before_any_work(parts, tmp_path):
    out = tmp_path / "lcm"
    with pytest.raises(ConfigError, match="is not a pipeline folder"):
        distill.main(argv(parts / "vae", out, "--max_train_steps", "2"))
    assert not out.exists()


def test_too_few_ddim_timesteps_for_the_requested_steps_fail_at_parse(teacher, tmp_path):
    with pytest.raises(ConfigError, match="num_ddim_timesteps = 4 is invalid; expected at least the largest"):
        parse_config(DistillConfig, argv(teacher, tmp_path / "lcm", "--num_ddim_timesteps", "4",
                                         "--validation_inference_steps", "1", "8"))
