import hashlib
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from ldm.generation.config import parse_args
from ldm.generation.loading import prepare, resolve_device
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.conftest import two_processes
from tests.test_editing import picture, square_mask

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
    assert "batch 1/1" in result.stderr and "3/3" in result.stderr  # the progress bar
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
    pipe, prompts, _ = prepare(config)
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


# ---------------------------------------------------------------- editing an image


@pytest.fixture
def init_image(tmp_path):
    path = tmp_path / "photo.png"
    picture(20).save(path)
    return path


@pytest.fixture
def mask_image(tmp_path):
    path = tmp_path / "mask.png"
    square_mask(20, (4, 4, 12, 12)).save(path)
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_edit_is_the_pipeline_s_edit_with_its_inputs_in_the_png(model_dir, tmp_path, init_image, mask_image):
    out = tmp_path / "edits"
    assert run_main(model_dir, out, "--prompt", "red heart", "--prompt", "cat face", "--num_images_per_prompt", "2",
                    "--init_image", str(init_image), "--mask_image", str(mask_image), "--strength", "0.5",
                    "--num_inference_steps", "4", "--seed", "3", "--batch_size", "3") == 0
    text = Image.open(out / "0002-cat-face-seed5.png").text
    assert (text["init_image"], text["init_image_sha256"]) == ("photo.png", sha256(init_image))
    assert (text["mask_image"], text["mask_image_sha256"]) == ("mask.png", sha256(mask_image))
    assert (text["strength"], text["height"], text["width"]) == ("0.5", "20", "20")  # the image's own size
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    # the run's second batch: images 3 (cat face, seed 6), only one left after the first batch of three
    expected = pipe(["cat face"], image=Image.open(init_image).convert("RGB"),
                    mask_image=Image.open(mask_image).convert("L"), strength=0.5, num_inference_steps=4,
                    height=20, width=20, generator=[torch.Generator().manual_seed(6)]).images[0]
    assert np.abs(pixels(out / "0003-cat-face-seed6.png") - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert Image.open(out / "grid.png").size == (3 * 20, 2 * 20)  # input, then two images, per prompt


def test_a_crop_edit_records_its_padding_and_keeps_the_size(model_dir, tmp_path, init_image, mask_image):
    out = tmp_path / "crop"
    assert run_main(model_dir, out, "--prompt", "red heart", "--init_image", str(init_image),
                    "--mask_image", str(mask_image), "--padding_mask_crop", "2") == 0
    text = Image.open(out / "0000-red-heart-seed0.png").text
    assert (text["padding_mask_crop"], text["strength"], text["height"]) == ("2", "1.0", "16")  # native crop size
    result, original = pixels(out / "0000-red-heart-seed0.png"), pixels(init_image)
    outside = np.asarray(Image.open(mask_image)) == 0
    np.testing.assert_array_equal(result[outside], original[outside])


def test_image_to_image_defaults_to_strength_0_8(model_dir, tmp_path, init_image):
    assert run_main(model_dir, tmp_path / "out", "--prompt", "red heart", "--init_image", str(init_image),
                    "--num_inference_steps", "5") == 0
    png = tmp_path / "out" / "0000-red-heart-seed0.png"
    assert Image.open(png).text["strength"] == "0.8"
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=["red heart"], image=Image.open(init_image).convert("RGB"), num_inference_steps=5,
                generator=[torch.Generator().manual_seed(0)])
    assert np.abs(pixels(png) - np.asarray(pipe(**args, strength=0.8).images[0], dtype=np.int16)).max() <= 1
    assert np.abs(pixels(png) - np.asarray(pipe(**args, strength=0.6).images[0], dtype=np.int16)).max() > 1


def test_a_transparent_mask_layer_keeps_what_is_transparent(model_dir, tmp_path, init_image):
    stroke = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (4, 4, 12, 12))
    stroke.save(tmp_path / "stroke.png")
    assert run_main(model_dir, tmp_path / "out", "--prompt", "red heart", "--init_image", str(init_image),
                    "--mask_image", str(tmp_path / "stroke.png"), "--padding_mask_crop", "0") == 0
    result, original = pixels(tmp_path / "out" / "0000-red-heart-seed0.png"), pixels(init_image)
    outside = np.ones((20, 20), bool)
    outside[4:12, 4:12] = False
    np.testing.assert_array_equal(result[outside], original[outside])
    assert np.abs(result[~outside] - original[~outside]).mean() > 5


def bad_edit_inputs(tmp_path, init_image, mask_image):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    square_mask(16, (0, 0, 4, 4)).save(tmp_path / "small_mask.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("L", (20, 20), 0).save(tmp_path / "black.png")
    return [
        (["--init_image", str(tmp_path / "none.png")], f"--init_image {tmp_path / 'none.png'} does not exist"),
        (["--init_image", str(tmp_path / "broken.png")], f"--init_image {tmp_path / 'broken.png'} is not a readable "
                                                         "image"),
        (["--init_image", str(init_image), "--mask_image", str(tmp_path / "small_mask.png")],
         "is 16×16 pixels but --init_image"),
        (["--mask_image", str(mask_image)], "--mask_image edits an image: pass --init_image too"),
        (["--strength", "0.5"], "--strength edits an image: pass --init_image too"),
        (["--init_image", str(init_image), "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
        (["--init_image", str(init_image), "--strength", "1.2"], "--strength must be in (0, 1], got 1.2"),
        (["--init_image", str(init_image), "--strength", "0.3"], "--strength 0.3 of 2 steps leaves 0 steps to run"),
        (["--init_image", str(tmp_path / "dot.png")], "is 1×1 pixels, smaller than one latent pixel (2×2)"),
        (["--init_image", str(init_image), "--padding_mask_crop", "4"], "--padding_mask_crop crops around the mask"),
        (["--init_image", str(init_image), "--mask_image", str(mask_image), "--padding_mask_crop", "-1"],
         "--padding_mask_crop must be a number of pixels >= 0, got -1"),
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--init_image", str(init_image), "--mask_image", str(tmp_path / "black.png")],
         "black.png is black everywhere: nothing to repaint"),
    ]


def test_bad_edit_input_fails_with_exit_code_2_before_anything_is_written(model_dir, tmp_path, capsys, init_image,
                                                                          mask_image):
    for flags, message in bad_edit_inputs(tmp_path, init_image, mask_image):
        out = tmp_path / "samples"
        assert run_main(model_dir, out, "--prompt", "red heart", *flags) == 2, flags
        assert message in capsys.readouterr().err, flags
        assert not out.exists()


# ---------------------------------------------------------------- several processes


def test_two_processes_share_the_images_and_write_the_same_files(model_dir, tmp_path, init_image, mask_image):
    """accelerate launch on the CPU: each process draws its own batches (PartialState(cpu=True)),
    and every PNG is byte-identical to a one-process run's; the grid too."""
    flags = ["--model", model_dir, "--prompt", "red heart", "--prompt", "cat face", "--prompt", "rocket",
             "--num_images_per_prompt", "2", "--batch_size", "2", "--num_inference_steps", "3", "--scheduler",
             "euler_a", "--init_image", str(init_image), "--mask_image", str(mask_image), "--strength", "0.7"]
    assert generate.main([*flags, "--output_dir", str(tmp_path / "one")]) == 0
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run([*two_processes(port_offset=41), "generate.py", *flags, "--output_dir",
                             str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    # three batches: two for the first process, one for the second
    assert "process 0 of 2 draws images 0-3 in 2 batches" in result.stderr
    assert "process 1 of 2 draws images 4-5 in 1 batches" in result.stderr
    names = sorted(os.listdir(tmp_path / "one"))
    assert len(names) == 7 and sorted(os.listdir(tmp_path / "two")) == names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
