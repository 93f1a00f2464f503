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
import os
import shutil
import sys
import tempfile

import torch
from accelerate import PartialState

from ldm.generation.config import GenerateConfig, parse_args
from ldm.generation.edit_inputs import EditInputs
from ldm.generation.loading import prepare, resolve_device
from ldm.generation.output import ImageJob, draw, image_jobs, in_batches, write_grid
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger(__name__)


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
