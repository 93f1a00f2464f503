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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.adherence import HeldOutProbe, Probe, draw, weights_in_turn  # noqa: E402
from ldm.evaluation.image_metrics import InceptionFeatures, fid, kid, to_uint8  # noqa: E402
from ldm.evaluation.likelihood import paired_difference  # noqa: E402
from tests.conftest import random_inception_file  # noqa: E402


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
    held_out = HeldOutProbe(probe)
    extractor = InceptionFeatures(args.inception_weights or random_inception_file(tempfile.mkdtemp()))
    real, reference_seconds = timed(lambda: extractor(to_uint8(held_out.pixels * 0.5 + 0.5), name="held-out"))
    label = "" if args.inception_weights else " (random Inception: plumbing, not quality)"

    print(f"`make demo` checkpoints: {len(held_out.captions)} held-out images, adherence@5 over {args.count} "
          f"training captions, guidance {args.guidance:g}, {args.steps} steps; reference features "
          f"{reference_seconds:.0f} s\n")
    print(f"| weights | held-out loss | latent bits/dim | Δ bits/dim from the row above (paired) | adherence@5 | "
          f"FID{label} | KID{label} | seconds: loss / bound / adherence / drawing for FID / FID+KID |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    previous = None
    for name, _ in weights_in_turn(probe, args.run):
        loss, loss_seconds = timed(lambda: held_out.loss(probe.pipeline))
        bound, bound_seconds = timed(lambda: held_out.bound(probe.pipeline))
        adherence, adherence_seconds = timed(lambda: probe.score(args.guidance))
        images, drawing_seconds = timed(lambda: draw(probe.pipeline, held_out.captions, args.guidance, args.steps,
                                                     probe.config.resolution))
        made, features_seconds = timed(lambda: extractor(to_uint8(images), name="generated"))
        # KID over subsets of half the images: with every image in each subset its spread would be zero.
        (distance, kernel), metric_seconds = timed(lambda: (fid(real, made), kid(real, made, made.count // 2)))
        change = "" if previous is None else "{:+.3f} ± {:.3f}".format(*paired_difference(bound, previous))
        previous = bound
        print(f"| {name} | {loss.loss:.4f} | {bound.bits_per_dim:.3f} ± {bound.standard_error:.3f} | {change} | "
              f"{adherence:.0%} | {distance.value:.2f} | {kernel.value:.4f} ± {kernel.std:.4f} | "
              f"{loss_seconds:.1f} / {bound_seconds:.1f} / {adherence_seconds:.0f} / {drawing_seconds:.0f} / "
              f"{features_seconds + metric_seconds:.0f} |", flush=True)

if __name__ == "__main__":
    main()
