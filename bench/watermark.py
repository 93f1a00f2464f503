"""Invisible watermark on generated images: how often the mark is found once the images are saved as
PNG and as JPEG, and how often it is "found" in the same images unmarked.

    .venv/bin/python bench/watermark.py [--model outputs/unet-demo] [--num_images 50] [--resolution 256] \
        [--steps 20]

The images (the demo prompts in turn, image i from seed i) are generated once, decoded, and then kept
three ways: unmarked; marked by ldm.pipelines.watermark.apply_watermark, the step between decode and
postprocessing that the pipeline runs for `watermark=True` (called here directly, so that each marked
image has its unmarked twin); and marked by diffusers' StableDiffusionXLWatermarker (through
imwatermark), for comparison. Each is saved as PNG and as JPEG at quality 90, with Pillow's default
4:2:0 chroma subsampling and without it (4:4:4), and read by two readers: ldm.watermark, and
imwatermark's decoder given the 8-bit BGR array that `cv2.imread` returns, as detectors built on it
(Stability AI's detection script) read files. Prints a markdown table; "found" means at least 44 of
the 48 bits match (ldm.watermark.MATCH_THRESHOLD), and PSNR compares each marked PNG with its twin.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker
from imwatermark import WatermarkDecoder
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402
from ldm.pipelines.watermark import MATCH_THRESHOLD, MESSAGE, apply_watermark, matched_bits  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_prompts.txt")
SAVED_AS = {"PNG": dict(format="PNG"),
            "JPEG 90, 4:2:0": dict(format="JPEG", quality=90),  # Pillow's default subsampling at this quality
            "JPEG 90, 4:4:4": dict(format="JPEG", quality=90, subsampling=0)}


def generate(model: str, count: int, resolution: int, steps: int, batch: int = 5) -> torch.Tensor:
    """`count` decoded images (N×3×H×W in [-1, 1]) for the demo prompts in turn, image i from seed i."""
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with open(PROMPTS) as file:
        prompts = [line.strip() for line in file if line.strip()]
    decoded = []
    for start in tqdm(range(0, count, batch), desc="generating", unit="batch"):
        indices = range(start, min(start + batch, count))
        latents = pipe([prompts[i % len(prompts)] for i in indices], num_inference_steps=steps, height=resolution,
                       width=resolution, generator=[torch.Generator().manual_seed(i) for i in indices],
                       output_type="latent").images
        with torch.inference_mode():
            decoded.append(pipe.decode_latents(latents).float().clamp(-1, 1))
    return torch.cat(decoded)


def to_8bit(images: torch.Tensor) -> list[PIL.Image.Image]:
    """What the pipeline's postprocessing makes of decoded images: 8-bit RGB, rounded."""
    array = ((images.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return [PIL.Image.fromarray(image) for image in array]


def saved(image: PIL.Image.Image, options: dict) -> PIL.Image.Image:
    """The image as read back from a file written with `options`."""
    buffer = io.BytesIO()
    image.save(buffer, **options)
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def imwatermark_matches(image: PIL.Image.Image, decoder: WatermarkDecoder) -> int:
    """Matched bits by imwatermark's decoder on the 8-bit BGR array that cv2.imread would return."""
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    return int((np.asarray(decoder.decode(bgr, "dwtDct")) == MESSAGE.numpy()).sum())


def psnr(first: PIL.Image.Image, second: PIL.Image.Image) -> float:
    error = np.mean((np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/unet-demo", help="a pipeline folder (model_index.json)")
    parser.add_argument("--num_images", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=256, help="at least 256: narrower images are not marked")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    images = generate(args.model, args.num_images, args.resolution, args.steps)
    minutes = (time.perf_counter() - start) / 60
    versions = {"ours": to_8bit(apply_watermark(images)),
                "diffusers": to_8bit(StableDiffusionXLWatermarker().apply_watermark(images)),
                "none": to_8bit(images)}
    decoder = WatermarkDecoder("bits", len(MESSAGE))
    readers = {"ldm.watermark": matched_bits, "imwatermark, 8-bit": lambda image: imwatermark_matches(image, decoder)}

    print(f"\n{args.num_images} images of {args.resolution}×{args.resolution} px from {args.model}, {args.steps} "
          f"steps ({minutes:.1f} min to generate). Found: at least {MATCH_THRESHOLD} of {len(MESSAGE)} bits match.\n")
    print("| mark | saved as | read by | found | bits matched: min / median / max | PSNR vs unmarked (dB) |")
    print("|---|---|---|---:|---|---:|")
    for mark, marked in versions.items():
        quality = (f"{statistics.median(psnr(a, b) for a, b in zip(marked, versions['none'])):.1f}"
                   if mark != "none" else "–")
        for saved_as, options in SAVED_AS.items():
            files = [saved(image, options) for image in marked]
            for reader, read in readers.items():
                matches = [read(image) for image in files]
                found = sum(match >= MATCH_THRESHOLD for match in matches)
                print(f"| {mark} | {saved_as} | {reader} | {found}/{len(matches)} | {min(matches)} / "
                      f"{statistics.median(matches):g} / {max(matches)} | {quality if saved_as == 'PNG' else ''} |")


if __name__ == "__main__":
    main()
