"""Invisible watermark: the 48-bit message of diffusers' SDXL pipelines, embedded in decoded images
by invisible-watermark's `dwtDct` method, and read back from image files.

    python -m ldm.watermark detect FILE...

The method, as imwatermark 0.2.0 implements it (the `EmbedMaxDct` class that diffusers'
`StableDiffusionXLWatermarker` calls): take the U channel of OpenCV's YUV of the image (float, 0-255
scale), its level-1 Haar approximation (one coefficient per 2×2 pixels), and cut that into 4×4
blocks, i.e. 8×8 pixels each. In each block, the largest-magnitude coefficient other than the first
(the carrier) is moved to a multiple of 36 plus 9 (bit 0) or plus 27 (bit 1), keeping its sign; block n, counted
row by row, carries bit n mod 48, and a reader takes a majority vote per bit. Despite the name no
DCT is computed, and only U is marked (the V channel's scale is set, but the loop stops before it).

This is our own implementation of that method, in torch, rather than a call into imwatermark:
- at run time it needs no OpenCV, whose `opencv-python` wheel (the one imwatermark declares) fails to
  import on machines without libGL.so.1; imwatermark is a test dependency only, as the reference;
- it runs on the images' device in a few tensor operations, where imwatermark loops over blocks in
  Python on a CPU copy;
- it writes imwatermark's lattice values, but mends three flaws of its embedding that keep readers
  from reading them or cost image quality, none of which concerns the decoder:
  (1) imwatermark rebuilds U with the horizontal and vertical Haar details swapped, which for Haar
      transposes every 2×2 pixel cell of U: the scattered off-colour pixels of diffusers #4014. Here
      the details are left alone.
  (2) Moving the carrier down to its lattice point can leave another coefficient of the block
      larger, and the decoder then reads that one: imwatermark's own decoder reads as few as 28 of
      the 48 bits of diffusers' marks on a 256×256 photograph. Here the carrier then goes one step
      further out.
  (3) Given an 8-bit image, as `cv2.imread` returns files, the decoder reads another coefficient in
      blocks whose carrier is negative (see `eight_bit_carrier_shift`), so detectors that read files
      found diffusers' mark in 1 of 50 generated images saved as PNG. Here that coefficient carries
      the bit too.
So imwatermark's decoder, and every detector built on it, reads our marks from float images and from
image files; bench/watermark.py measures both, and what the extra coefficient costs in PSNR.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

logger = logging.getLogger(__name__)

MESSAGE = torch.tensor(WATERMARK_BITS, dtype=torch.bool)  # Stability AI's 48 bits, as diffusers has them
MIN_WIDTH = 256  # diffusers' SDXL watermarker leaves narrower images unmarked
MIN_PIXELS = 256 * 256  # imwatermark's encoder and decoder refuse smaller images
STEP = 36.0  # imwatermark's quantisation step for the U channel
BLOCK = 8  # pixels on a side of the region that carries one bit: 4×4 Haar approximation coefficients
# A mark counts as found when at least this many of the 48 bits match. Unmarked images read as near
# random bits: 44 or more match by chance with probability 7.6e-10 (binomial tail), and 50 unmarked
# generated images read 16-33, as PNG or JPEG. Our marks read 48/48 from PNG files, and at least 45 after
# JPEG at quality 90 without chroma subsampling (bench/watermark.py), so asking for 44 costs no detection
# there (Stability AI's detection script calls 36 "very likely watermarked", for diffusers' noisier
# marks). Chroma-subsampled JPEG destroys the mark whatever the threshold.
MATCH_THRESHOLD = 44

# OpenCV's float BGR→YUV, which imwatermark works in: U = 0.492 (B − Y) + 0.5 with Y from BT.601
# weights. The 0.5 (OpenCV's chroma offset for float images, meant for a 0-1 range) sets where the
# lattice lies, so a reader must add it too.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # R, G, B
U_SCALE, U_OFFSET = 0.492, 0.5
# OpenCV's U offset for 8-bit images is 128, so an 8-bit reader's approximation coefficients (the sum of
# a 2×2 cell's U / 2) are 2 × 127.5 higher than the float ones the mark is written in.
EIGHT_BIT_OFFSET = 255.0
# OpenCV's YUV→BGR gives each unit of U: B += 2.032, G −= 0.395, R unchanged.
RGB_PER_U = (0.0, -0.395, 2.032)


# ---------------------------------------------------------------- embedding


def apply_watermark(images: torch.Tensor) -> torch.Tensor:
    """Embed the watermark in decoded images: N×3×H×W RGB in [-1, 1], as the VAE decodes them.

    Returns new images of the same dtype and device, in [-1, 1]; the input is left as it is. Images
    narrower than 256 px, or smaller than 256×256 pixels in all, are returned unchanged with a warning:
    diffusers does not mark the narrow ones, and imwatermark's decoder cannot read the small ones.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape N×3×H×W, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    problem = size_problem(height, width)
    if problem:
        logger.warning("not watermarking the images, returned unchanged: %s", problem)
        return images
    pixels = (images.float().clamp(-1, 1) + 1) * 127.5
    u = u_channel(pixels)
    change = blocks_to_pixels(lattice_shift(approximation_blocks(u)), u.shape)
    rgb_per_u = torch.tensor(RGB_PER_U, device=pixels.device).view(1, 3, 1, 1)
    marked = pixels + change.unsqueeze(1) * rgb_per_u
    return (marked / 127.5 - 1).clamp(-1, 1).to(images.dtype)


def size_problem(height: int, width: int) -> str | None:
    """Why an image of this size cannot carry the mark, or None when it can."""
    if width < MIN_WIDTH:
        return f"{width} px wide, narrower than the {MIN_WIDTH} px the mark needs"
    if height * width < MIN_PIXELS:
        return (f"{width}×{height} px, fewer than the {MIN_PIXELS:,} pixels (256×256) that imwatermark's decoder "
                "reads")
    return None


def u_channel(pixels: torch.Tensor) -> torch.Tensor:
    """U of OpenCV's float YUV (N×H×W) from N×3×H×W RGB on the 0-255 scale."""
    red, green, blue = pixels.unbind(1)
    luma = LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue
    return U_SCALE * (blue - luma) + U_OFFSET


def approximation_blocks(u: torch.Tensor) -> torch.Tensor:
    """The level-1 Haar approximation of U, cut into 4×4 blocks: N × rows × columns × 16, each block
    flattened row by row. Pixels past the last whole 8×8 block carry no bit and are left out.

    Haar's approximation coefficient of a 2×2 cell is the cell's sum / 2 (pywt.dwt2's 'haar')."""
    n, height, width = u.shape
    rows, columns = height // BLOCK, width // BLOCK
    cells = u[:, :rows * BLOCK, :columns * BLOCK].reshape(n, rows * 4, 2, columns * 4, 2).sum((2, 4)) / 2
    return cells.reshape(n, rows, 4, columns, 4).transpose(2, 3).reshape(n, rows, columns, 16)


def strongest(blocks: torch.Tensor) -> torch.Tensor:
    """Index of the coefficient that carries each block's bit: the largest in magnitude but the first
    (the first where several are equal, as numpy's argmax picks)."""
    return blocks[..., 1:].abs().argmax(-1, keepdim=True) + 1


def message_bits(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """The bit each block carries (rows × columns): block n, counted row by row, carries bit n mod 48."""
    order = torch.arange(rows * columns, device=device) % len(MESSAGE)
    return MESSAGE.to(device)[order].view(rows, columns)


def lattice_shift(blocks: torch.Tensor) -> torch.Tensor:
    """How much each approximation coefficient moves to embed the message (same shape as `blocks`):
    the carrier that imwatermark's decoder reads from the float image, then the one it reads from an
    8-bit image where that is another coefficient."""
    _, rows, columns, _ = blocks.shape
    bits = message_bits(rows, columns, blocks.device).unsqueeze(-1).float()
    shift = float_carrier_shift(blocks, bits)
    return shift + eight_bit_carrier_shift(blocks + shift, bits)


def float_carrier_shift(blocks: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The strongest coefficient c of a block goes to sign(c) · (⌊|c| / 36⌋ + 0.25 + 0.5 · bit) · 36,
    imwatermark's lattice point; one step (36) further out where that would leave another coefficient
    of the block at least as large, since a reader would then read the other one."""
    position = strongest(blocks)
    value = blocks.gather(-1, position)
    target = (torch.div(value.abs(), STEP, rounding_mode="floor") + 0.25 + 0.5 * bits) * STEP
    runner_up = blocks.abs().scatter(-1, position, 0.0)[..., 1:].amax(-1, keepdim=True)
    target = torch.where(target > runner_up, target, target + STEP)
    sign = torch.where(value >= 0, 1.0, -1.0)
    return torch.zeros_like(blocks).scatter(-1, position, sign * target - value)


def eight_bit_carrier_shift(marked: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """What else moves so that imwatermark's decoder also reads the bit from the 8-bit image (a file
    through cv2.imread, as Stability AI's detection script reads it).

    On 8-bit images OpenCV offsets U by 128 rather than 0.5, which adds 255 to every approximation
    coefficient: the decoder then reads a block's largest coefficient, not its largest in magnitude,
    with a residue 3 (255 mod 36) higher. Where the float carrier is positive it is that coefficient,
    and 9 → 12, 27 → 30 still read right. Where it is negative, the block's largest coefficient goes to
    the nearest value that reads the bit after the +255 while staying the largest, and smaller in
    magnitude than the float carrier; a block with no such value is left as it is.
    """
    position = marked[..., 1:].argmax(-1, keepdim=True) + 1
    value = marked.gather(-1, position)
    float_carrier = marked[..., 1:].abs().amax(-1, keepdim=True)
    runner_up = marked.scatter(-1, position, -torch.inf)[..., 1:].amax(-1, keepdim=True)
    residue = (0.25 + 0.5 * bits) * STEP - EIGHT_BIT_OFFSET  # (value + 255) mod 36 must be 9 or 27
    up = value + torch.remainder(residue - value, STEP)
    down = up - STEP

    def readable(target: torch.Tensor) -> torch.Tensor:
        return (target > runner_up) & (target.abs() < float_carrier)

    target = torch.where(readable(up), up, value)
    target = torch.where(readable(down) & ((value - down < up - value) | ~readable(up)), down, target)
    elsewhere = position != strongest(marked)
    return torch.zeros_like(marked).scatter(-1, position, torch.where(elsewhere, target - value, 0.0))


def blocks_to_pixels(shift: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The change of U (N×H×W) that moves the approximation coefficients by `shift`: each of a cell's
    four pixels moves by half its coefficient's shift (the inverse Haar transform, details unchanged)."""
    n, rows, columns, _ = shift.shape
    cells = shift.reshape(n, rows, columns, 4, 4).transpose(2, 3).reshape(n, rows * 4, columns * 4)
    change = torch.zeros(shape, device=shift.device)
    change[:, :rows * BLOCK, :columns * BLOCK] = cells.repeat_interleave(2, 1).repeat_interleave(2, 2) / 2
    return change


# ---------------------------------------------------------------- detection


def read_watermark(image: PIL.Image.Image | str | os.PathLike) -> list[int]:
    """The 48 bits an image (a PIL image or a file) holds where the watermark would be, as imwatermark's
    decoder reads them from the float image: a majority vote over the blocks of each bit, a tie
    reading 1.

    Reads in the lattice the mark was written in, i.e. with OpenCV's float chroma offset even for an
    8-bit file. (imwatermark's decoder given the 8-bit array, as `cv2.imread` returns files, reads with
    OpenCV's 8-bit offset instead: our marks carry the bits for that reading too, diffusers' only in
    blocks whose carrier is positive.) Raises ValueError for an image too small to carry the mark.
    """
    pixels = to_pixels(image)
    problem = size_problem(*pixels.shape[-2:])
    if problem:
        raise ValueError(f"the image cannot carry the watermark: {problem}")
    blocks = approximation_blocks(u_channel(pixels))[0]
    value = blocks.gather(-1, strongest(blocks)).squeeze(-1)
    ones = (torch.remainder(value.abs(), STEP) > STEP / 2).flatten().float()
    bit = torch.arange(ones.numel()) % len(MESSAGE)
    votes = torch.zeros(len(MESSAGE)).index_add_(0, bit, ones)
    voters = torch.bincount(bit, minlength=len(MESSAGE))
    return (votes * 255 > 127 * voters).int().tolist()  # imwatermark's rule: mean vote × 255 > 127


def matched_bits(image: PIL.Image.Image | str | os.PathLike) -> int:
    """How many of the 48 bits read from `image` equal the watermark's."""
    return sum(int(read == bit) for read, bit in zip(read_watermark(image), WATERMARK_BITS))


def is_marked(image: PIL.Image.Image | str | os.PathLike) -> bool:
    """Whether the image carries the watermark: at least MATCH_THRESHOLD of 48 bits match. An image too
    small to carry it is not marked."""
    try:
        return matched_bits(image) >= MATCH_THRESHOLD
    except ValueError:
        return False


def to_pixels(image: PIL.Image.Image | str | os.PathLike) -> torch.Tensor:
    """1×3×H×W float RGB on the 0-255 scale, from a PIL image or an image file."""
    if not isinstance(image, PIL.Image.Image):
        with PIL.Image.open(image) as opened:
            return to_pixels(opened.convert("RGB"))
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


# ---------------------------------------------------------------- command line


def detect(path: str) -> str:
    """The command's line for one file; raises OSError when it cannot be read as an image."""
    try:
        with PIL.Image.open(path) as opened:
            image = opened.convert("RGB")
    except PIL.Image.DecompressionBombError as error:
        raise OSError(str(error)) from None
    problem = size_problem(image.height, image.width)
    if problem:
        return f"{path}: not marked ({problem})"
    matched = matched_bits(image)
    verdict = "marked" if matched >= MATCH_THRESHOLD else "not marked"
    return f"{path}: {verdict} ({matched}/{len(MESSAGE)} bits match)"
