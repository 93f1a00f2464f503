"""`python -m ldm.evaluate`'s settings, and the checks that need no model."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ldm.config import ConfigError, require
from ldm.evaluation.image_metrics import FEATURE_SIZES


@dataclass
class EvaluateConfig:
    model: str = field(metadata={"help": "a saved pipeline folder, a Hub id, a distilled student or an ONNX export"})
    reference: str = field(default="openmoji", metadata={
        "help": "the real images: 'openmoji', a Hub dataset id, a local dataset folder, or an imagefolder (with "
                "metadata.jsonl); its held-out split is used, and its captions are what the model draws"})
    image_column: str = "image"
    caption_column: str = "text"
    num_samples: int = field(default=100, metadata={
        "help": "images generated per guidance scale, one per held-out caption, and as many real ones"})
    guidance: list[float] = field(default_factory=list, metadata={
        "help": "guidance scale(s) to evaluate at; default: 7.5, or a distilled model's own"})
    scheduler: Optional[str] = field(default=None, metadata={"help": "as generate.py's --scheduler"})
    num_inference_steps: Optional[int] = field(default=None, metadata={"help": "default: 30, or a distilled model's"})
    seed: int = field(default=0, metadata={"help": "image i uses seed + i; the bound and held-out draws use it too"})
    batch_size: int = 16
    revision: Optional[str] = None
    lora: Optional[str] = field(default=None, metadata={"help": "LoRA adapters, as generate.py's --lora"})
    lora_scale: Optional[float] = None
    backend: Literal["torch", "onnx"] = "torch"
    device: str = "auto"
    inception_weights: Optional[str] = field(default=None, metadata={
        "help": "torch-fidelity's weights-inception-2015-12-05-6726825d.pth: enables FID, KID, Inception Score and "
                "precision/recall/density/coverage"})
    feature_size: int = field(default=2048, metadata={"help": "Inception features for FID, KID and PR; 2048 is "
                                                              "the standard"})
    clip_model: Optional[str] = field(default=None, metadata={
        "help": "a local CLIP folder (CLIPModel + CLIPProcessor, e.g. openai/clip-vit-large-patch14): enables the "
                "CLIP score"})
    validation_loss_samples: int = field(default=256, metadata={
        "help": "held-out images for the denoising loss at fixed draws; 0 skips it and the bound"})
    bound_samples: int = 64
    bound_strata: int = 32
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "where evaluation.json goes"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where the reference set and its features are cached; default $LDM_CACHE or ~/.cache/ldm"})

    def validate(self) -> None:
        require(self.num_samples >= 2, "num_samples", self.num_samples, "2 or more (FID and KID compare sets)")
        for scale in self.guidance:
            require(math.isfinite(scale) and scale >= 0, "guidance", scale, "finite scales of 0 or more")
        require(self.num_inference_steps is None or self.num_inference_steps >= 1, "num_inference_steps",
                self.num_inference_steps, "a positive integer")
        for name in ("batch_size", "bound_samples", "bound_strata"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        require(self.validation_loss_samples >= 0, "validation_loss_samples", self.validation_loss_samples,
                "0 (skip) or a positive count")
        require(self.feature_size in FEATURE_SIZES, "feature_size", self.feature_size,
                f"one of Inception's pooled layers {FEATURE_SIZES}")
        if self.inception_weights is not None and not os.path.isfile(self.inception_weights):
            raise ConfigError(f"inception_weights {self.inception_weights!r} is not a file; give torch-fidelity's "
                              "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        if self.clip_model is not None and not os.path.isdir(self.clip_model):
            raise ConfigError(f"clip_model {self.clip_model!r} is not a folder; give a local CLIP folder "
                              "(CLIPModel and CLIPProcessor files, as save_pretrained writes them)")
