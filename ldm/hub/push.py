"""Pushing a saved pipeline, VAE or LoRA folder to the Hugging Face Hub with a model card, in one commit.

    python -m ldm.hub push outputs/unet-demo your-name/emoji-diffusion [--hub_private] [--hub_license ID]

A LoRA run's folder (train_unet.py --lora_rank) is pushed the same way: its adapter file, with a card
that names the pipeline it adapts.
"""

from __future__ import annotations

import fnmatch
import os

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from ldm.config import ConfigError
from ldm.hub.card import model_card, read_settings
from ldm.hub.files import LORA_WEIGHTS, PIPELINE_INDEX, HubError, find_model

# Training state that a model repository does not need: checkpoints hold optimizer and RNG states for
# resuming, and folders with these suffixes are checkpoints being written or replaced.
NOT_PUSHED = ("checkpoint-*", "*.partial", "*.replaced")

def hub_token(explicit: str | None) -> str:
    """The token to push with: `explicit`, else HF_TOKEN or the one `hf auth login` saved."""
    token = explicit or get_token()
    if not token:
        raise ConfigError("pushing to the Hugging Face Hub needs a token with write access: log in with "
                          "`hf auth login` (formerly `huggingface-cli login`), set HF_TOKEN, or pass --hub_token")
    return token


def require_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{repo_id!r} is not a Hub repository id ('user/name' or 'name'): {error}") from None



def push(folder: str, repo_id: str, token: str | None = None, private: bool = False,
         license: str | None = None) -> str:
    """Upload a saved pipeline or VAE folder, with a model card as README.md, to `repo_id` in one commit,
    creating the repository if needed. Returns the commit's URL.

    The folder itself is left as it is: the card goes up from memory.
    """
    token = hub_token(token)
    require_repo_id(repo_id)
    kind = pushed_kind(folder)
    settings = read_settings(folder)
    api = HfApi(token=token)
    try:
        # private=None keeps the namespace's default visibility, as the Hub's own default does.
        repo = api.create_repo(repo_id, private=private or None, exist_ok=True)
        card = model_card(folder, repo.repo_id, kind, settings, license)
        operations = [CommitOperationAdd(path, os.path.join(folder, path)) for path in files_to_push(folder, settings)]
        operations.append(CommitOperationAdd("README.md", card.encode()))
        commit = api.create_commit(repo.repo_id, operations, commit_message=f"Upload the {kind} trained with ldm")
    except HfHubHTTPError as error:
        reason = str(error).splitlines()[0]
        raise HubError(f"could not push {folder} to {repo_id} on {api.endpoint}: {reason}") from None
    return commit.commit_url


def pushed_kind(folder: str) -> str:
    """What a folder to push holds: "pipeline", "VAE" or "LoRA adapter"; HubError for anything else."""
    if not os.path.isdir(folder):
        raise HubError(f"{folder} is not a folder: push a train_unet.py or train_vae.py output_dir")
    if os.path.isfile(os.path.join(folder, LORA_WEIGHTS)) and not os.path.isfile(os.path.join(folder, PIPELINE_INDEX)):
        return "LoRA adapter"
    found = find_model(folder)
    if not (found.is_pipeline or found.is_vae):
        raise HubError(f"{folder} holds a {found.class_name}; push a pipeline ({PIPELINE_INDEX}), a VAE "
                       f"(an AutoencoderKL's config.json) or a LoRA adapter ({LORA_WEIGHTS})")
    return "pipeline" if found.is_pipeline else "VAE"


def files_to_push(folder: str, settings: dict) -> list[str]:
    """Every file of `folder` ('/'-separated, relative) but the training state and the TensorBoard logs;
    a README.md is left out because the model card takes its place."""
    skipped = NOT_PUSHED + (settings.get("logging_dir", "logs"), "README.md")

    def kept(names: list[str]) -> list[str]:
        return [name for name in names if not any(fnmatch.fnmatch(name, pattern) for pattern in skipped)]

    paths = []
    for root, folders, files in os.walk(folder):
        relative = os.path.relpath(root, folder)
        if relative == ".":  # the skipped names are those at the top of output_dir
            folders[:], files = kept(folders), kept(files)
        paths += [os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/") for name in files]
    return sorted(paths)


