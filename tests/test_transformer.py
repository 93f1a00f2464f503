"""The PixArt-style transformer denoiser: its config checks, the text masking, the pipeline against diffusers'
own PixArtAlphaPipeline, and the capabilities that refuse it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

import distill
import train_unet
from ldm.config import ConfigError
from ldm.data.caches import load_or_build_texts
from ldm.data.captions import padding_mask, text_states, through_first_eos, tokenize
from ldm.export import export_onnx
from ldm.models.text import text_encoder_config
from ldm.pipelines.latent_transformer import LatentTransformerPipeline, load_latent_pipeline, pipeline_for
from tests.conftest import TINY_CAPTIONS, TINY_TEXT_ENCODER, TINY_VAE
from tests.test_train_unet import FLOW, ROOT, argv

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

TINY_PIXART = dict(_class_name="PixArtTransformer2DModel", sample_size=8, num_layers=2, patch_size=2,
                   attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=4,
                   cross_attention_dim=16, caption_channels=32, norm_num_groups=8,
                   use_additional_conditions=False)


def tiny_transformer() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel.from_config(TINY_PIXART).eval()
    # adaLN-single and the output projection start at zero in PixArt's init; random weights make the
    # comparisons below see every path.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture
def transformer_components(tiny_vae, tiny_text_encoder, tiny_tokenizer):
    return dict(vae=tiny_vae, text_encoder=tiny_text_encoder, tokenizer=tiny_tokenizer,
                scheduler=DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012))


def test_padding_is_zeroed_and_recovered_as_the_tokenizers_attention_mask(tiny_tokenizer, tiny_text_encoder):
    captions = ["grinning face", "", "smiling face with sunglasses"]
    encoded = tiny_tokenizer(captions, padding="max_length", max_length=tiny_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    mask = through_first_eos(encoded.input_ids, tiny_tokenizer.eos_token_id)
    assert torch.equal(mask, encoded.attention_mask)
    states = text_states(tiny_text_encoder, encoded.input_ids, tiny_tokenizer.eos_token_id)
    assert torch.equal(padding_mask(states).long(), encoded.attention_mask)
    # The tokens' own states are CLIP's: causal attention never looks at the padding after them.
    plain = text_states(tiny_text_encoder, encoded.input_ids)
    kept = encoded.attention_mask.bool()
    torch.testing.assert_close(states[kept], plain[kept])
    assert not torch.equal(states, plain)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_the_folder_draws_the_same_images_in_diffusers_pixart_alpha_pipeline(tmp_path, transformer_components,
                                                                             prediction_type):
    scheduler = transformer_components["scheduler"]
    if prediction_type == "flow_prediction":
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=2.0)
    ours = pipeline_for(tiny_transformer(), **{**transformer_components, "scheduler": scheduler})
    assert isinstance(ours, LatentTransformerPipeline)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"] and "unet" not in index

    theirs = PixArtAlphaPipeline.from_pretrained(tmp_path)
    loaded = load_latent_pipeline(str(tmp_path))
    assert isinstance(loaded, LatentTransformerPipeline)
    prompts = TINY_CAPTIONS[:2]
    draw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    expected = theirs(prompts, generator=torch.Generator().manual_seed(3), max_sequence_length=
                      theirs.tokenizer.model_max_length, use_resolution_binning=False, clean_caption=False,
                      **draw).images
    for pipe in (ours, loaded):
        images = pipe(prompts, generator=torch.Generator().manual_seed(3), **draw).images
        assert abs(images - expected).max() <= 1e-4


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pixart_file(parts):
    path = parts / "pixart.json"
    path.write_text(json.dumps(TINY_PIXART))
    return path


def transformer_argv(parts, pixart_file, output_dir, *extra):
    return argv(parts, output_dir, "--denoiser_config", str(pixart_file), *extra)


def transformer_weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("objective", [[], FLOW])
def test_a_transformer_trains_and_its_folder_draws_in_pixart_alpha_pipeline_and_generate(
        parts, pixart_file, tmp_path, openmoji_32, objective):
    out = tmp_path / "run"
    result = train_unet.main(transformer_argv(parts, pixart_file, out, "--max_train_steps", "2",
                                              "--validation_steps", "1", "--evaluation_steps", "1",
                                              "--validation_loss_samples", "8", *objective))
    assert result["global_step"] == 2 and "validation_loss" in result
    assert ("latent_bits_per_dim_skipped" in result) == bool(objective)
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(out))
    assert "unet" not in os.listdir(out) and os.path.isfile(out / "validation" / "step-000001.png")
    ours = load_latent_pipeline(str(out))
    theirs = PixArtAlphaPipeline.from_pretrained(out)
    drawn = [ours("rocket", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images,
             theirs("rocket", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(0), max_sequence_length=ours.tokenizer.model_max_length,
                    use_resolution_binning=False, clean_caption=False).images]
    assert abs(drawn[0] - drawn[1]).max() <= 1e-4
    generated = subprocess.run(
        [sys.executable, "generate.py", "--model", str(out), "--prompt", "red heart", "--num_inference_steps", "2",
         "--output_dir", str(tmp_path / "drawn")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert [name for name in os.listdir(tmp_path / "drawn") if name.endswith(".png")]


def test_a_resumed_transformer_run_ends_with_the_same_weights(parts, pixart_file, tmp_path, openmoji_32):
    """As test_train_unet's resume test, with a frozen CLIP so the text cache holds the transformer's masked
    states, and caption dropout swapping in the empty prompt's."""
    common = ["--checkpointing_steps", "2", "--validation_steps", "100", "--caption_dropout", "0.3",
              "--random_flip", "--text_encoder_name_or_path", str(parts / "clip"),
              "--timestep_sampling", "logit_normal"]
    train_unet.main(transformer_argv(parts, pixart_file, tmp_path / "straight", "--max_train_steps", "5", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(transformer_argv(parts, pixart_file, tmp_path / "resumed", "--max_train_steps", "2", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(transformer_argv(parts, pixart_file, tmp_path / "resumed", "--max_train_steps", "5",
                                     "--resume_from_checkpoint", "latest", *common))
    straight, resumed = transformer_weights(tmp_path / "straight"), transformer_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    at_two = load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors")
    assert not all(torch.equal(straight[name], at_two[name]) for name in straight)


def test_the_text_cache_holds_a_transformers_masked_states_apart_from_a_unets(parts, tiny_tokenizer,
                                                                             isolated_cache, tmp_path):
    encoder = CLIPTextModel.from_pretrained(parts / "clip")
    rows = datasets.Dataset.from_dict({"text": ["red heart", "cat face"]})
    plain, masked = (load_or_build_texts(tiny_tokenizer, encoder, rows, "text", str(tmp_path), "float32",
                                         padding_eos=eos) for eos in (None, tiny_tokenizer.eos_token_id))
    assert plain.folder != masked.folder
    states = masked.tensor(masked.table[:]["embeddings"].combine_chunks().flatten(), "embeddings")
    ids = tokenize(tiny_tokenizer, ["red heart", "cat face"])
    assert torch.equal(padding_mask(states).long(), through_first_eos(ids, tiny_tokenizer.eos_token_id))


# ---------------------------------------------------------------- editing, and what refuses a transformer


def test_a_transformer_pipeline_edits_images(transformer_components):
    pipe = pipeline_for(tiny_transformer(), **transformer_components)
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[:, :, 8:] = 1  # repaint the bottom half
    steps = []
    common = dict(num_inference_steps=10, guidance_scale=3.0, output_type="np")
    edited = pipe("rocket", image=image, strength=0.3, generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=lambda p, i, t, tensors: steps.append(i) or tensors, **common).images
    assert len(steps) == 3 and edited.shape == (1, 16, 16, 3)
    latents = [pipe(prompt, image=image, mask_image=mask, generator=torch.Generator().manual_seed(0),
                    **{**common, "output_type": "latent"}).images for prompt in ("rocket", "red heart")]
    # where the mask keeps the image, both prompts end on the image's latents; where it repaints, they differ
    assert torch.equal(latents[0][..., :3, :], latents[1][..., :3, :])
    assert not torch.allclose(latents[0][..., 5:, :], latents[1][..., 5:, :], atol=1e-3)


@pytest.fixture(scope="module")
def transformer_pipeline_folder(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("pixart-pipeline")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8})
    encoder = CLIPTextModel(text_encoder_config(tiny_tokenizer, **TINY_TEXT_ENCODER))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipeline_for(tiny_transformer(), vae=vae, text_encoder=encoder, tokenizer=tiny_tokenizer,
                 scheduler=scheduler).save_pretrained(folder)
    return folder


def test_lora_distillation_and_onnx_export_refuse_a_transformer_before_any_work(transformer_pipeline_folder,
                                                                                 parts, tmp_path):
    folder = str(transformer_pipeline_folder)
    with pytest.raises(ConfigError, match="PixArtTransformer2DModel has no LoRA support"):
        train_unet.main(argv(parts, tmp_path / "lora", "--pretrained_model_name_or_path", folder, "--lora_rank", "2",
                             "--max_train_steps", "1"))
    with pytest.raises(ConfigError, match="is a transformer pipeline; distillation takes a UNet teacher"):
        distill.main(["--teacher", folder, "--output_dir", str(tmp_path / "student"), "--max_train_steps", "1"])
    with pytest.raises(ValueError, match="the ONNX export and OnnxLatentDiffusionPipeline trace a UNet"):
        export_onnx(folder, str(tmp_path / "onnx"))
    lora = tmp_path / "adapter"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    refused = subprocess.run([sys.executable, "generate.py", "--model", folder, "--prompt", "rocket", "--lora",
                              str(lora), "--output_dir", str(tmp_path / "drawn")], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 2 and "is a transformer pipeline, and PixArtTransformer2DModel has no LoRA" \
        in refused.stderr
    assert not (tmp_path / "student").exists() and not (tmp_path / "onnx").exists()
    with pytest.raises(ValueError, match="load_lora_weights: PixArtTransformer2DModel has no LoRA support"):
        load_latent_pipeline(folder).load_lora_weights(str(lora))


@pytest.mark.parametrize("change, message", [
    ({"out_channels": 8}, "out_channels 8 must equal in_channels 4"),
    ({"caption_channels": None}, "set caption_channels to the text encoder's hidden_size"),
    ({"use_additional_conditions": True}, "set use_additional_conditions to false"),
    ({"norm_type": "ada_norm_zero"}, "supports only 'ada_norm_single'"),
    ({"num_layer": 2}, "unknown PixArtTransformer2DModel key(s) num_layer"),
    ({"_class_name": "DiTTransformer2DModel"}, "the denoisers this trainer builds are UNet2DConditionModel, "
                                               "PixArtTransformer2DModel"),
])
def test_a_bad_transformer_config_fails_when_the_flags_are_read(parts, tmp_path, change, message):
    path = tmp_path / "pixart.json"
    path.write_text(json.dumps({key: value for key, value in {**TINY_PIXART, **change}.items() if value is not None}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_unet.main(argv(parts, tmp_path / "run", "--denoiser_config", str(path)))
    assert not (tmp_path / "run").exists()


def test_the_transformers_caption_channels_must_match_the_text_encoder(parts, tmp_path, openmoji_32):
    path = tmp_path / "pixart.json"
    path.write_text(json.dumps({**TINY_PIXART, "caption_channels": 24}))
    with pytest.raises(ConfigError, match="caption_channels 24 does not match the text encoder's hidden_size 32"):
        train_unet.main(argv(parts, tmp_path / "run", "--denoiser_config", str(path), "--max_train_steps", "1"))
