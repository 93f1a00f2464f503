"""Sharing on the Hugging Face Hub: push a saved pipeline or VAE with a model card, and find out what
a folder or Hub repository holds before loading it, with a clear error for each way that can fail.

    python -m ldm.hub push outputs/unet-demo your-name/emoji-diffusion [--hub_private] [--hub_license ID]

A LoRA run's folder (train_unet.py --lora_rank) is pushed the same way: its adapter file, with a card
that names the pipeline it adapts.

Downloads go through huggingface_hub's cache (`HF_HUB_CACHE`), so a model fetched once also loads
with `HF_HUB_OFFLINE=1`. `HF_ENDPOINT` points everything at another Hub-compatible server.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from ldm.config import RUN_CONFIG, ConfigError, TrainConfig, hub_token, require_repo_id

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"  # at the root of a diffusers pipeline
MODEL_CONFIG = "config.json"  # at the root of a single diffusers or transformers model
METRICS = "metrics.json"
DISTILLATION = "distillation.json"  # a distilled pipeline's method, teacher and sampling defaults (ldm/distill.py)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # LoRA adapters in diffusers' format and name (ldm/lora.py)
# Training state that a model repository does not need: checkpoints hold optimizer and RNG states for
# resuming, and folders with these suffixes are checkpoints being written or replaced.
NOT_PUSHED = ("checkpoint-*", "*.partial", "*.replaced")
OPENMOJI_LICENSE = "cc-by-sa-4.0"


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


# ---------------------------------------------------------------- pull


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


# ---------------------------------------------------------------- push


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


def finish_run(config: TrainConfig, metrics: dict) -> None:
    """A trainer's last step, on the main process: metrics.json beside the model (the model card reports
    it), then, with --push_to_hub, the upload of output_dir."""
    with open(os.path.join(config.output_dir, METRICS), "w") as file:
        # Numbers only: lists (such as the unreadable rows) stay in the training log.
        json.dump({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, file, indent=2)
    if not config.push_to_hub:
        return
    try:
        url = push(config.output_dir, config.hub_repo_id(), config.hub_credentials(), config.hub_private,
                   config.hub_license)
    except HubError as error:
        raise HubError(f"{error}. The model is saved in {config.output_dir}; push it again with "
                       f"`python -m ldm.hub push {config.output_dir} {config.hub_repo_id()}`") from None
    logger.info(f"pushed {config.output_dir} to {url}")


def read_settings(folder: str) -> dict:
    """The training config saved beside the model ({} for a folder saved by hand)."""
    path = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return yaml.safe_load(file) or {}


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


def dataset_of(settings: dict) -> str | None:
    if settings.get("train_data_dir"):
        return os.path.basename(os.path.normpath(settings["train_data_dir"]))
    return settings.get("dataset_name")


def model_card(folder: str, repo_id: str, kind: str, settings: dict, license: str | None = None) -> str:
    """README.md for the Hub: YAML metadata (library, pipeline tag, license, dataset; for a LoRA adapter also
    the base model and the concept its captions name), then what the model is and how to load it, its
    sample grid, its measured metrics, and the config it was trained with. `kind` is what `pushed_kind` says.

    A VAE gets no pipeline tag: it does not draw images from text, and the Hub has no autoencoder task.
    The license defaults to the data's: OpenMoji's CC BY-SA 4.0 binds models trained on it.
    """
    dataset = dataset_of(settings)
    license = license or settings.get("hub_license") or (OPENMOJI_LICENSE if dataset == "openmoji" else "other")
    draws = kind != "VAE"
    tags = ["latent-diffusion"] + {"pipeline": ["text-to-image"], "VAE": ["autoencoder", "vae"],
                                   "LoRA adapter": ["text-to-image", "lora"]}[kind]
    adapter = {}
    if kind == "LoRA adapter":
        adapter = {"base_model": base_model_id(settings), "instance_prompt": settings.get("lora_concept")}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image" if draws else None, license=license,
                         datasets=[dataset] if dataset else None, tags=tags,
                         **{key: value for key, value in adapter.items() if value})
    about = describe_lora(repo_id, settings) if adapter else describe(repo_id, kind == "pipeline",
                                                                       read_distillation(folder))
    sections = [f"# {repo_id}", about]
    samples = sample_grid(folder)
    if samples:
        caption = {"pipeline": "Samples for the validation prompts", "VAE": "Held-out images (top) and reconstructions",
                   "LoRA adapter": "Samples for the validation prompts, with the adapter"}[kind]
        sections.append(f"## Samples\n\n{caption}:\n\n![samples]({samples})")
    metrics_path = os.path.join(folder, METRICS)
    if os.path.isfile(metrics_path):
        with open(metrics_path) as file:
            rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in json.load(file).items())
        sections.append(f"## Metrics\n\nMeasured at the end of training:\n\n| metric | value |\n|---|---:|\n{rows}")
    if dataset:
        sections.append(f"## Data\n\nTrained on `{dataset}`." + (
            " The images are [OpenMoji](https://openmoji.org), the open-source emoji project, licensed under "
            "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/); models trained on them and images "
            "made with those models carry that attribution." if dataset == "openmoji" else ""))
    if settings:
        config = yaml.safe_dump(settings, sort_keys=False).strip()
        sections.append(f"## Training config\n\n`{RUN_CONFIG}`, as the run resolved it:\n\n```yaml\n{config}\n```")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def base_model_id(settings: dict) -> str | None:
    """The Hub id of the pipeline a LoRA adapts, for the card's `base_model`; None when it was a local
    folder, which the Hub would refuse there (it takes model ids only)."""
    base = settings.get("pretrained_model_name_or_path")
    return base if base and not os.path.isdir(base) and is_hub_id(base) else None


def describe(repo_id: str, is_pipeline: bool, distilled: dict) -> str:
    if distilled:
        steps, guidance = distilled["num_inference_steps"], distilled["guidance_scale"]
        return (f"A {steps}-step text-to-image latent diffusion pipeline, distilled with ldm by latent consistency "
                f"distillation (`{distilled['method']}`) from the pipeline `{distilled['teacher']}`. Its UNet takes "
                "the guidance scale as an input (`time_cond_proj_dim`), so each step is one UNet pass; its "
                "scheduler is an LCMScheduler.\n\n```python\n"
                "from diffusers import LatentConsistencyModelPipeline  # or StableDiffusionPipeline\n\n"
                f'pipe = LatentConsistencyModelPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
                f'image = pipe("red heart", num_inference_steps={steps}, guidance_scale={guidance}).images[0]\n'
                f'```\n\nor `python generate.py --model {repo_id} --prompt "red heart"` ({steps} steps by default).')
    if is_pipeline:
        return ("A text-to-image latent diffusion pipeline (CLIP text encoder, UNet2DConditionModel, AutoencoderKL) "
                "in the diffusers layout, trained with ldm.\n\n```python\n"
                "from diffusers import StableDiffusionPipeline  # or ldm.pipeline.LatentDiffusionPipeline\n\n"
                f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", safety_checker=None)\n'
                'image = pipe("red heart", num_inference_steps=25).images[0]\n```\n\n'
                f'or `python generate.py --model {repo_id} --prompt "red heart"`.')
    return ("The autoencoder (AutoencoderKL) of a latent diffusion model, trained with ldm. Its config.json "
            "carries the measured latent `scaling_factor`.\n\n```python\nfrom diffusers import AutoencoderKL\n\n"
            f'vae = AutoencoderKL.from_pretrained("{repo_id}")\n```')


def describe_lora(repo_id: str, settings: dict) -> str:
    base = settings.get("pretrained_model_name_or_path", "the base pipeline")
    where = f"`{base}`" if base_model_id(settings) else f"`{base}` (a local folder when it was trained, not on the Hub)"
    text_encoder = " and the text encoder's attention projections" if settings.get("train_text_encoder_lora") else ""
    targets = " ".join(settings.get("lora_target_modules") or [])
    concept = settings.get("lora_concept")
    # the concept's words after the subject, where the demo's captions put them
    prompt = f"red heart {concept}" if concept else "red heart"
    return (f"LoRA adapters (arXiv 2106.09685) for the text-to-image pipeline {where}, trained with ldm: rank "
            f"{settings.get('lora_rank')}, alpha {settings.get('lora_alpha') or settings.get('lora_rank')}, on the "
            f"UNet's `{targets}`{text_encoder}."
            + (f" Its training captions call what it learnt `{concept}`: put that in the prompt." if concept else "")
            + f" `{LORA_WEIGHTS}` is in diffusers' LoRA format.\n\n```python\n"
            "from diffusers import StableDiffusionPipeline  # or ldm.pipeline.LatentDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None)\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            f'image = pipe("{prompt}", num_inference_steps=25, cross_attention_kwargs={{"scale": 1.0}}).images[0]\n'
            f'```\n\nor `python generate.py --model {base} --lora {repo_id} --lora_scale 1.0 --prompt "{prompt}"`.')


def sample_grid(folder: str) -> str | None:
    """The last validation grid the trainer saved, as a path relative to `folder`."""
    validation = os.path.join(folder, "validation")
    grids = sorted(fnmatch.filter(os.listdir(validation), "step-*.png")) if os.path.isdir(validation) else []
    return f"validation/{grids[-1]}" if grids else None


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.hub", description="Share models on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push_command = commands.add_parser("push", help="upload a saved pipeline, VAE or LoRA folder with a model card, "
                                                    "in one commit")
    push_command.add_argument("folder", help="a train_unet.py or train_vae.py output_dir")
    push_command.add_argument("repo_id", help="'user/name', or 'name' under your account")
    push_command.add_argument("--hub_private", action="store_true", help="create the repository private")
    push_command.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the token `hf auth login` saved")
    push_command.add_argument("--hub_license", default=None, help="license id for the model card; default: the "
                                                                  "training config's, or the data's")
    args = parser.parse_args(argv)
    try:
        url = push(args.folder, args.repo_id, args.hub_token, args.hub_private, args.hub_license)
    except ConfigError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
