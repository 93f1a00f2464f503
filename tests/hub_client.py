"""The Hub's clients for test_hub.py, run in a subprocess: huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, and the test process itself runs with HF_HUB_OFFLINE=1.

    python -m tests.hub_client '<JSON list of jobs>'

Several jobs share one process, because importing torch and diffusers costs seconds. A job is
- ["draw", model, revision, output.npy]: LatentDiffusionPipeline.from_pretrained, two images of "red heart";
- ["generate", *argv]: generate.py's main, whose exit code and stderr are the job's result;
- ["load_for_training", vae, pipeline, output_dir]: the VAE, UNet and text side by id, through the functions
  train_vae.py and train_unet.py load them with, saved into output_dir;
- ["snapshot", repo_id]: huggingface_hub.snapshot_download of main;
- ["commits", repo_id]: the titles of main's commits, newest first (olah's answer lacks fields the client reads,
  so this one is for huggingface.co);
- ["delete", repo_id]: delete the repository (what the live test created).
It prints one JSON line: the result of each job, in order.
"""

import contextlib
import io
import json
import os
import sys


def draw(model: str, revision: str, output: str) -> None:
    import numpy as np
    import torch

    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model, revision=revision)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("red heart", num_inference_steps=2, num_images_per_prompt=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    np.save(output, images)


def generate(*argv: str) -> list:
    from ldm.generate import main

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(list(argv))
    return [code, errors.getvalue()]


def load_for_training(vae_id: str, pipeline_id: str, output_dir: str) -> None:
    from ldm.models.text import load_text_components
    from ldm.training.unet import load_denoiser, load_frozen_vae
    from ldm.training.unet_config import UNetConfig
    from ldm.training.vae import load_vae, vae_architecture
    from ldm.training.vae_config import VAEConfig

    vae_config = VAEConfig(pretrained_vae_model_name_or_path=vae_id)
    load_vae(vae_config, vae_architecture(vae_config)).save_pretrained(os.path.join(output_dir, "train_vae"))
    config = UNetConfig(pretrained_vae_model_name_or_path=vae_id, pretrained_model_name_or_path=pipeline_id,
                        text_encoder_name_or_path=pipeline_id, revision="main")
    load_frozen_vae(config).save_pretrained(os.path.join(output_dir, "vae"))
    load_denoiser(config).save_pretrained(os.path.join(output_dir, "unet"))
    tokenizer, text_encoder = load_text_components(config.text_encoder_name_or_path, config.revision)
    text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))


def snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision="main")


def commits(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi

    return [commit.title for commit in HfApi().list_repo_commits(repo_id, revision="main")]


def delete(repo_id: str) -> None:
    from huggingface_hub import HfApi

    HfApi().delete_repo(repo_id)


JOBS = {"draw": draw, "generate": generate, "load_for_training": load_for_training, "snapshot": snapshot,
        "commits": commits, "delete": delete}

if __name__ == "__main__":
    print(json.dumps([JOBS[name](*arguments) for name, *arguments in json.loads(sys.argv[1])]))
