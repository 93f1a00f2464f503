import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from ldm.generate import parse_args, prepare, resolve_device
from ldm.pipeline import LatentDiffusionPipeline

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model_dir(tmp_path, tiny_components):
    path = tmp_path / "pipeline"
    LatentDiffusionPipeline(**tiny_components).save_pretrained(path)
    return str(path)


def run_main(model_dir, out, *flags):
    return generate.main(["--model", model_dir, "--output_dir", str(out), "--num_inference_steps", "2", *flags])


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_command_line_writes_a_png_per_image_with_its_parameters_and_a_grid(model_dir, tmp_path):
    out = tmp_path / "samples"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "generate.py", "--model", model_dir, "--prompt", "red heart", "--prompt", "cat face",
         "--negative_prompt", "blue circle", "--num_images_per_prompt", "2", "--num_inference_steps", "3",
         "--scheduler", "euler_a", "--seed", "5", "--guidance_scale", "6", "--height", "16", "--width", "24",
         "--output_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "prompt 2/2" in result.stderr and "3/3" in result.stderr  # the progress bar
    names = sorted(os.listdir(out))
    assert names == ["0000-red-heart-seed5.png", "0001-red-heart-seed6.png", "0002-cat-face-seed7.png",
                     "0003-cat-face-seed8.png", "grid.png"]
    text = Image.open(out / names[2]).text
    assert text["prompt"] == "cat face" and text["negative_prompt"] == "blue circle"
    assert (text["seed"], text["scheduler"], text["num_inference_steps"]) == ("7", "euler_a", "3")
    assert (text["guidance_scale"], text["height"], text["width"]) == ("6.0", "16", "24")
    assert Image.open(out / names[0]).size == (24, 16)
    assert Image.open(out / "grid.png").size == (2 * 24, 2 * 16)  # a row per prompt


def test_command_line_bad_input_exits_non_zero_with_the_reason(model_dir, tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "generate.py", "--model", model_dir, "--prompt", "red heart", "--scheduler", "euler-a",
         "--output_dir", str(out)],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown scheduler 'euler-a'; valid names: ddpm, ddim" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "dpm++3m"], "unknown scheduler 'dpm++3m'; valid names: ddpm, ddim, pndm, lms, euler, euler_a"),
    (["--height", "15"], "--height 15 is not divisible by the VAE factor 2"),
    (["--width", "-8"], "--width must be a positive number of pixels, got -8"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1, got 0"),
    (["--num_inference_steps", "-3"], "--num_inference_steps must be at least 1, got -3"),
    (["--num_images_per_prompt", "0"], "--num_images_per_prompt must be at least 1, got 0"),
    (["--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    (["--prompts_file", "missing.txt"], "--prompts_file missing.txt does not exist"),
])
def test_bad_input_fails_before_anything_is_written(model_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "samples"
    assert run_main(model_dir, out, "--prompt", "red heart", *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_output_dir_that_is_a_file_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "samples").write_text("not a folder")
    assert run_main(model_dir, tmp_path / "samples", "--prompt", "red heart") == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "samples").read_text() == "not a folder"


def test_a_missing_model_folder_or_a_folder_that_is_not_a_pipeline_fails_clearly(tmp_path, capsys):
    out = tmp_path / "samples"
    assert run_main(str(tmp_path / "missing"), out, "--prompt", "red heart") == 2
    assert f"model folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "not_a_pipeline").mkdir()
    assert run_main(str(tmp_path / "not_a_pipeline"), out, "--prompt", "red heart") == 2
    assert "not_a_pipeline is not a pipeline folder: it has no model_index.json" in capsys.readouterr().err
    assert run_main(str(tmp_path / "not_a_pipeline"), out) == 2
    assert "no prompts" in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_hub_id_fails_clearly_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main("someone/no-such-model", tmp_path / "samples", "--prompt", "red heart") == 2
    assert "could not load a pipeline 'someone/no-such-model' from the Hugging Face Hub" in capsys.readouterr().err


def test_a_broken_pipeline_folder_fails_clearly(model_dir, tmp_path, capsys):
    os.remove(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert run_main(model_dir, tmp_path / "samples", "--prompt", "red heart") == 2
    assert f"could not load a pipeline {model_dir!r} from the folder" in capsys.readouterr().err


def test_each_image_is_reproducible_alone_from_its_seed(model_dir, tmp_path):
    assert run_main(model_dir, tmp_path / "all", "--prompt", "red heart", "--prompt", "cat face",
                    "--num_images_per_prompt", "2", "--seed", "10", "--scheduler", "euler_a") == 0
    assert run_main(model_dir, tmp_path / "one", "--prompt", "cat face", "--seed", "13",
                    "--scheduler", "euler_a") == 0
    alone = pixels(tmp_path / "one" / "0000-cat-face-seed13.png")
    # Batched and alone differ only by float rounding, at most one 8-bit level.
    assert np.abs(pixels(tmp_path / "all" / "0003-cat-face-seed13.png") - alone).max() <= 1
    assert np.abs(pixels(tmp_path / "all" / "0002-cat-face-seed12.png") - alone).max() > 1


def test_prompts_file_and_repeated_prompts_are_joined(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("green apple\n\nrocket\n")
    assert run_main(model_dir, tmp_path / "out", "--prompt", "red heart", "--prompts_file", str(prompts)) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["0000-red-heart-seed0.png", "0001-green-apple-seed1.png",
                                                    "0002-rocket-seed2.png", "grid.png"]


def test_a_long_prompt_is_truncated_with_a_warning(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert run_main(model_dir, tmp_path / "out", "--prompt", " ".join(["thumbs up"] * 60)) == 0
    assert "longer than the text encoder's 77" in caplog.text
    assert len(os.listdir(tmp_path / "out")) == 2


def test_options_reach_the_pipeline(model_dir):
    config = parse_args(["--model", model_dir, "--prompt", "a", "b", "--prompt", "c", "--scheduler",
                         "dpm++2m_karras", "--fast", "--vae_tiling", "--dtype", "bfloat16", "--device", "cpu"])
    pipe, prompts = prepare(config)
    assert prompts == ["a", "b", "c"]
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_karras_sigmas
    assert pipe.denoising_unet() is not pipe.unet
    assert pipe.vae.use_tiling
    assert pipe.unet.dtype == torch.bfloat16
    assert (config.height, config.width) == (16, 16)  # the model's native size


def test_device_auto_picks_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
