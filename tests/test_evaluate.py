"""`python -m ldm.evaluate` end to end on a tiny pipeline and an imagefolder with a validation split: the
table and evaluation.json, every metric whose weights are given (random ones here: plumbing, not quality),
the skipped ones named with their flag, and bad input refused before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ldm import evaluate
from ldm.export import export_onnx
from ldm.hub.files import DISTILLATION
from ldm.models.lora import add_adapters, save_adapters
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.test_train_vae import write_imagefolder

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny pipeline that draws 16-px images, saved as train_unet.py saves one."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.models.text import text_encoder_config
    from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE

    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline(
        vae=AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8}), tokenizer=tiny_tokenizer,
        text_encoder=CLIPTextModel(text_encoder_config(tiny_tokenizer, **TINY_TEXT_ENCODER)),
        unet=UNet2DConditionModel.from_config(TINY_UNET),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False))
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An imagefolder of coloured squares with train/ and validation/ splits (12 held-out images)."""
    folder = tmp_path_factory.mktemp("reference")
    write_imagefolder(folder / "train", count=4, size=16)
    write_imagefolder(folder / "validation", count=12, size=16)
    return str(folder)


def run(model_dir, reference, tmp_path, *flags, steps: str | None = "2"):
    out = tmp_path / "evaluation"
    code = evaluate.main([model_dir, "--reference", reference, "--num_samples", "8", "--batch_size", "8",
                          *(["--num_inference_steps", steps] if steps else []), "--validation_loss_samples", "8",
                          "--bound_samples", "4", "--bound_strata", "4", "--output_dir", str(out), *flags])
    return code, out / "evaluation.json"


def report(model_dir, reference, tmp_path, *flags, steps: str | None = "2") -> dict:
    code, written = run(model_dir, reference, tmp_path, *flags, steps=steps)
    assert code == 0
    return json.loads(written.read_text())


def test_the_denoising_numbers_come_with_the_skipped_metrics_named(model_dir, reference, tmp_path, capsys):
    code, written = run(model_dir, reference, tmp_path, "--guidance", "1", "3")
    assert code == 0
    report = json.loads(written.read_text())
    assert list(report["by_guidance"]) == ["1", "3"]
    denoising = report["denoising"]
    assert denoising["held_out_images"] == 8 and denoising["bound_images"] == 4
    assert denoising["held_out_loss"] > 0 and denoising["latent_bits_per_dim_se"] > 0
    assert denoising["scaling_factor"] == 0.8  # the number is never reported without the VAE scale it depends on
    assert report["settings"]["num_samples"] == 8 and report["settings"]["resolution"] == 16
    printed = capsys.readouterr().out
    assert "| FID, KID, Inception Score, precision/recall/density/coverage | skipped: pass --inception_weights PATH" \
        in printed
    assert "| CLIP score | skipped: pass --clip_model DIR" in printed
    assert "latent bits/dim (scaling 0.8, shift 0" in printed


def test_every_image_metric_with_local_weights(model_dir, reference, tmp_path, capsys, inception_file, clip_folder,
                                               isolated_cache):
    code, written = run(model_dir, reference, tmp_path, "--guidance", "4", "--inception_weights", inception_file,
                        "--feature_size", "64", "--clip_model", clip_folder)
    assert code == 0
    numbers = json.loads(written.read_text())["by_guidance"]["4"]
    for metric in ("fid", "kid", "inception_score", "precision", "recall", "density", "coverage", "clip_score"):
        assert metric in numbers
    assert numbers["fid"]["name"] == "FID (non-standard Inception weights, 64-d features)"
    assert not numbers["fid"]["standard"] and numbers["fid"]["images"] == 8
    assert numbers["fid"]["value"] > 0  # random noise against squares
    assert "skipped" not in capsys.readouterr().out.split("wrote")[0].split("latent bits/dim")[1]
    cached = os.listdir(os.path.join(isolated_cache, "reference-features"))
    assert len(cached) == 1  # the reference's features, kept for the next evaluation with these settings
    code, _ = run(model_dir, reference, tmp_path, "--guidance", "4", "--inception_weights", inception_file,
                  "--feature_size", "64")
    assert code == 0 and os.listdir(os.path.join(isolated_cache, "reference-features")) == cached


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_samples", "20"], "num_samples 20 is more than the 12 held-out images of the reference"),
    (["--guidance", "nan"], "guidance = nan is invalid"),
    (["--guidance", "-1"], "guidance = -1.0 is invalid"),
    (["--num_samples", "0"], "num_samples = 0 is invalid"),
    (["--inception_weights", "missing.pth"], "inception_weights 'missing.pth' is not a file"),
    (["--clip_model", "nowhere"], "clip_model 'nowhere' is not a folder"),
])
def test_bad_input_fails_before_any_model_loads(model_dir, reference, tmp_path, capsys, monkeypatch, flags, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(evaluate, "load_model", must_not_load)
    code, written = run(model_dir, reference, tmp_path, *flags)
    assert code == 2 and not written.exists()
    assert message in capsys.readouterr().err


def test_a_weights_file_with_the_wrong_keys_is_named(model_dir, reference, tmp_path, capsys, monkeypatch):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    monkeypatch.setattr(evaluate, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model first"))
    code, _ = run(model_dir, reference, tmp_path, "--inception_weights", str(wrong))
    assert code == 2
    assert f"Inception weights file {wrong} does not fit torch-fidelity's Inception-v3" in capsys.readouterr().err


def test_a_guidance_scale_that_is_no_number_is_refused_by_the_command(model_dir, reference):
    result = subprocess.run([sys.executable, "-m", "ldm.evaluate", model_dir, "--reference", reference, "--guidance",
                             "strong"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--guidance: invalid float value: 'strong'" in result.stderr


def test_too_few_images_for_a_metric_fail_before_any_model_loads(model_dir, reference, tmp_path, capsys, monkeypatch,
                                                                 inception_file):
    monkeypatch.setattr(evaluate, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model first"))
    code, _ = run(model_dir, reference, tmp_path, "--num_samples", "4", "--inception_weights", inception_file)
    assert code == 2
    assert "4 images per set are too few: precision/recall (nearest_k + 2) needs 7" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_weights(model_dir, tmp_path_factory):
    """Adapters on the tiny UNet's attention projections, moved well away from zero (B starts at zero)."""
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    add_adapters(pipe.unet, rank=4, alpha=None, targets=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(1)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.3)
    return save_adapters(str(tmp_path_factory.mktemp("lora")), pipe.unet)


def test_a_lora_is_scored_and_drawn_at_its_scale(model_dir, reference, tmp_path, lora_weights, inception_file,
                                                 isolated_cache):
    def numbers(*flags):
        measured = report(model_dir, reference, tmp_path, "--guidance", "3", "--inception_weights", inception_file,
                          "--feature_size", "64", *flags)
        return measured["denoising"]["held_out_loss"], measured["by_guidance"]["3"]["fid"]["value"]

    base = numbers()
    adapted = numbers("--lora", lora_weights)
    switched_off = numbers("--lora", lora_weights, "--lora_scale", "0")
    assert adapted[0] != pytest.approx(base[0], rel=1e-3) and adapted[1] != pytest.approx(base[1], rel=1e-3)
    # At scale 0 the adapters add nothing: the UNet the loss calls directly is scaled as the pipeline's is.
    assert switched_off == pytest.approx(base, rel=1e-6)


def test_an_onnx_export_draws_the_pytorch_model_s_images(model_dir, reference, tmp_path, inception_file,
                                                         isolated_cache):
    export_onnx(model_dir, str(tmp_path / "onnx"))
    flags = ["--guidance", "3", "--inception_weights", inception_file, "--feature_size", "64"]
    exported = report(str(tmp_path / "onnx"), reference, tmp_path, "--backend", "onnx", *flags)
    native = report(model_dir, reference, tmp_path, *flags)
    assert exported["settings"]["backend"] == "onnx" and exported["settings"]["resolution"] == 16
    assert "ONNX export has no PyTorch UNet" in exported["denoising"]["skipped"]
    assert exported["by_guidance"]["3"]["fid"]["value"] == pytest.approx(native["by_guidance"]["3"]["fid"]["value"],
                                                                         rel=0.01)


def test_a_distilled_student_is_drawn_with_its_own_steps_and_guidance(model_dir, reference, tmp_path):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from tests.conftest import TINY_UNET

    student = LatentDiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    student.unet = UNet2DConditionModel.from_config({**TINY_UNET, "time_cond_proj_dim": 8})
    student.scheduler = LCMScheduler.from_config(student.scheduler.config)
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    (folder / DISTILLATION).write_text(json.dumps({"method": "lcm", "teacher": model_dir, "num_inference_steps": 3,
                                                   "guidance_scale": 4.0}))
    measured = report(str(folder), reference, tmp_path, steps=None)
    assert measured["settings"]["distilled"]["method"] == "lcm"
    assert list(measured["by_guidance"]) == ["4"] and measured["by_guidance"]["4"]["steps"] == 3
    assert "takes the guidance scale as an input" in measured["denoising"]["skipped"]


@pytest.mark.parametrize("scheduler", [None, "flow_euler"])
def test_a_flow_model_gets_its_held_out_loss_and_the_bound_skipped_with_the_reason(model_dir, reference, tmp_path,
                                                                                    capsys, scheduler):
    from ldm.diffusion.objective import noise_scheduler

    flow = LatentDiffusionPipeline.from_pretrained(model_dir)
    flow.scheduler = noise_scheduler("flow_prediction", flow_shift=2.0)
    flow.save_pretrained(tmp_path / "flow")
    measured = report(str(tmp_path / "flow"), reference, tmp_path, *(["--scheduler", scheduler] if scheduler else []))
    denoising = measured["denoising"]
    assert denoising["held_out_loss"] > 0 and "latent_bits_per_dim" not in denoising
    assert "flow_prediction model has no beta schedule" in denoising["bound_skipped"]
    assert "| latent bits/dim | skipped: the latent bits/dim bound is a DDPM's" in capsys.readouterr().out
