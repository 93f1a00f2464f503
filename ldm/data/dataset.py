"""Image-caption data through 🤗 datasets: the built-in OpenMoji, a Hub id, or an imagefolder.

Images are decoded here rather than by `datasets`, so an unreadable file becomes a skipped row
(counted, reported) instead of an exception that ends the run.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.exceptions import DatasetGenerationError
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps

from ldm.config import ConfigError
from ldm.data.captions import pick_caption
from ldm.data.config import DataConfig
from ldm.data.openmoji import load_openmoji

VALIDATION_SPLITS = ("validation", "valid", "val", "test")
SPLIT_SEED = 1234  # fixed, so the held-out rows stay the same across runs and machines


def load_splits(config: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The (train, validation) datasets, with image decoding turned off and columns checked."""
    if config.dataset_name == "openmoji" and config.train_data_dir is None:
        raw = load_openmoji(config.resolution, config.cache_dir)
    else:
        raw = read_dataset(config)
    train, validation = split(raw, config.validation_fraction)
    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    return tuple(undecoded(part, config) for part in (train, validation))


def read_dataset(config: DataConfig) -> datasets.DatasetDict:
    """An imagefolder (`train_data_dir`) or a Hub / local dataset (`dataset_name`). A metadata file
    that Arrow cannot read as columns of one type each stops here with its reason, not a traceback."""
    source = config.train_data_dir or config.dataset_name
    try:
        if config.train_data_dir is not None:
            return datasets.load_dataset("imagefolder", data_dir=config.train_data_dir, cache_dir=config.cache_dir)
        return datasets.load_dataset(config.dataset_name, config.dataset_config_name, cache_dir=config.cache_dir)
    except (DatasetGenerationError, pa.ArrowInvalid, pa.ArrowTypeError) as error:
        cause = error.__cause__ or error
        raise ConfigError(f"the dataset in {source} cannot be read: {cause}. Each column must hold one type in "
                          "every row (write a numeric caption as a string, \"42\", or leave it null)") from error


def train_split(raw: datasets.DatasetDict | datasets.IterableDatasetDict):
    if "train" not in raw:
        raise ConfigError(f"the dataset has no 'train' split; it has: {', '.join(raw)}")
    return raw["train"]


def split(raw: datasets.DatasetDict, validation_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = train_split(raw)
    held_out = next((name for name in VALIDATION_SPLITS if name in raw), None)
    if held_out is not None:
        return train, raw[held_out]
    if validation_fraction == 0 or len(train) < 2:
        return train, train.select([])
    parts = train.train_test_split(test_size=validation_fraction, seed=SPLIT_SEED, shuffle=True)
    return parts["train"], parts["test"]


def require_columns(column_names: list[str], config: DataConfig) -> None:
    for key, column in (("image_column", config.image_column), ("caption_column", config.caption_column)):
        if column not in column_names:
            raise ConfigError(f"{key} {column!r} is not in the dataset; its columns are: {', '.join(column_names)}")


def require_image_feature(feature, config: DataConfig) -> None:
    """An image column holds images, paths or bytes; a column of numbers (an id) is a wrong --image_column."""
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string", "binary",
                                                                      "large_binary"):
        raise ConfigError(f"image_column {config.image_column!r} holds {feature.dtype} values, not images, paths "
                          "or bytes; point image_column at the column that holds the images")


def undecoded(dataset: datasets.Dataset, config: DataConfig) -> datasets.Dataset:
    """Check both columns exist, and keep images as bytes/paths so we decode them ourselves."""
    require_columns(dataset.column_names, config)
    require_image_feature(dataset.features[config.image_column], config)
    if isinstance(dataset.features[config.image_column], datasets.Image):
        dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
    return dataset


def open_rgb(image) -> Image.Image:
    """Decode any stored image (bytes, path or PIL) to RGB, compositing transparency on white.

    Raises OSError (or ValueError) for unreadable, truncated or empty files.
    """
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if not isinstance(image, (str, bytes, io.BytesIO, Image.Image)):
        raise ValueError(f"{image!r} is not an image, a path or bytes")
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    if isinstance(image, str) and "://" in image:  # a streamed dataset's file: hf://, https://, s3://, ...
        with xopen(image, "rb") as remote:
            image = io.BytesIO(remote.read())
    picture = image if isinstance(image, Image.Image) else Image.open(image)
    picture.load()  # decode now: a truncated file fails here, not later in a worker
    picture = ImageOps.exif_transpose(picture)
    return to_rgb(picture)


def to_rgb(picture: Image.Image) -> Image.Image:
    if picture.mode.startswith("I") or picture.mode == "F":
        # 16- and 32-bit greys: PIL's convert clips at 255, which turns them white. Rescale instead.
        values = np.asarray(picture, dtype=np.float64)
        peak = 65535.0 if values.max() > 255 else 255.0
        picture = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture.convert("RGB")


@dataclass
class ImageTransform:
    """Resize the short side, crop square, optionally flip, scale to [-1, 1] (CHW float)."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, picture: Image.Image, rng: random.Random | None = None,
                 flip: bool | None = None) -> torch.Tensor:
        """`rng` draws the random crop and flip; `flip` forces the flip either way."""
        rng = rng or random.Random(0)
        scale = self.resolution / min(picture.size)
        size = (max(self.resolution, round(picture.width * scale)), max(self.resolution, round(picture.height * scale)))
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.BICUBIC)
        picture = picture.crop(self.crop_box(picture.size, rng))
        if flip if flip is not None else (self.random_flip and rng.random() < 0.5):
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def crop_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
        return left, top, left + self.resolution, top + self.resolution


def row_random(seed: int, epoch: int, index: int) -> random.Random:
    """The random choices for one row in one epoch (crop, flip, caption), from (seed, epoch, row)
    alone. Drawing them from the global RNG instead would tie them to the order rows are fetched
    in, which a resumed run (it skips seen batches unfetched) or a prefetching loader changes."""
    return random.Random(f"{seed}/{epoch}/{index}")


class EpochDataset(torch.utils.data.Dataset):
    """A dataset whose random choices depend on the epoch; trainers call `set_epoch` each epoch.
    (Loaders must not keep persistent workers, whose copies would not see the new epoch.)"""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def random_for(self, index: int) -> random.Random:
        return row_random(self.seed, self.epoch, index)


class ImageCaptionDataset(EpochDataset):
    """Rows of {'pixel_values', 'caption', 'index'}, or {'index', 'skipped'} for an unreadable image."""

    def __init__(self, rows: datasets.Dataset, image_column: str, caption_column: str, transform: ImageTransform,
                 seed: int = 0):
        self.rows, self.transform, self.seed = rows, transform, seed
        self.image_column, self.caption_column = image_column, caption_column

    @classmethod
    def from_config(cls, rows: datasets.Dataset, config: DataConfig, train: bool = True,
                    seed: int = 0) -> "ImageCaptionDataset":
        """Training rows get the configured random crop and flip; others are center-cropped."""
        transform = ImageTransform(config.resolution, center_crop=config.center_crop or not train,
                                   random_flip=config.random_flip and train)
        return cls(rows, config.image_column, config.caption_column, transform, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Rows fetched in one Arrow gather: fetching them one by one through datasets costs more
        than decoding a small image."""
        rows = self.rows[indices]
        return [self.prepare(image, caption, index)
                for image, caption, index in zip(rows[self.image_column], rows[self.caption_column], indices)]

    def prepare(self, image, caption, index) -> dict:
        """One row's training example, its random choices drawn from (seed, epoch, `index`)."""
        try:
            picture = open_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's errors for damaged files
            return {"index": index, "skipped": True}
        rng = self.random_for(index)
        return {"index": index, "pixel_values": self.transform(picture, rng), "caption": pick_caption(caption, rng)}


def collate(rows: list[dict]) -> dict:
    """Stack the readable rows; report the indices of skipped ones so the trainer can count them."""
    good = [row for row in rows if not row.get("skipped")]
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in good]) if good else torch.empty(0),
        "captions": [row["caption"] for row in good],
        "indices": [row["index"] for row in good],
        "skipped": [row["index"] for row in rows if row.get("skipped")],
    }


class SkipCounter:
    """Distinct rows that could not be read, over a whole run."""

    def __init__(self):
        self.rows: set[int] = set()

    def update(self, batch: dict) -> None:
        self.rows.update(batch["skipped"])

    def report(self) -> str:
        return f"skipped {len(self.rows)} unreadable image(s)" + (
            f" (rows {sorted(self.rows)[:20]})" if self.rows else "")


def dataloader(dataset: ImageCaptionDataset, batch_size: int, shuffle: bool, num_workers: int = 0,
               drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                       num_workers=num_workers, drop_last=drop_last)

