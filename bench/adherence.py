"""Prompt adherence of a trained text-to-image pipeline on its own training data.

For --count fixed training captions (evenly spaced through the training set), draw one image each,
and retrieve the 5 training images nearest to it by pixel distance. Adherence@5 is the share of
captions whose own image is among those five (chance: 5 / 3,625 ≈ 0.14% on OpenMoji). It is
measured at each guidance scale, for the final pipeline and for every checkpoint left in the run
folder (with the EMA weights saved in it), against the minutes of training each had had. Beside it
stand the run's held-out loss and latent bits/dim (ldm/evaluation/), measured on the same weights, so a
reader sees whether the cheap numbers rank the checkpoints the way adherence does.

The count is 1,000: a share near 50% over n captions has a standard error of 50/√n points, 5 over
the 100 that earlier tables used (which gave the same model 46% and, over 1,000, 53%), 1.6 over 1,000.

    .venv/bin/python bench/adherence.py --run outputs/unet-demo [--guidance 1 5] [--steps 20] [--count 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm.config import RUN_CONFIG, parse_config  # noqa: E402
from ldm.data.captions import caption_list  # noqa: E402
from ldm.data.dataset import ImageCaptionDataset, load_splits  # noqa: E402
from ldm.evaluation.denoising import held_out_loss, latent_bound, posteriors  # noqa: E402
from ldm.evaluation.held_out import HeldOutLoss  # noqa: E402
from ldm.evaluation.likelihood import LikelihoodBound  # noqa: E402
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402
from ldm.pipelines.latent_transformer import load_latent_pipeline  # noqa: E402
from ldm.training.checkpoints import complete_checkpoints  # noqa: E402
from ldm.training.unet_config import UNetConfig  # noqa: E402

PROBE_CAPTIONS = 1000  # see the docstring: the standard error is 1.6 points, not 5


def training_images(config: UNetConfig) -> tuple[torch.Tensor, list[str]]:
    """Every readable training image in [0, 1] (N×3×H×W) and its caption (the first, if several)."""
    train, _ = load_splits(config)
    dataset = ImageCaptionDataset.from_config(train, config, train=False)
    rows = [dataset[i] for i in range(len(dataset))]
    rows = [row for row in rows if not row.get("skipped")]
    pixels = torch.stack([row["pixel_values"] for row in rows]) * 0.5 + 0.5
    captions = [train[row["index"]][config.caption_column] for row in rows]
    return pixels, [c[0] if isinstance(c, list) else c for c in captions]


def adherence_at_5(images: torch.Tensor, own: list[int], references: torch.Tensor) -> float:
    """Share of images whose own reference is among their 5 nearest references (L2 on pixels)."""
    distances = torch.cdist(images.flatten(1), references.flatten(1))
    nearest = distances.topk(5, largest=False).indices
    return float(np.mean([index in row for index, row in zip(own, nearest.tolist())]))


def with_checkpoint_weights(pipeline: LatentDiffusionPipeline, checkpoint: str) -> None:
    """Load a checkpoint's EMA UNet weights (and a jointly trained text encoder's) into `pipeline`."""
    ema = torch.load(os.path.join(checkpoint, "custom_checkpoint_0.pkl"), weights_only=True)
    for parameter, averaged in zip(pipeline.denoiser.parameters(), ema["shadow_params"]):
        parameter.data.copy_(averaged)
    text_weights = os.path.join(checkpoint, "model_1.safetensors")
    if os.path.isfile(text_weights):
        pipeline.text_encoder.load_state_dict(load_file(text_weights))


@torch.no_grad()
def draw(pipeline, captions: list[str], guidance: float, steps: int, resolution: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    images = pipeline(captions, guidance_scale=guidance, num_inference_steps=steps, height=resolution,
                      width=resolution, generator=generators, output_type="pt").images
    return images.float().cpu()


class Probe:
    """The fixed captions of one run's training data, their images, and the run's pipeline."""

    def __init__(self, run: str, count: int = PROBE_CAPTIONS, steps: int = 20):
        self.config = parse_config(UNetConfig, ["--config", os.path.join(run, RUN_CONFIG)])
        self.references, captions = training_images(self.config)
        self.chosen = np.linspace(0, len(captions) - 1, count).round().astype(int).tolist()
        self.prompts = [captions[i] for i in self.chosen]
        self.steps = steps
        self.pipeline = load_latent_pipeline(run)
        self.pipeline.set_progress_bar_config(disable=True)

    def score(self, guidance: float, pipeline: LatentDiffusionPipeline | None = None,
              steps: int | None = None) -> float:
        """Adherence@5 of the run's pipeline, or of another `pipeline` drawing the same images."""
        images = draw(pipeline or self.pipeline, self.prompts, guidance, steps or self.steps, self.config.resolution)
        return adherence_at_5(images, self.chosen, self.references)


class HeldOutProbe:
    """The run's held-out split as its trainer measured it: the posteriors of its first
    --validation_loss_samples images, one caption each, and the run's noise schedule."""

    def __init__(self, probe: Probe):
        self.config = probe.config
        rows = load_splits(self.config)[1]
        rows = rows.select(range(min(self.config.validation_loss_samples, len(rows))))
        dataset = ImageCaptionDataset.from_config(rows, self.config, train=False)
        self.pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        self.captions = [caption_list(value)[0] for value in rows[self.config.caption_column]]
        self.schedule = DDPMScheduler.from_config(probe.pipeline.scheduler.config)
        self.mean, self.std = posteriors(probe.pipeline, self.pixels)  # the VAE is fixed: one encoding serves all

    def loss(self, pipeline: LatentDiffusionPipeline) -> HeldOutLoss:
        return held_out_loss(pipeline, self.schedule, self.mean, self.std, self.captions, self.config.seed,
                             self.config.loss_bins)

    def bound(self, pipeline: LatentDiffusionPipeline) -> LikelihoodBound:
        count = min(self.config.bound_samples, len(self.captions))
        return latent_bound(pipeline, self.schedule, self.mean[:count], self.captions[:count],
                            self.config.bound_strata, self.config.seed)


def weights_in_turn(probe: Probe, run: str) -> Iterator[tuple[str, float]]:
    """Load each complete checkpoint's weights into the probe's pipeline, then the final ones, and yield the
    folder's name and the minutes of training it had had."""
    pipeline = probe.pipeline
    started = os.path.getmtime(os.path.join(run, RUN_CONFIG))
    final_weights = [{k: v.clone() for k, v in model.state_dict().items()}
                     for model in (pipeline.denoiser, pipeline.text_encoder)]
    for checkpoint in complete_checkpoints(run):
        with_checkpoint_weights(pipeline, checkpoint)
        yield os.path.basename(checkpoint), (os.path.getmtime(checkpoint) - started) / 60
    pipeline.denoiser.load_state_dict(final_weights[0])  # a checkpoint may have replaced the text encoder too
    pipeline.text_encoder.load_state_dict(final_weights[1])
    yield "final", (os.path.getmtime(os.path.join(run, "model_index.json")) - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="outputs/unet-demo", help="a train_unet.py output_dir")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--count", type=int, default=PROBE_CAPTIONS)
    args = parser.parse_args()

    probe = Probe(args.run, args.count, args.steps)
    held_out = HeldOutProbe(probe)
    print(f"adherence@5 over {args.count} training captions, {len(probe.references)} training images, "
          f"{args.steps} steps, chance {5 / len(probe.references):.2%}; held-out loss and latent bits/dim over "
          f"{len(held_out.captions)} held-out images\n")
    print("| weights | training minutes | held-out loss | latent bits/dim | "
          + " | ".join(f"guidance {g:g}" for g in args.guidance) + " |")
    print("|---|---|---|---|" + "---|" * len(args.guidance))
    for name, minutes in weights_in_turn(probe, args.run):
        bound = held_out.bound(probe.pipeline)
        scores = [probe.score(g) for g in args.guidance]
        print(f"| {name} | {minutes:.1f} | {held_out.loss(probe.pipeline).loss:.4f} | {bound.bits_per_dim:.3f} ± "
              f"{bound.standard_error:.3f} | " + " | ".join(f"{s:.0%}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
