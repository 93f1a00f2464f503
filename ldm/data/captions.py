"""Captions: a row's caption field as text, and text as token ids."""

from __future__ import annotations

import random

import torch
from transformers import CLIPTokenizer


def caption_list(value) -> list[str]:
    """A row's captions as a non-empty list of strings. A missing caption (null) is the empty prompt,
    which trains the unconditional model as caption dropout does; a null among several is left out;
    a number is its text."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v if isinstance(v, str) else str(v) for v in values if v is not None] or [""]


def pick_caption(caption, rng: random.Random) -> str:
    """A row may hold several captions; each epoch sees one of them at random (by the same draw as
    ldm.data.caches.CachedRows picks a cached embedding with)."""
    captions = caption_list(caption)
    return captions[rng.randrange(len(captions))]



def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's context length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids
