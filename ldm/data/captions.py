"""Captions: a row's caption field as text, text as token ids, and token ids as text states."""

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


def zero_padding(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The states with the masked positions zeroed."""
    return states * attention_mask.unsqueeze(-1).to(states.dtype)


def padding_mask(states: torch.Tensor) -> torch.Tensor:
    """1 where a position holds a token, 0 where `zero_padding` zeroed it: the attention mask."""
    return (states != 0).any(dim=-1).to(states.dtype)


def through_first_eos(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first end-of-text token, 0 after: the attention mask the tokenizer
    returns with max-length padding, recovered from the ids (so it follows them through caption dropout)."""
    eos = ids == eos_token_id
    return (eos.cumsum(dim=1) - eos.long() == 0).long()


def text_states(text_encoder, ids: torch.Tensor, eos_token_id: int | None = None) -> torch.Tensor:
    """CLIP's last hidden state for token ids: as a UNet reads it (every position), or, given the tokenizer's
    `eos_token_id`, as a masking denoiser does: the encoder run with the padding masked, as
    PixArtAlphaPipeline runs it, and the padding's states zeroed (ldm/models/denoiser.py says why)."""
    if eos_token_id is None:
        return text_encoder(ids, return_dict=False)[0]
    mask = through_first_eos(ids, eos_token_id)
    return zero_padding(text_encoder(ids, attention_mask=mask, return_dict=False)[0], mask)
