"""Tiny, offline components shared by the tests: every model here has hidden sizes of 8-32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Nothing in the suite may reach a hub; set before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel

from ldm.evaluation.image_metrics import STANDARD_WEIGHTS_FILE
from ldm.models.text import text_encoder_config, train_tokenizer


def run_in_two_processes(port_offset: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a trainer script from the repository root in two CPU processes, offline, one thread each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([*two_processes(port_offset), script, *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
                                            "OMP_NUM_THREADS": "1"})


def two_processes(port_offset: int) -> list[str]:
    """The command that starts a script in two CPU processes over gloo, with ACCELERATE_USE_CPU=true
    in its environment: torchrun through `accelerate launch --multi_gpu` (`--cpu --num_processes 2`
    would quietly start one). Each test takes its own port offset, so launches do not collide."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(29500 + (os.getpid() + port_offset) % 1000)]


TINY_CAPTIONS = [
    "grinning face", "red heart", "blue circle", "thumbs up", "cat face", "dog face",
    "smiling face with sunglasses", "green apple", "yellow star", "rocket", "pizza", "rainbow",
]

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
)  # f = 2

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)

TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tokenizer(TINY_CAPTIONS * 4, vocab_size=500, save_dir=str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture
def tiny_text_encoder(tiny_tokenizer):
    torch.manual_seed(0)
    return CLIPTextModel(text_encoder_config(tiny_tokenizer, **TINY_TEXT_ENCODER)).eval()


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL.from_config(TINY_VAE).eval()


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(TINY_UNET).eval()


@pytest.fixture
def tiny_scheduler():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False)


@pytest.fixture
def tiny_components(tiny_vae, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_scheduler):
    """The five components of a LatentDiffusionPipeline, keyed by their registered names."""
    return dict(vae=tiny_vae, text_encoder=tiny_text_encoder, tokenizer=tiny_tokenizer,
                unet=tiny_unet, scheduler=tiny_scheduler)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Built datasets and caches go to a fresh folder per test session (inherited by subprocesses)."""
    path = str(tmp_path_factory.mktemp("ldm-cache"))
    os.environ["LDM_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def openmoji_32(isolated_cache):
    from ldm.data.openmoji import load_openmoji

    return load_openmoji(32)


@pytest.fixture
def single_thread():
    """One torch thread for the test. Tiny models run fastest on one, and on a busy 2-core machine
    two threads spin-wait on each other: the pipeline tests took 136 s with two, 12 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_tokenizer):
    """A saved tiny VAE (with a measured-looking scale), tiny UNet / text encoder config files, and
    a saved tiny CLIP (tokenizer + text encoder in one folder, like a Hub CLIP checkpoint)."""
    folder = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tiny_tokenizer.save_pretrained(folder / "clip")
    CLIPTextModel(text_encoder_config(tiny_tokenizer, **TINY_TEXT_ENCODER)).save_pretrained(folder / "clip")
    AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8}).save_pretrained(folder / "vae")
    (folder / "unet.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    (folder / "text_encoder.json").write_text(json.dumps(TINY_TEXT_ENCODER))
    return folder


def random_inception_file(folder: str) -> str:
    """torch-fidelity's Inception-v3 with random weights, saved as a state dict under the standard file name in
    `folder` (91 MB). Built with the download and the load patched out; every conv then gets Kaiming-normal
    weights, since PyTorch's default init leaves features so close to zero that every FID comes out near 1e-12."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    extractor = inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(extractor, "load_state_dict", lambda self, state_dict, *args, **kwargs: None)
        network = extractor("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=generator)
    # Larger class weights than the default init, so that the Inception Score is not stuck at 1.
    torch.nn.init.normal_(network.fc.weight, std=0.2, generator=generator)
    path = os.path.join(folder, STANDARD_WEIGHTS_FILE)
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """The random-weight Inception file, once per session and outside the repository."""
    return random_inception_file(str(tmp_path_factory.mktemp("inception")))


def tiny_clip_config(tokenizer) -> CLIPConfig:
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory, tiny_tokenizer):
    """A random tiny CLIP and its processor (the project's own tiny tokenizer, 32 px images), as save_pretrained
    writes a Hub CLIP."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(tiny_tokenizer)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer).save_pretrained(folder)
    return str(folder)
