"""ldm.watermark against the reference: imwatermark's decoder (what diffusers' SDXL marks are read with)
reads our marks bit for bit, and the values we write are those diffusers' StableDiffusionXLWatermarker
writes, checked with OpenCV and PyWavelets as imwatermark computes them.

The images are 256×256 crops of photographs that scikit-image ships: smooth sky, skin, texture and
saturated regions, where a flat test image would hide most of what can go wrong."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import pywt
import skimage.data
import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS, StableDiffusionXLWatermarker
from imwatermark import WatermarkDecoder
from PIL import Image

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.watermark import MATCH_THRESHOLD, apply_watermark, is_marked, matched_bits, read_watermark
from ldm.watermark import main
from tests.conftest import TINY_VAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOGRAPHS = {  # name → 256×256 RGB crop
    "astronaut": lambda: np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.LANCZOS)),
    "coffee": lambda: skimage.data.coffee()[72:328, 172:428],  # diffusers' own mark loses 9 bits here
    "rocket": lambda: skimage.data.rocket()[100:356, 200:456],  # and 20 here, in the smooth sky
}


def as_decoded(rgb: np.ndarray) -> torch.Tensor:
    """An 8-bit H×W×3 image as the VAE decodes images: 1×3×H×W in [-1, 1]."""
    return torch.tensor(rgb).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1


def as_8bit(images: torch.Tensor) -> Image.Image:
    return Image.fromarray(((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


def as_bgr(images: torch.Tensor) -> np.ndarray:
    """The float BGR array (0-255) that diffusers hands imwatermark."""
    return np.ascontiguousarray(((images[0].permute(1, 2, 0).numpy() + 1) * 127.5)[:, :, ::-1], dtype=np.float32)


def reference_u(images: torch.Tensor) -> np.ndarray:
    """U of the image as imwatermark computes it: OpenCV's float BGR→YUV."""
    return cv2.cvtColor(as_bgr(images), cv2.COLOR_BGR2YUV)[:, :, 1]


def reference_blocks(images: torch.Tensor) -> np.ndarray:
    """pywt's Haar approximation of U in imwatermark's 4×4 blocks: rows × columns × 16."""
    approximation, _ = pywt.dwt2(reference_u(images), "haar")
    rows, columns = approximation.shape[0] // 4, approximation.shape[1] // 4
    return approximation.reshape(rows, 4, columns, 4).transpose(0, 2, 1, 3).reshape(rows, columns, 16)


def clipped_blocks(*images: torch.Tensor) -> np.ndarray:
    """Which 8×8 blocks have a pixel at either end of the range in any of `images` (rows × columns)."""
    clipped = torch.stack([image[0].abs() >= 1 for image in images]).any(0).any(0).float()
    return (torch.nn.functional.max_pool2d(clipped[None], 8)[0] > 0).numpy()


@pytest.fixture(scope="module", params=sorted(PHOTOGRAPHS))
def photograph(request) -> np.ndarray:
    return PHOTOGRAPHS[request.param]()


def test_imwatermark_reads_every_bit_of_our_mark(photograph):
    marked = apply_watermark(as_decoded(photograph))
    decoded = WatermarkDecoder("bits", 48).decode(as_bgr(marked), "dwtDct")
    assert [int(bit) for bit in decoded] == WATERMARK_BITS


def test_our_reader_finds_the_mark_in_an_8_bit_png(photograph, tmp_path):
    path = tmp_path / "marked.png"
    as_8bit(apply_watermark(as_decoded(photograph))).save(path)
    assert read_watermark(path) == WATERMARK_BITS
    assert matched_bits(Image.open(path)) == 48
    assert is_marked(path)


def test_imwatermark_reads_our_mark_from_a_png_file_as_detectors_do(photograph, tmp_path):
    """Stability AI's detection script reads files with cv2.imread: 8-bit BGR, which OpenCV converts to
    YUV with another chroma offset than the float image the mark is written in."""
    path = str(tmp_path / "marked.png")
    as_8bit(apply_watermark(as_decoded(photograph))).save(path)
    decoded = WatermarkDecoder("bits", 48).decode(cv2.imread(path), "dwtDct")
    assert [int(bit) for bit in decoded] == WATERMARK_BITS


def test_we_write_diffusers_lattice_values(photograph):
    """Block by block, ours and diffusers' marks hold the same coefficients, but for two: the carrier,
    which ours moves one step (36) further out where diffusers' would not stay the largest, and, where
    the carrier is negative, the block's largest coefficient, which 8-bit readers read instead.

    Compared where the original's carrier is clear (implementations may break a near tie apart
    differently, and both marks are then valid) and where neither output clips (clipping after
    diffusers' 2×2 chroma transposition alters the coefficients)."""
    original = as_decoded(photograph)
    ours, diffusers = apply_watermark(original), StableDiffusionXLWatermarker().apply_watermark(original)
    before, after, reference = reference_blocks(original), reference_blocks(ours), reference_blocks(diffusers)
    magnitudes = np.sort(np.abs(before[..., 1:]), axis=-1)
    compared = (magnitudes[..., -1] - magnitudes[..., -2] > 0.5) & ~clipped_blocks(ours, diffusers)
    assert compared.sum() > 200  # of 1,024
    before, after, reference = before[compared], after[compared], reference[compared]
    carrier = np.abs(before[:, 1:]).argmax(-1)[:, None] + 1

    further_out = np.abs(np.take_along_axis(after, carrier, -1)) - np.abs(np.take_along_axis(reference, carrier, -1))
    one_step = np.abs(further_out - 36) < 0.1
    assert np.all((np.abs(further_out) < 0.1) | one_step)
    assert one_step.any() and not one_step.all()

    difference = np.abs(after - reference)
    np.put_along_axis(difference, carrier, 0, -1)
    changed = difference > 0.1
    negative = np.take_along_axis(after, carrier, -1)[:, 0] < 0
    assert not changed[~negative].any()
    moved, largest = changed[negative], after[negative, 1:].argmax(-1) + 1
    assert moved.any() and np.all(moved.sum(-1) <= 1)
    assert np.all(moved.argmax(-1)[moved.any(-1)] == largest[moved.any(-1)])


def test_the_mark_leaves_the_haar_details_alone(photograph):
    """U changes by one value per 2×2 cell, so the Haar details keep the image's chroma edges, where
    diffusers' mark transposes every 2×2 cell of U (imwatermark rebuilds it with the horizontal and
    vertical details swapped): the scattered off-colour pixels of diffusers #4014."""
    original = as_decoded(photograph)
    ours, diffusers = apply_watermark(original), StableDiffusionXLWatermarker().apply_watermark(original)
    unclipped = ~np.kron(clipped_blocks(ours, diffusers), np.ones((8, 8), dtype=bool))
    _, details_before = pywt.dwt2(reference_u(original), "haar")
    for marked, kept in ((ours, True), (diffusers, False)):
        _, details = pywt.dwt2(reference_u(marked), "haar")
        change = max(np.abs(a - b)[unclipped[::2, ::2]].max() for a, b in zip(details, details_before))
        assert (change < 0.1) == kept, change


def test_images_narrower_than_256_px_are_left_unmarked_with_a_warning(caplog):
    narrow, small = torch.rand(1, 3, 512, 128) * 2 - 1, torch.rand(2, 3, 128, 256) * 2 - 1
    with caplog.at_level(logging.WARNING, logger="ldm.pipelines.watermark"):
        assert apply_watermark(narrow) is narrow
    assert "128 px wide, narrower than the 256 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.pipelines.watermark"):
        assert apply_watermark(small) is small  # imwatermark's decoder refuses under 256×256 pixels
    assert "256×128 px, fewer than the 65,536 pixels" in caplog.text


def test_marking_keeps_dtype_device_and_range_and_leaves_the_input_alone():
    images = torch.rand(2, 3, 256, 320, dtype=torch.bfloat16) * 2 - 1
    copy = images.clone()
    marked = apply_watermark(images)
    assert marked.dtype == torch.bfloat16 and marked.device == images.device and marked.shape == images.shape
    assert marked.min() >= -1 and marked.max() <= 1 and not torch.equal(marked, images)
    assert torch.equal(images, copy)
    with pytest.raises(ValueError, match="N×3×H×W"):
        apply_watermark(images[0])


def test_unmarked_images_are_not_marked(photograph):
    assert matched_bits(Image.fromarray(photograph)) < MATCH_THRESHOLD - 10
    assert not is_marked(Image.fromarray(photograph))
    gray = Image.new("RGB", (256, 256), (128, 128, 128))
    assert matched_bits(gray) == WATERMARK_BITS.count(0)  # every block reads 0
    assert not is_marked(Image.new("RGB", (128, 512)))  # too narrow to carry the mark
    with pytest.raises(ValueError, match="128 px wide"):
        read_watermark(Image.new("RGB", (128, 512)))


def test_detect_command(tmp_path, capsys):
    rocket = PHOTOGRAPHS["rocket"]()
    marked, plain, missing, text = (str(tmp_path / name) for name in ("marked.png", "plain.png", "gone.png", "a.png"))
    as_8bit(apply_watermark(as_decoded(rocket))).save(marked)
    Image.fromarray(rocket).save(plain)
    with open(text, "w") as file:
        file.write("not an image")

    run = subprocess.run([sys.executable, "-m", "ldm.watermark", "detect", marked, plain], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"{marked}: marked (48/48 bits match)"
    assert lines[1].startswith(f"{plain}: not marked (") and len(lines) == 2

    run = subprocess.run([sys.executable, "-m", "ldm.watermark", "detect", missing, marked], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"cannot read {missing}: No such file or directory" in run.stderr
    assert run.stdout == f"{marked}: marked (48/48 bits match)\n"  # the other files are still read

    assert main(["detect", text]) == 2
    assert f"cannot read {text}: cannot identify image file" in capsys.readouterr().err


# ---------------------------------------------------------------- in the pipeline and generate.py


@pytest.fixture
def tiny_pipe(tiny_components):
    """The tiny pipeline with an f = 8 VAE, so that 256 px images are 32×32 latents: at the usual f = 2,
    the UNet's self-attention over 128×128 latents takes half a minute."""
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(dict(TINY_VAE, down_block_types=["DownEncoderBlock2D"] * 4,
                                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16]))
    pipe = LatentDiffusionPipeline(**dict(tiny_components, vae=vae.eval()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_marks_decoded_images_when_asked(tiny_pipe):
    args = dict(prompt="red heart", num_inference_steps=2, height=256, width=256, num_images_per_prompt=2)
    marked = tiny_pipe(**args, watermark=True, generator=torch.Generator().manual_seed(0)).images
    plain = tiny_pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert all(is_marked(image) for image in marked)
    assert not any(is_marked(image) for image in plain)
    # the mark is small: the images are otherwise the same draw
    assert np.abs(np.asarray(marked[0], float) - np.asarray(plain[0], float)).mean() < 3
    with pytest.raises(ValueError, match="output_type 'latent' decodes none"):
        tiny_pipe(**args, watermark=True, output_type="latent")


def test_an_inpainted_crop_is_marked_after_it_is_pasted_back(tiny_pipe):
    image = Image.fromarray(PHOTOGRAPHS["coffee"]())
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (100, 100, 140, 130))
    drawn = tiny_pipe("red heart", image=image, mask_image=mask, padding_mask_crop=4, num_inference_steps=2,
                      watermark=True, generator=torch.Generator().manual_seed(0)).images[0]
    assert drawn.size == (256, 256) and is_marked(drawn)


def test_generate_py_marks_its_pngs_and_says_so_in_them(tiny_pipe, tmp_path, caplog):
    from ldm.generate import main as generate_main
    tiny_pipe.save_pretrained(tmp_path / "pipeline")
    common = ["--model", str(tmp_path / "pipeline"), "--prompt", "red heart", "--num_inference_steps", "2",
              "--watermark"]
    assert generate_main([*common, "--height", "256", "--width", "256", "--output_dir", str(tmp_path / "big")]) == 0
    png = tmp_path / "big" / "0000-red-heart-seed0.png"
    assert Image.open(png).text["watermark"] == "True" and is_marked(png)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert generate_main([*common, "--output_dir", str(tmp_path / "small")]) == 0  # the model's 64 px
    assert caplog.text.count("the images will be written unmarked: 64 px wide") == 1
    assert Image.open(tmp_path / "small" / "0000-red-heart-seed0.png").text["watermark"] == "False"
