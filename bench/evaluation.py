"""The `make demo` run's checkpoints measured every way the project can: held-out loss, latent bits/dim
with its standard error, adherence@5 over 1,000 training captions, and FID and KID, with the seconds
each took.

FID and KID use an Inception with random weights (the tests' file: the real one cannot be downloaded
here), so they are plumbing, not quality: they show what the metrics cost and that they run on these
checkpoints. With `--inception_weights` pointing at torch-fidelity's real file, the same command gives
real numbers.

    .venv/bin/python bench/evaluation.py --run outputs/unet-demo [--inception_weights PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.adherence import Probe, draw, with_checkpoint_weights  # noqa: E402
from ldm.data.captions import caption_list  # noqa: E402
from ldm.data.dataset import ImageCaptionDataset, load_splits  # noqa: E402
from ldm.evaluation.denoising import held_out_loss, latent_bound, posteriors  # noqa: E402
from ldm.evaluation.image_metrics import InceptionFeatures, fid, kid, to_uint8  # noqa: E402
from ldm.training.checkpoints import complete_checkpoints  # noqa: E402
from tests.conftest import random_inception_file  # noqa: E402


def held_out_images(probe: Probe) -> tuple[torch.Tensor, list[str]]:
    """The run's held-out split, as the trainer measured it: pixels in [-1, 1] and one caption each."""
    rows = load_splits(probe.config)[1]
    rows = rows.select(range(min(probe.config.validation_loss_samples, len(rows))))
    dataset = ImageCaptionDataset.from_config(rows, probe.config, train=False)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    return pixels, [caption_list(value)[0] for value in rows[probe.config.caption_column]]


def timed(work):
    start = time.perf_counter()
    value = work()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="outputs/unet-demo", help="a train_unet.py output_dir")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--count", type=int, default=1000, help="training captions for adherence@5")
    parser.add_argument("--inception_weights", default=None, help="default: random weights (plumbing only)")
    args = parser.parse_args()

    probe = Probe(args.run, args.count, args.steps)
    pipeline = probe.pipeline
    final = [{k: v.clone() for k, v in model.state_dict().items()} for model in (pipeline.unet, pipeline.text_encoder)]
    schedule = DDPMScheduler.from_config(pipeline.scheduler.config)
    pixels, captions = held_out_images(probe)
    mean, std = posteriors(pipeline, pixels)
    weights = args.inception_weights or random_inception_file(tempfile.mkdtemp())
    extractor = InceptionFeatures(weights)
    real, reference_seconds = timed(lambda: extractor(to_uint8(pixels * 0.5 + 0.5), name="held-out"))
    label = "" if args.inception_weights else " (random Inception: plumbing, not quality)"

    print(f"`make demo` checkpoints: {len(captions)} held-out images, adherence@5 over {args.count} training "
          f"captions, guidance {args.guidance:g}, {args.steps} steps; reference features {reference_seconds:.0f} s\n")
    print(f"| weights | held-out loss | latent bits/dim | adherence@5 | FID{label} | KID{label} | seconds: loss / "
          "bound / adherence / drawing for FID / FID+KID |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for folder in [*complete_checkpoints(args.run), args.run]:
        if folder == args.run:
            pipeline.unet.load_state_dict(final[0])
            pipeline.text_encoder.load_state_dict(final[1])
        else:
            with_checkpoint_weights(pipeline, folder)
        loss, loss_seconds = timed(lambda: held_out_loss(pipeline, schedule, mean, std, captions, probe.config.seed,
                                                         probe.config.loss_bins))
        count = min(probe.config.bound_samples, len(captions))
        bound, bound_seconds = timed(lambda: latent_bound(pipeline, schedule, mean[:count], captions[:count],
                                                          probe.config.bound_strata, probe.config.seed))
        adherence, adherence_seconds = timed(lambda: probe.score(args.guidance))
        images, drawing_seconds = timed(lambda: draw(pipeline, captions, args.guidance, args.steps,
                                                     probe.config.resolution))
        (distance, kernel), metric_seconds = timed(lambda: (lambda made: (fid(real, made), kid(real, made)))(
            extractor(to_uint8(images), name="generated")))
        print(f"| {os.path.basename(os.path.normpath(folder))} | {loss.loss:.4f} | {bound.bits_per_dim:.3f} ± "
              f"{bound.standard_error:.3f} | {adherence:.0%} | {distance.value:.2f} | {kernel.value:.4f} ± "
              f"{kernel.std:.4f} | {loss_seconds:.1f} / {bound_seconds:.1f} / {adherence_seconds:.0f} / "
              f"{drawing_seconds:.0f} / {metric_seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
