"""What `generate.py` does: prompts + a saved pipeline → one PNG per image and a contact sheet,
from noise, or by editing `--init_image` (image-to-image; with `--mask_image`, inpainting), with the
pipeline as it is or with LoRA adapters (`--lora`).

Every input is checked before the first image is drawn, and the PNGs are written to a
temporary folder and moved into `--output_dir` only once all of them exist, so a failed run
leaves nothing half-written.

Under `accelerate launch`, the images are shared out between the processes in batches numbered
in one global order; an image's seed, batch and file name come from its global index, so every
file is the same, byte for byte, whatever the number of processes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Callable, Literal

import torch
from accelerate import PartialState
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from transformers import HfArgumentParser

from ldm.chunks import partial_name
from ldm.hub import HubError, find_lora, find_model, is_hub_id, named_revision, read_distillation
from ldm.edit_inputs import (EditInputs, check_edit, check_edit_flags, edit_strength, input_picture,
                              read_edit_inputs, with_input_column)
from ldm.onnx_pipeline import MANIFEST as ONNX_MANIFEST, OnnxLatentDiffusionPipeline
from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import resolve_scheduler, scheduler_name
from ldm.watermark import size_problem

logger = logging.getLogger(__name__)

DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What an ONNX export cannot do: these need the PyTorch models (an export is run as it was exported).
TORCH_ONLY_FLAGS = ("dtype", "fast", "vae_tiling", "lora", "lora_scale", "init_image", "mask_image", "strength",
                    "padding_mask_crop", "revision")


@dataclass
class GenerateConfig:
    model: str = field(metadata={"help": "A saved pipeline folder or a Hugging Face Hub model id."})
    prompt: list[str] = field(default_factory=list, metadata={
        "help": "Prompt(s) to draw; repeat the flag for several.", "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "A text file with one prompt per line."})
    negative_prompt: str | None = field(default=None, metadata={"help": "What the images should not show."})
    num_inference_steps: int | None = field(default=None, metadata={
        "help": f"Denoising steps. Default: {DEFAULT_STEPS}, or a distilled model's own count."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": f"Classifier-free guidance weight; 1 or less turns guidance off. Default: {DEFAULT_GUIDANCE}, "
                "or a distilled model's own."})
    scheduler: str | None = field(default=None, metadata={
        "help": "Sampler: ddpm, ddim, pndm, lms, euler, euler_a, heun, dpm++2m, dpm++2m_karras, unipc, lcm, tcd "
                "(for a distilled model), or a "
                "diffusers scheduler class name. Default: the one saved with the model."})
    seed: int = field(default=0, metadata={"help": "Image i of the run uses seed + i."})
    num_images_per_prompt: int = field(default=1, metadata={"help": "Images drawn for each prompt."})
    batch_size: int = field(default=8, metadata={
        "help": "Images per pipeline call, in the order of their index; also the unit shared out between "
                "processes under `accelerate launch`. An inpainted image depends on its batch (diffusers' "
                "inpainting samples the image's latents with the batch's first generator): redraw it with the "
                "same --batch_size."})
    init_image: str | None = field(default=None, metadata={
        "help": "An image file to edit (image-to-image), instead of drawing from noise."})
    strength: float | None = field(default=None, metadata={
        "help": "With --init_image: how much to redraw, in (0, 1]; int(steps × strength) steps run. "
                "Default 0.8, or 1.0 when inpainting."})
    mask_image: str | None = field(default=None, metadata={
        "help": "With --init_image: repaint only where this mask (same size) is white; keep where it is black."})
    padding_mask_crop: int | None = field(default=None, metadata={
        "help": "With --mask_image: inpaint only a crop around the mask, widened by this many pixels, at the "
                "model's resolution, and paste it back; every pixel outside the mask stays the original's "
                "(unless --watermark)."})
    height: int | None = field(default=None, metadata={
        "help": "Image height in pixels, a multiple of the VAE factor. Default: the model's native size, or for "
                "an edit the --init_image's (rounded down to the factor); with --padding_mask_crop, the size the "
                "crop is drawn at."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels; as --height."})
    output_dir: str = field(default="samples", metadata={"help": "Where the PNGs and grid.png go."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of --model."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), or a torch device."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={
        "help": "Precision of the whole pipeline."})
    fast: bool = field(default=False, metadata={
        "help": "Fast mode: run the UNet in bfloat16 (LatentDiffusionPipeline.enable_fast_mode)."})
    vae_tiling: bool = field(default=False, metadata={"help": "Decode in overlapping tiles, for large images."})
    watermark: bool = field(default=False, metadata={
        "help": "Mark the images with diffusers' SDXL invisible watermark (read it with `python -m ldm.watermark "
                "detect`). Images narrower than 256 px, or under 256×256 pixels, cannot carry it and are written "
                "unmarked."})
    lora: str | None = field(default=None, metadata={
        "help": "LoRA adapters to draw with: a train_unet.py --lora_rank output folder (or one of its checkpoints), a "
                "pytorch_lora_weights.safetensors file, or a Hub id (its main branch)."})
    lora_scale: float | None = field(default=None, metadata={
        "help": "With --lora: how strongly the adapters act; 0 draws what the model draws without them. Default: 1."})
    backend: Literal["torch", "onnx"] = field(default="torch", metadata={
        "help": "torch: the PyTorch pipeline. onnx: a `python -m ldm.export onnx` folder, run by ONNX Runtime on "
                f"the CPU (ldm/onnx_pipeline.py); not with --{', --'.join(TORCH_ONLY_FLAGS)}."})


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    parser = HfArgumentParser(GenerateConfig, description="Draw images from a text-to-image latent diffusion "
                                                          "pipeline.")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def read_prompts(config: GenerateConfig) -> list[str]:
    prompts = list(config.prompt)
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("--prompt is empty: describe the image to draw")
    if config.prompts_file is not None:
        if not os.path.isfile(config.prompts_file):
            raise ValueError(f"--prompts_file {config.prompts_file} does not exist")
        with open(config.prompts_file, encoding="utf-8") as file:
            prompts += [line.strip() for line in file if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt \"...\" (repeatable) or --prompts_file with one prompt per line")
    return prompts


def check_config(config: GenerateConfig) -> None:
    """The checks that need no model: fail in milliseconds, not after loading one."""
    if config.num_inference_steps is not None and config.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {config.num_inference_steps}")
    for name in ("num_images_per_prompt", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(config, name)}")
    for name in ("height", "width"):
        size = getattr(config, name)
        if size is not None and size <= 0:
            raise ValueError(f"--{name} must be a positive number of pixels, got {size}")
    if config.scheduler is not None:
        resolve_scheduler(config.scheduler)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ValueError(f"--output_dir {config.output_dir} exists and is not a folder")
    if config.lora_scale is not None and config.lora is None:
        raise ValueError("--lora_scale weighs LoRA adapters: pass --lora too")
    if config.lora_scale is not None and not math.isfinite(config.lora_scale):
        raise ValueError(f"--lora_scale must be a finite number, got {config.lora_scale}")
    check_edit_flags(config)
    check_backend_flags(config)


def check_backend_flags(config: GenerateConfig) -> None:
    """--backend onnx takes the flags that make sense for an exported model on the CPU, and no others."""
    if config.backend != "onnx":
        return
    defaults = {option.name: option.default for option in dataclass_fields(GenerateConfig)}
    for name in TORCH_ONLY_FLAGS:
        if getattr(config, name) != defaults[name]:
            raise ValueError(f"--{name} does not apply to --backend onnx: it needs the PyTorch pipeline, and an ONNX "
                             f"export runs as exported (drop --{name}, or use --backend torch with the PyTorch model)")
    if config.device not in ("auto", "cpu"):
        raise ValueError(f"--device {config.device} does not apply to --backend onnx, which runs on ONNX Runtime's CPU "
                         "provider; use --device cpu or auto")


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
            raise ValueError(f"{model} is not a pipeline folder: it has no model_index.json (a saved pipeline "
                             "holds model_index.json, vae/, text_encoder/, tokenizer/, unet/ and scheduler/)")
    elif not is_hub_id(model):
        raise ValueError(f"model folder {model} does not exist")
    else:
        check_hub_pipeline(model, revision)
    try:
        return LatentDiffusionPipeline.from_pretrained(model, revision=named_revision(revision), dtype=dtype)
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
                         "text-to-image pipeline (model_index.json with vae/, text_encoder/, tokenizer/, unet/ and "
                         "scheduler/)")


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
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if edit is None or config.padding_mask_crop is not None:
        return config.height or native, config.width or native
    factor = pipe.vae_scale_factor
    return (config.height or edit.image.height // factor * factor,
            config.width or edit.image.width // factor * factor)


@dataclass(frozen=True)
class ImageJob:
    """One image of the run: its place in the global order, its prompt and its seed."""
    index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:04d}-{_slug(self.prompt)}-seed{self.seed}.png"


def image_jobs(prompts: list[str], config: GenerateConfig) -> list[ImageJob]:
    """Every image, prompt-major; image i of the run uses seed + i."""
    per_prompt = config.num_images_per_prompt
    return [ImageJob(k * per_prompt + j, prompt, config.seed + k * per_prompt + j)
            for k, prompt in enumerate(prompts) for j in range(per_prompt)]


def in_batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """The pipeline calls, in order, `batch_size` images each. An inpainted image depends on its batch
    (see --batch_size), so whoever wants generate.py's images, the web UI included, batches alike."""
    return [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]


def generate(pipe: LatentDiffusionPipeline, prompts: list[str], config: GenerateConfig,
             edit: EditInputs | None = None, state: PartialState | None = None) -> list[str]:
    """Draw every image, then move the PNGs and `grid.png` into `config.output_dir`; returns their paths.

    With several processes, each draws a contiguous share of the batches; the files move only
    once every process has drawn its share, and the main process then writes the grid.
    """
    state = state or PartialState()
    jobs = image_jobs(prompts, config)
    batches = in_batches(jobs, config.batch_size)
    # Staged beside the output folder, on its file system, so that each file's move is a rename.
    parent = os.path.dirname(os.path.abspath(config.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".generate-", dir=parent)
    try:
        with state.split_between_processes(batches) as share:
            if state.num_processes > 1:  # diffusers shows only the first process's progress bar
                logger.info("process %d of %d draws %s", state.process_index, state.num_processes,
                            describe_share(share))
            for number, batch in enumerate(share, 1):
                pipe.set_progress_bar_config(desc=f"batch {number}/{len(share)}")
                draw_batch(pipe, batch, config, edit, staging)
        state.wait_for_everyone()
        os.makedirs(config.output_dir, exist_ok=True)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(config.output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    paths = [os.path.join(config.output_dir, job.file_name) for job in jobs]
    grid = os.path.join(config.output_dir, "grid.png")
    if state.is_main_process:
        write_grid(paths, config.num_images_per_prompt, edit, grid)
    return [*paths, grid]


def describe_share(share: list[list[ImageJob]]) -> str:
    if not share:
        return "no images (fewer batches than processes)"
    first, last = share[0][0].index, share[-1][-1].index
    return f"images {first}-{last} in {len(share)} batches"


def draw_batch(pipe: LatentDiffusionPipeline, batch: list[ImageJob], config: GenerateConfig,
               edit: EditInputs | None, folder: str) -> None:
    for job, (image, metadata) in zip(batch, draw(pipe, batch, config, edit)):
        image.save(os.path.join(folder, job.file_name), pnginfo=metadata)


def draw(pipe: LatentDiffusionPipeline, batch: list[ImageJob], config: GenerateConfig,
         edit: EditInputs | None = None, on_step: Callable[[int], None] | None = None
         ) -> list[tuple[Image.Image, PngInfo]]:
    """One pipeline call: the batch's images, each with the text chunk its PNG carries. generate.py
    and the web UI (ldm/app.py) both draw through here, so the same settings give the same pixels.
    `on_step(i)` is called after each denoising step i (the web UI's progress bar)."""
    edit_args = {} if edit is None else dict(image=edit.image, mask_image=edit.mask, strength=config.strength,
                                             padding_mask_crop=config.padding_mask_crop)
    lora_args = {} if config.lora is None else dict(cross_attention_kwargs={"scale": config.lora_scale})
    step_args = {} if on_step is None else dict(callback_on_step_end=after_each_step(on_step))
    drawn = pipe([job.prompt for job in batch], negative_prompt=config.negative_prompt,
                 num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                 height=config.height, width=config.width, watermark=config.watermark, **edit_args, **lora_args,
                 **step_args,
                 # CPU generators, so a seed draws the same image on every device.
                 generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch]).images
    sampler = scheduler_name(pipe.scheduler)
    return [(image, png_metadata(config, prompt=job.prompt, seed=job.seed, scheduler=sampler, edit=edit))
            for job, image in zip(batch, drawn)]


def after_each_step(on_step: Callable[[int], None]) -> Callable:
    """`on_step(i)` as the pipeline's callback_on_step_end, leaving the latents as they are."""
    def callback(_pipe, i, _timestep, _tensors) -> dict:
        on_step(i)
        return {}
    return callback


def png_metadata(config: GenerateConfig, prompt: str, seed: int, scheduler: str,
                 edit: EditInputs | None = None) -> PngInfo:
    """Everything that made the image, in the PNG's text chunk (read back with `Image.open(path).text`);
    for an edit, the input files by name and sha256; with LoRA adapters, where they came from and their scale."""
    info = PngInfo()
    fields = dict(prompt=prompt, negative_prompt=config.negative_prompt or "", seed=seed, scheduler=scheduler,
                  num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                  height=config.height, width=config.width, model=config.model, fast=config.fast,
                  watermark=config.watermark)
    if edit is not None:
        fields.update(edit.metadata, strength=config.strength)
        if config.padding_mask_crop is not None:
            fields.update(padding_mask_crop=config.padding_mask_crop)
    if config.lora is not None:
        fields.update(lora=config.lora, lora_scale=config.lora_scale)
    if config.backend != "torch":
        fields.update(backend=config.backend)
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def write_grid(paths: list[str], images_per_prompt: int, edit: EditInputs | None, grid: str) -> None:
    """The contact sheet, from the PNGs on disk (the other processes drew theirs); for an edit, each
    row starts with the input (the mask tinted red), so the change shows beside it."""
    images = [Image.open(path).convert("RGB") for path in paths]
    if edit is not None:
        images, images_per_prompt = with_input_column(images, images_per_prompt, input_picture(edit, images[0].size))
    partial = partial_name(grid)
    contact_sheet(images, images_per_prompt).save(partial, format="PNG")
    os.replace(partial, grid)


def contact_sheet(images: list[Image.Image], columns: int) -> Image.Image:
    """All images on one sheet: a row per prompt, or a near-square grid with one image per prompt."""
    if columns == 1:
        columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def _log_to_stderr() -> None:
    """Show this package's messages (such as the prompt-truncation warning), not every library's."""
    package_logger = logging.getLogger("ldm")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def start_processes(device: torch.device) -> tuple[PartialState, torch.device]:
    """This process's place among those `accelerate launch` started (one when run directly), and
    its device: each process its own GPU. On the CPU, PartialState must be told `cpu=True`, or it
    would not join the other processes and each would draw every image."""
    state = PartialState(cpu=device.type == "cpu")
    return state, state.device if device.type == "cuda" and state.num_processes > 1 else device


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    config = parse_args(argv)
    try:
        state, device = start_processes(resolve_device(config.device))
        pipe, prompts, edit = prepare(config, device)
    except ValueError as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    paths = generate(pipe, prompts, config, edit, state)
    if state.is_main_process:
        logger.info("wrote %d images and %s", len(paths) - 1, paths[-1])
    return 0
