"""Finding out what a folder or Hugging Face Hub repository holds before loading it, with a clear error for
each way that can fail.

Downloads go through huggingface_hub's cache (`HF_HUB_CACHE`), so a model fetched once also loads
with `HF_HUB_OFFLINE=1`. `HF_ENDPOINT` points everything at another Hub-compatible server.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ldm.config import ConfigError

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"  # at the root of a diffusers pipeline
MODEL_CONFIG = "config.json"  # at the root of a single diffusers or transformers model
METRICS = "metrics.json"
# A distilled pipeline's method, teacher and sampling defaults (ldm/training/distill.py).
DISTILLATION = "distillation.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # LoRA adapters in diffusers' format and name (ldm/models/lora.py)


class HubError(ConfigError):
    """A Hub repository, revision, token or cached file cannot be used; the message says which and why."""


class ModelFiles(NamedTuple):
    """What a model folder or Hub repository holds, according to the file that declares it."""

    is_pipeline: bool  # model_index.json at its root
    class_name: str  # the pipeline's or the model's class, as that file names it
    components: tuple[tuple[str, str], ...] = ()  # a pipeline's (subfolder, class) pairs

    @property
    def is_vae(self) -> bool:
        """A single AutoencoderKL: what train_vae.py writes and train_unet.py encodes with."""
        return not self.is_pipeline and self.class_name == "AutoencoderKL"


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id ('namespace/name' or 'name') rather than a path."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def find_model(name_or_path: str, revision: str | None = None) -> ModelFiles:
    """Read model_index.json (a pipeline), or else config.json (a single model), of a local folder or a
    Hub repository.

    Hub files come through huggingface_hub's cache, so this works offline once they were fetched.
    Raises HubError when the repository or revision does not exist, when the Hub cannot be reached
    and the cache does not hold them, and when neither file is there.
    """
    if not os.path.isdir(name_or_path) and not is_hub_id(name_or_path):
        raise HubError(f"{name_or_path!r} does not exist: it is not a folder, nor a Hub repository id "
                       "('namespace/name')")
    for filename in (PIPELINE_INDEX, MODEL_CONFIG):
        try:
            with open(fetch(name_or_path, filename, revision)) as file:
                declared = json.load(file)
        except (FileNotFoundError, HfHubHTTPError) as error:  # LocalEntryNotFoundError is a FileNotFoundError
            missing = error
            continue
        class_name = declared.get("_class_name") or (declared.get("architectures") or [declared.get("model_type")])[0]
        components = tuple((name, value[1]) for name, value in declared.items()
                           if filename == PIPELINE_INDEX and isinstance(value, list) and len(value) == 2)
        return ModelFiles(filename == PIPELINE_INDEX, class_name or "model of unknown class", components)
    raise explain(name_or_path, named_revision(revision), missing)


def read_distillation(name_or_path: str, revision: str | None = None) -> dict:
    """A distilled pipeline's facts (local folder or Hub): method, teacher, num_inference_steps,
    guidance_scale; {} for a model that was not distilled."""
    try:
        with open(fetch(name_or_path, DISTILLATION, revision)) as file:
            return json.load(file)
    except (FileNotFoundError, HfHubHTTPError):
        return {}


def find_lora(name_or_path: str, revision: str | None = None) -> str:
    """The local path of a LoRA adapter file: `name_or_path` itself (a .safetensors file), the
    pytorch_lora_weights.safetensors of a folder (a train_unet.py --lora_rank output_dir or one of its
    checkpoints), or that of a Hub repository, downloaded into the cache. Raises HubError with the reason."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if not os.path.isdir(name_or_path) and not is_hub_id(name_or_path):
        raise HubError(f"{name_or_path!r} does not exist: it is not a file or folder, nor a Hub repository id "
                       "('namespace/name')")
    try:
        return fetch(name_or_path, LORA_WEIGHTS, revision)
    except (FileNotFoundError, HfHubHTTPError) as error:  # LocalEntryNotFoundError is a FileNotFoundError
        raise explain(name_or_path, named_revision(revision), error, not_a_lora) from None


def named_revision(revision: str | None) -> str:
    """"main" for None: the same to the Hub, but mirrors such as olah resolve only named revisions."""
    return revision or constants.DEFAULT_REVISION


def fetch(name_or_path: str, filename: str, revision: str | None) -> str:
    """The path of `filename` in a local folder, or in the cached snapshot of a Hub repository."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    return hf_hub_download(name_or_path, filename, revision=named_revision(revision))


def explain(name_or_path: str, revision: str, error: Exception,
            lacks_file: Callable[[str], HubError] | None = None) -> HubError:
    """The HubError for a folder or repository in which the file asked for was not found: by default
    model_index.json or config.json (`not_a_model`), else what `lacks_file(where)` says."""
    lacks_file = lacks_file or not_a_model
    if os.path.isdir(name_or_path):
        return lacks_file(name_or_path)
    if isinstance(error, LocalEntryNotFoundError):
        reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{constants.ENDPOINT} cannot be reached"
        return HubError(f"{name_or_path} (revision {revision}) is not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and {reason}; download it once while online")
    if isinstance(error, GatedRepoError):
        return HubError(f"{name_or_path} is gated: accept its conditions at {constants.ENDPOINT}/{name_or_path}, "
                        "then log in with `hf auth login` or set HF_TOKEN")
    if isinstance(error, RemoteEntryNotFoundError):
        return lacks_file(f"{name_or_path} (revision {revision})")
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return missing_repository_or_revision(name_or_path, revision, lacks_file)
    return HubError(f"could not read {name_or_path} (revision {revision}) from {constants.ENDPOINT}: {error}")


def missing_repository_or_revision(repo_id: str, revision: str, lacks_file: Callable[[str], HubError]) -> HubError:
    """Which of the two is missing, told apart by the repository's refs: a mirror (olah) answers
    "repository not found" for a missing revision or file as well, and the refs name the valid revisions."""
    try:
        refs = HfApi().list_repo_refs(repo_id)
    except HfHubHTTPError:
        return HubError(f"repository {repo_id} does not exist on {constants.ENDPOINT} (or it is private: log in "
                        "with `hf auth login` or set HF_TOKEN)")
    names = [ref.name for ref in refs.branches + refs.tags]
    if revision not in names:
        return HubError(f"revision {revision!r} does not exist in {repo_id}; its branches and tags are "
                        f"{', '.join(names) or 'none'} (or give a commit id)")
    return lacks_file(f"{repo_id} (revision {revision})")


def not_a_model(where: str) -> HubError:
    return HubError(f"{where} is not a pipeline or a model: it has neither {PIPELINE_INDEX} (a diffusers pipeline) "
                    f"nor {MODEL_CONFIG} (a single model such as a VAE)")


def not_a_lora(where: str) -> HubError:
    return HubError(f"{where} is not a LoRA adapter: it has no {LORA_WEIGHTS} (train_unet.py --lora_rank writes one)")
