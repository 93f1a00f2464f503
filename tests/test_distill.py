"""distill.py end to end on a tiny teacher: real folders, real pipelines (ours and diffusers'), real
subprocesses."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors.torch import load_file

import distill
import train_unet
from ldm import generate
from ldm.config import ConfigError, parse_config
from ldm.diffusion.flow import shifted
from ldm.diffusion.noise_paths import trailing_timesteps
from ldm.hub.card import model_card
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.training.distill import two_step_target
from ldm.training.distill_config import DistillConfig, check_teacher_schedule
from tests.conftest import run_in_two_processes
from tests.test_train_unet import ROOT, fresh_accelerator_state  # noqa: F401 (an autouse fixture)
from tests.test_train_unet import argv as unet_argv

pytestmark = pytest.mark.usefixtures("single_thread")


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
            "--num_inference_steps", "2",
            "--lr_scheduler", "constant", *extra]


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_a_two_step_distillation_writes_a_folder_that_three_pipelines_draw_alike(teacher, tmp_path):
    out = tmp_path / "lcm"
    result = distill.main(argv(teacher, out, "--max_train_steps", "2", "--validation_steps", "1"))
    assert result["global_step"] == 2
    # the consistency loss on the held-out images, at step 1's validation and at the end
    held_out = [json.loads(line) for line in (out / "validation_loss.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in held_out] == [1, 2] and result["validation_loss"] == held_out[-1]["loss"]
    assert result["best_validation_loss"] == min(entry["loss"] for entry in held_out) > 0
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
    card = model_card(str(out), "someone/lcm", "pipeline", {})
    assert "distilled with ldm by latent consistency distillation" in card and "num_inference_steps=2" in card


def test_a_two_stage_progressive_distillation_samples_with_ddim_in_its_own_steps(teacher, tmp_path):
    """8 -> 4 -> 2 DDIM steps, one optimizer step per stage; the student predicts v and takes guidance as input."""
    out = tmp_path / "progressive"
    distill.main(argv(teacher, out, "--method", "progressive", "--teacher_steps", "8", "--max_train_steps", "2",
                      "--validation_steps", "1"))
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert (scheduler.config.prediction_type, scheduler.config.timestep_spacing) == ("v_prediction", "trailing")
    assert json.loads((out / "distillation.json").read_text())["num_inference_steps"] == 2
    # stage 1 validated the 4-step student, the end the 2-step one: one row each
    assert Image.open(out / "validation" / "step-000001.png").size == (2 * 16, 16)
    ours = LatentDiffusionPipeline.from_pretrained(out)
    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(["red heart", "cat face"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                           generator=torch.Generator().manual_seed(3)).images)
        assert pipe.scheduler.timesteps.tolist() == [999, 499]
    assert np.abs(images[0] - images[1]).max() <= 1e-4


FLOW_SHIFT = 2.0


@pytest.fixture(scope="module")
def flow_teacher(parts, tmp_path_factory, openmoji_32):
    """A tiny rectified-flow pipeline that train_unet.py wrote (3 steps, shift 2, no min-SNR: the demo's objective)."""
    folder = tmp_path_factory.mktemp("flow-teacher") / "pipeline"
    train_unet.main(unet_argv(parts, folder, "--max_train_steps", "3", "--validation_steps", "100",
                              "--text_encoder_name_or_path", str(parts / "clip"), "--prediction_type",
                              "flow_prediction", "--flow_shift", str(FLOW_SHIFT), "--snr_gamma", "0"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return folder


@pytest.mark.parametrize("method", ["lcm", "progressive"])
def test_a_flow_teacher_distils_into_a_student_that_diffusers_draws_alike(flow_teacher, tmp_path, method):
    """Both methods step a flow teacher's path by Euler (DDIM) steps; the student is saved with first-order
    DPM-Solver++ on the teacher's flow sigmas, which StableDiffusionPipeline runs as ours does."""
    out = tmp_path / method
    distill.main(argv(flow_teacher, out, "--method", method, "--teacher_steps", "8", "--max_train_steps", "2",
                      "--validation_steps", "1"))
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
    assert {key: scheduler.config[key] for key in ("prediction_type", "use_flow_sigmas", "flow_shift",
                                                     "solver_order", "final_sigmas_type")} == {
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": FLOW_SHIFT, "solver_order": 1,
        "final_sigmas_type": "zero"}
    student, taught = unet_weights(out), unet_weights(flow_teacher)
    assert not torch.equal(student["conv_in.weight"], taught["conv_in.weight"])
    assert student["time_embedding.cond_proj.weight"].abs().sum() > 0

    ours = LatentDiffusionPipeline.from_pretrained(out)
    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(["red heart", "cat face"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                           generator=torch.Generator().manual_seed(3)).images)
        # the points progressive distillation trained at 2 steps: u = 0.999 and 0.4995, shifted
        expected = [int(shifted(u, FLOW_SHIFT) * 1000) for u in (0.999, 0.4995)]
        assert pipe.scheduler.timesteps.tolist() == expected
    assert np.abs(images[0] - images[1]).max() <= 1e-4 and images[0].std() > 0
    assert generate.main(["--model", str(out), "--prompt", "red heart", "--output_dir", str(tmp_path / "s")]) == 0
    drawn = Image.open(next((tmp_path / "s").glob("0000-*.png"))).text
    assert (drawn["num_inference_steps"], drawn["guidance_scale"]) == ("2", "5.0")


def test_a_zero_terminal_snr_epsilon_teacher_fails_naming_it():
    schedule = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon").config
    with pytest.raises(ConfigError, match="teacher 'outputs/zsnr' predicts epsilon on a zero-terminal-SNR"):
        check_teacher_schedule("outputs/zsnr", schedule)


@pytest.mark.parametrize("method", ["lcm", "progressive"])
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_weights(teacher, tmp_path, method):
    """A run killed after its checkpoint at step 2 leaves that checkpoint: resumed from a copy of it to
    step 4 (into the second epoch of 3 steps), it ends where the uninterrupted run does. That takes the
    student, optimizer, data order, and the method's state: the LCM target (the saved UNet), or the
    progressive stage teacher, taken over from the student at step 2."""
    common = ["--checkpointing_steps", "2", "--validation_steps", "100", "--method", method, "--teacher_steps", "8",
              "--max_train_steps", "4"]
    distill.main(argv(teacher, tmp_path / "straight", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    distill.main(argv(teacher, tmp_path / "resumed", "--resume_from_checkpoint", "latest", *common))
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    checkpoints = {step: load_file(tmp_path / "straight" / f"checkpoint-{step}" / "model.safetensors")
                   for step in (2, 4)}
    assert not all(torch.equal(checkpoints[2][name], checkpoints[4][name]) for name in checkpoints[2])


@pytest.mark.parametrize("method", ["lcm", "progressive"])
def test_the_held_out_images_change_nothing_in_distillation(teacher, tmp_path, method):
    common = ("--method", method, "--teacher_steps", "8", "--max_train_steps", "2", "--validation_steps", "1")
    distill.main(argv(teacher, tmp_path / "with", *common, "--validation_loss_samples", "8"))
    AcceleratorState._reset_state(reset_partial_state=True)
    result = distill.main(argv(teacher, tmp_path / "without", *common, "--validation_loss_samples", "0"))
    assert "validation_loss" not in result
    with_them, without = unet_weights(tmp_path / "with"), unet_weights(tmp_path / "without")
    assert all(torch.equal(with_them[name], without[name]) for name in with_them)


def test_two_process_distillation(teacher, tmp_path):
    out = tmp_path / "lcm"
    launched = run_in_two_processes(31, "distill.py", *argv(teacher, out, "--max_train_steps", "2",
                                                            "--validation_steps", "100", "--checkpointing_steps", "1"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["validation_loss"] > 0  # measured by process 0 alone
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


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 32])
def test_progressive_grids_are_ddim_schedulers_trailing_timesteps(steps):
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert trailing_timesteps(steps, 1000).tolist() == ddim.timesteps.tolist()


def test_the_two_step_target_is_the_clean_image_when_the_teacher_knows_it():
    """A teacher that predicts the true x₀ moves along one DDIM line: two steps t → t' → t'' land where
    one step from x̃ = x₀ lands, so the target is x₀; with t'' below 0 (ᾱ = 1) it is z_t'' itself."""
    schedule = DDIMScheduler().alphas_cumprod
    torch.manual_seed(0)
    clean, noisy = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    start, middle, end = torch.tensor([999, 600, 300]), torch.tensor([870, 450, 150]), torch.tensor([749, 300, 0])

    def ddim(z, t_from, t_to):
        a_from, a_to = schedule[t_from].view(-1, 1, 1, 1), schedule[t_to].view(-1, 1, 1, 1)
        noise = (z - a_from.sqrt() * clean) / (1 - a_from).sqrt()
        return a_to.sqrt() * clean + (1 - a_to).sqrt() * noise

    def coefficients(alpha_cumprod):
        return alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()

    landed = ddim(ddim(noisy, start, middle), middle, end)
    torch.testing.assert_close(two_step_target(noisy, landed, coefficients(schedule[start]),
                                               coefficients(schedule[end])), clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two_step_target(noisy, landed, coefficients(schedule[start]),
                                               coefficients(torch.ones(3))), landed)


def test_the_demo_config_parses_for_both_methods():
    for method in ("lcm", "progressive"):
        config = parse_config(DistillConfig, ["--config", os.path.join(ROOT, "configs/distill/demo.yaml"),
                                              "--method", method])
        assert config.num_ddim_timesteps >= 25 and config.num_inference_steps == 4
        assert config.min_guidance <= config.validation_guidance_scale <= config.max_guidance
