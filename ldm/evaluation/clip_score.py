"""CLIP score of generated images against their prompts, from a local CLIP folder, through torchmetrics' CLIPScore.

The number is torchmetrics' (and diffusers' docs'): 100 * cos(image embedding, text embedding) per pair, averaged,
and the mean clamped at 0. It is not Hessel et al.'s CLIPScore (2021), 2.5 * max(cos, 0) per pair, so the two do
not compare. The unclamped per-pair values come back as well: a weak or random model has negative cosines,
which the clamped mean hides.
"""

import json
import os
import warnings
from dataclasses import dataclass

import torch
from transformers import CLIPModel, CLIPProcessor

from ldm.evaluation.image_metrics import to_uint8
from ldm.evaluation.torchmetrics_import import CLIPScore, clip_score_update


class PooledFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors, as torchmetrics 1.9.0 expects.
    transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding, and
    CLIPScore fails on it with "'BaseModelOutputWithPooling' object has no attribute 'norm'"
    (Lightning-AI/torchmetrics#3407, fixed by #3408 after 1.9.0: drop this once a release has it)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    @property
    def config(self):  # CLIPScore reads text_config.max_position_embeddings to truncate long captions
        return self.model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(clip_model: str) -> tuple[PooledFeatures, CLIPProcessor]:
    """A CLIP model and its processor from a folder that `save_pretrained` wrote (a Hub CLIP such as
    openai/clip-vit-large-patch14, downloaded beforehand): local files only."""
    if not os.path.isdir(clip_model):
        raise FileNotFoundError(f"CLIP model folder {clip_model} does not exist")
    config_path = os.path.join(clip_model, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{clip_model} holds no CLIP model: it has no config.json (want a folder with a CLIPModel "
                         "and its processor, as save_pretrained writes them)")
    with open(config_path, encoding="utf-8") as file:
        model_type = json.load(file).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{clip_model} holds a model of type {model_type!r}, not 'clip': a CLIPModel is needed, "
                         "with both its text and vision towers (a pipeline's text_encoder/ has only the text one)")
    try:
        model = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{clip_model} has a CLIP config but its weights or processor (tokenizer and image "
                         f"processor files) do not load: {error}") from error
    return PooledFeatures(model), processor


@dataclass(frozen=True)
class ClipScoreResult:
    score: float  # torchmetrics' CLIPScore: max(mean over pairs of 100 * cos, 0)
    per_pair: torch.Tensor  # (N,) 100 * cos for each image and its caption, unclamped
    count: int


def clip_score(images: torch.Tensor, captions: list[str], clip_model: str | tuple[PooledFeatures, CLIPProcessor],
               batch_size: int = 32) -> ClipScoreResult:
    """CLIP score of `images` ((N, 3, H, W), uint8 or floats in [0, 1], rounded to uint8 as a PNG would be: the
    processor rescales by 1/255 itself) against `captions`, one per image. `clip_model` is a local folder, or what
    `load_clip` returned, to load it once for many calls."""
    images = to_uint8(images)
    if isinstance(captions, str) or len(captions) != len(images):
        given = "one string" if isinstance(captions, str) else f"{len(captions)} captions"
        raise ValueError(f"clip_score needs one caption per image: {len(images)} images, {given}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = load_clip(clip_model) if isinstance(clip_model, str) else clip_model
    metric = CLIPScore(model_name_or_path=lambda: loaded)  # a callable: its only way to take a local model
    per_pair = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch, texts = images[start:start + batch_size], list(captions[start:start + batch_size])
            # CLIPScore.update would sum these straight away; the same two lines, keeping the pairs.
            scores, count = clip_score_update(batch, texts, metric.model, metric.processor)
            metric.score += scores.sum(0)
            metric.n_samples += count
            per_pair.append(scores.cpu())
    with warnings.catch_warnings():  # it counts update() calls, and so thinks its filled state empty
        warnings.filterwarnings("ignore", message="The ``compute`` method of metric CLIPScore was called before")
        score = metric.compute().item()
    return ClipScoreResult(score, torch.cat(per_pair), len(images))
