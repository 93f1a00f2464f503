"""The pipeline a GenerateConfig asks for: loaded from a folder, the Hub or an ONNX export, with its
LoRA adapters, on its device, and settled (the defaults and checks that need the model). generate.py,
the web UI and the ONNX export all load through here."""

from __future__ import annotations

import logging
import os

import torch

from ldm.generation.config import DEFAULT_GUIDANCE, DEFAULT_STEPS, DTYPES, GenerateConfig, check_config, read_prompts
from ldm.generation.edit_inputs import EditInputs, check_edit, edit_strength, read_edit_inputs
from ldm.hub.files import HubError, find_lora, find_model, is_hub_id, named_revision, read_distillation
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.latent_transformer import LatentTransformerPipeline, load_latent_pipeline, pipeline_class
from ldm.pipelines.onnx_pipeline import MANIFEST as ONNX_MANIFEST
from ldm.pipelines.onnx_pipeline import OnnxLatentDiffusionPipeline
from ldm.pipelines.watermark import size_problem

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            message = f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1, mps, ..."
            raise ValueError(message) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(model: str, revision: str | None, dtype: torch.dtype) -> LatentDiffusionPipeline:
    """A pipeline from a local folder, or from the Hub when `model` is not a folder but reads as a repo id."""
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, ONNX_MANIFEST)):
            raise ValueError(f"{model} is an ONNX export (python -m ldm.export onnx), not a PyTorch pipeline: "
                             "generate.py runs it with --backend onnx")
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"{model} is not a pipeline folder: it has no model_index.json (a saved pipeline holds "
                             "model_index.json, vae/, text_encoder/, tokenizer/, unet/ or transformer/, scheduler/)")
    elif not is_hub_id(model):
        raise ValueError(f"model folder {model} does not exist")
    else:
        check_hub_pipeline(model, revision)
    try:
        return load_latent_pipeline(model, revision=named_revision(revision), dtype=dtype)
    except (OSError, ValueError) as error:
        where = "the folder" if os.path.isdir(model) else "the Hugging Face Hub (it is not a local folder either)"
        raise ValueError(f"could not load a pipeline {model!r} from {where}: {error}") from error


def check_hub_pipeline(model: str, revision: str | None) -> None:
    """The repository's model_index.json, from the Hub or the cache, before any weights: a missing
    repository or revision, an offline machine and a repository that is no pipeline each get their reason."""
    try:
        found = find_model(model, revision)
    except HubError as error:
        raise ValueError(f"could not load a pipeline {model!r} from the Hugging Face Hub: {error}") from None
    if not found.is_pipeline:
        raise ValueError(f"{model} holds a single {found.class_name}, not a pipeline: generate.py needs a "
                         "text-to-image pipeline (model_index.json with vae/, text_encoder/, tokenizer/, unet/ or "
                         "transformer/, and scheduler/)")


def is_transformer_pipeline(model: str, revision: str | None) -> bool:
    try:
        return pipeline_class(model, revision) is LatentTransformerPipeline
    except HubError:
        return False  # load_pipeline explains what is wrong with the model


def lora_file(lora: str) -> str:
    """The local path of --lora's adapter file (downloaded first from the Hub), before any model loads."""
    try:
        return find_lora(lora)
    except HubError as error:
        raise ValueError(f"--lora: {error}") from None


def load_lora(pipe: LatentDiffusionPipeline, path: str, lora: str) -> None:
    """The adapters of the file at `path` (--lora `lora`) into the pipeline, through diffusers' loader."""
    try:
        pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    except (ValueError, RuntimeError, KeyError) as error:  # adapters of another model: the first mismatch says which
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise ValueError(f"could not load the LoRA adapters {lora!r} into the model: {reason}") from error


def check_size(pipe: LatentDiffusionPipeline, height: int, width: int) -> None:
    for name, size in (("height", height), ("width", width)):
        if size % pipe.vae_scale_factor:
            raise ValueError(f"--{name} {size} is not divisible by the VAE factor {pipe.vae_scale_factor} "
                             f"(try {size // pipe.vae_scale_factor * pipe.vae_scale_factor or pipe.vae_scale_factor})")
    if isinstance(pipe, OnnxLatentDiffusionPipeline):  # its traced UNet's own rule
        pipe.check_size(height, width)


def prepare(config: GenerateConfig, device: torch.device | None = None
            ) -> tuple[LatentDiffusionPipeline, list[str], EditInputs | None]:
    """Check everything and load the pipeline, configured as `config` asks, on `device` (default:
    --device). Returns it with the prompts and the image to edit, if any. Raises ValueError."""
    check_config(config)
    prompts = read_prompts(config)
    edit = read_edit_inputs(config)
    pipe = load_model(config, device)
    settle(pipe, config, read_distillation(config.model, config.revision), edit)
    configure(pipe, config)
    return pipe, prompts, edit


def load_model(config: GenerateConfig, device: torch.device | None = None) -> LatentDiffusionPipeline:
    """--model with its --lora adapters, on `device` (default: --device). The adapters' file is found
    first: a missing one fails before the model loads."""
    lora = lora_file(config.lora) if config.lora is not None else None
    if lora is not None and config.backend != "onnx" and is_transformer_pipeline(config.model, config.revision):
        raise ValueError(f"--lora {config.lora}: {config.model} is a transformer pipeline, and "
                         "PixArtTransformer2DModel has no LoRA support in diffusers (no PeftAdapterMixin)")
    device = device or resolve_device(config.device)
    if config.backend == "onnx":
        pipe = OnnxLatentDiffusionPipeline.from_pretrained(config.model)
    else:
        pipe = load_pipeline(config.model, config.revision, DTYPES[config.dtype])
    if lora is not None:
        load_lora(pipe, lora, config.lora)
    return pipe.to(device)


def configure(pipe: LatentDiffusionPipeline, config: GenerateConfig) -> None:
    """The sampler, precision and decoding `config` asks for."""
    if config.scheduler is not None:
        pipe.set_scheduler(config.scheduler)
    if config.fast:
        pipe.enable_fast_mode()
    if config.vae_tiling:
        pipe.vae.enable_tiling()


def settle(pipe: LatentDiffusionPipeline, config: GenerateConfig, distilled: dict,
           edit: EditInputs | None = None) -> None:
    """The defaults that depend on the loaded model (a distilled model's own steps and guidance,
    its native size) filled into `config`, and the checks that need the model. The web UI
    (ldm/app.py) settles each request with this too, so both draw from the same settings."""
    if config.lora is not None and config.lora_scale is None:
        config.lora_scale = 1.0
    config.num_inference_steps = config.num_inference_steps or distilled.get("num_inference_steps", DEFAULT_STEPS)
    if config.guidance_scale is None:
        config.guidance_scale = distilled.get("guidance_scale", DEFAULT_GUIDANCE)
    if edit is not None:
        check_edit(pipe, edit, config)
        config.strength = edit_strength(config)
    config.height, config.width = default_size(pipe, edit, config)
    check_size(pipe, config.height, config.width)
    if config.watermark:
        config.watermark = can_carry_watermark(edit, config)


def can_carry_watermark(edit: EditInputs | None, config: GenerateConfig) -> bool:
    """Whether the images will be wide enough for the watermark; once, with a warning, when not
    (rather than the pipeline's warning at every batch). A crop around a mask is pasted back
    before the mark, so the image's own size counts then."""
    height, width = (edit.image.height, edit.image.width) if config.padding_mask_crop is not None else (
        config.height, config.width)
    problem = size_problem(height, width)
    if problem:
        logger.warning("--watermark: the images will be written unmarked: %s", problem)
    return problem is None


def default_size(pipe: LatentDiffusionPipeline, edit: EditInputs | None, config: GenerateConfig) -> tuple[int, int]:
    """--height and --width, else an edit keeps the image's size (rounded down to the VAE factor) and
    everything else, a crop around a mask included, is drawn at the model's native size."""
    native = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    if edit is None or config.padding_mask_crop is not None:
        return config.height or native, config.width or native
    factor = pipe.vae_scale_factor
    return (config.height or edit.image.height // factor * factor,
            config.width or edit.image.width // factor * factor)


