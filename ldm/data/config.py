"""Where image-caption pairs come from, how images are prepared, and the on-disk caches' settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ldm.config import ConfigError, require


@dataclass
class DataConfig:
    """Where image-caption pairs come from and how images are prepared."""

    dataset_name: str = field(default="openmoji", metadata={
        "help": "'openmoji' (built in), a Hub dataset id, or a local dataset folder or repository"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "the Hub dataset's configuration"})
    train_data_dir: Optional[str] = field(default=None, metadata={
        "help": "an imagefolder with metadata.jsonl or metadata.csv; overrides dataset_name"})
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = field(default=32, metadata={"help": "images are resized and cropped to this square size"})
    center_crop: bool = field(default=True, metadata={"help": "center crop; --center_crop false crops at random"})
    random_flip: bool = field(default=False, metadata={"help": "flip images horizontally at random"})
    validation_fraction: float = field(default=0.05, metadata={
        "help": "held-out share when the dataset has no validation split"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "truncate the training set (debugging)"})
    dataloader_num_workers: int = 0
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where built datasets and caches live; default $LDM_CACHE or ~/.cache/ldm"})

    def validate(self) -> None:
        require(self.resolution > 0, "resolution", self.resolution, "a positive number of pixels")
        require(0 <= self.validation_fraction < 1, "validation_fraction", self.validation_fraction,
                "a fraction in [0, 1)")
        require(self.max_train_samples is None or self.max_train_samples > 0, "max_train_samples",
                self.max_train_samples, "a positive count or null")
        require(self.dataloader_num_workers >= 0, "dataloader_num_workers", self.dataloader_num_workers,
                "0 or more")
        if self.train_data_dir is not None and not os.path.isdir(self.train_data_dir):
            raise ConfigError(f"train_data_dir {self.train_data_dir!r} is not a folder")



@dataclass
class CacheConfig:
    """The on-disk latent and text caches (ldm/data/caches.py) that train_unet.py and distill.py read."""

    cache_dtype: Literal["float16", "float32"] = field(default="float16", metadata={
        "help": "storage dtype of the caches; float16 halves disk and reads"})
    cache_chunk_rows: int = field(default=1024, metadata={
        "help": "source rows per cache file; a killed build re-encodes at most one per process"})
    cache_batch_size: int = field(default=64, metadata={
        "help": "images per VAE call while building the latent cache (lower it if the encoder runs out of memory)"})

    def validate_cache(self) -> None:
        for name in ("cache_chunk_rows", "cache_batch_size"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")

