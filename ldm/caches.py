"""On-disk caches of what the frozen encoders make of the data: VAE latents and text embeddings.

Encoding every image through the VAE and every caption through CLIP on every step is most of the
cost of small-model training (diffusers' train_text_to_image.py does exactly that). Both encoders
are frozen, so their outputs are computed once, written beside the dataset cache, and reused by
later runs and by every process. Each cache is keyed by everything its contents depend on, so a
changed input builds a new one instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm.data import ImageCaptionDataset, dataloader
from ldm.text import tokenize

FORMAT_VERSION = 1


def fingerprint_module(module: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key_of(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_atomically(folder: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write into a temporary folder and rename it, so a killed build never looks complete."""
    partial = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(partial, "tensors.safetensors"))
    with open(os.path.join(partial, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        os.rename(partial, folder)
    except OSError:  # another run wrote the same cache first; the contents are identical
        shutil.rmtree(partial, ignore_errors=True)


def read(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return load_file(os.path.join(folder, "tensors.safetensors")), meta


@dataclass
class LatentCache:
    """VAE posteriors (mean and std, unscaled) of every readable image, both ways round when
    random flip is on, and the captions of their rows."""

    mean: torch.Tensor  # (rows, flips, C, h, w)
    std: torch.Tensor
    captions: list  # per row: a caption or a list of captions
    skipped: int  # unreadable images left out
    folder: str
    built: bool  # False when read from disk


@torch.no_grad()
def encode_latents(vae, dataset: ImageCaptionDataset, flips: list[bool], batch_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list, int]:
    means, stds, captions, skipped = [], [], [], 0
    loader = dataloader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="encoding latents", leave=False):
        skipped += len(batch["skipped"])
        if not batch["indices"]:
            continue
        pixels = batch["pixel_values"].to(device, vae.dtype)
        posteriors = [vae.encode(pixels.flip(-1) if flip else pixels).latent_dist for flip in flips]
        means.append(torch.stack([p.mean.float().cpu() for p in posteriors], dim=1))
        stds.append(torch.stack([p.std.float().cpu() for p in posteriors], dim=1))
        captions.extend(dataset.rows[i][dataset.caption_column] for i in batch["indices"])
    return torch.cat(means), torch.cat(stds), captions, skipped


def load_or_build_latents(vae, dataset: ImageCaptionDataset, random_flip: bool, cache_root: str,
                          batch_size: int = 64, device: torch.device | str = "cpu") -> LatentCache:
    """The latent cache of `dataset` under `vae`, built on first use.

    Images are encoded center-cropped (and flipped when `random_flip`), so a random crop cannot be
    cached; the training script refuses that combination.
    """
    transform = dataset.transform
    key = key_of(format=FORMAT_VERSION, vae=fingerprint_module(vae), data=dataset.rows._fingerprint,
                 image_column=dataset.image_column, caption_column=dataset.caption_column,
                 resolution=transform.resolution, center_crop=transform.center_crop, random_flip=random_flip)
    folder = os.path.join(cache_root, f"latents-{key}")
    built = not os.path.isdir(folder)
    if built:
        flips = [False, True] if random_flip else [False]
        mean, std, captions, skipped = encode_latents(vae, dataset, flips, batch_size, torch.device(device))
        write_atomically(folder, {"mean": mean, "std": std}, {"captions": captions, "skipped": skipped})
    tensors, meta = read(folder)
    return LatentCache(tensors["mean"], tensors["std"], meta["captions"], meta["skipped"], folder, built)


@dataclass
class TextCache:
    """The frozen text encoder's last hidden state for every caption, and for the empty prompt."""

    embeddings: torch.Tensor  # (captions + 1, tokens, hidden)
    index: dict[str, int]  # caption -> row of `embeddings`; "" is the empty prompt
    folder: str
    built: bool

    def lookup(self, captions: list[str]) -> torch.Tensor:
        return self.embeddings[[self.index[c] for c in captions]]

    @property
    def empty(self) -> torch.Tensor:
        return self.embeddings[self.index[""]].unsqueeze(0)


def all_captions(rows: list) -> list[str]:
    """Every distinct caption, with "" (the unconditional prompt) first."""
    unique = {""}
    for caption in rows:
        unique.update(caption if isinstance(caption, (list, tuple)) else [caption or ""])
    return sorted(unique)


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions: list[str], batch_size: int, device) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(captions), batch_size), desc="encoding captions", leave=False):
        ids = tokenize(tokenizer, captions[start:start + batch_size]).to(device)
        chunks.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(chunks)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, merges and normalisation; not of the padding and truncation
    settings, which the tokenizer changes on itself whenever it is called."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("padding", None)
    definition.pop("truncation", None)
    return key_of(**definition)


def load_or_build_texts(tokenizer, text_encoder, caption_rows: list, cache_root: str, batch_size: int = 256,
                        device: torch.device | str = "cpu") -> TextCache:
    captions = all_captions(caption_rows)
    key = key_of(format=FORMAT_VERSION, text_encoder=fingerprint_module(text_encoder),
                 tokenizer=tokenizer_fingerprint(tokenizer), max_length=tokenizer.model_max_length,
                 captions=hashlib.sha256("\n".join(captions).encode()).hexdigest())
    folder = os.path.join(cache_root, f"texts-{key}")
    built = not os.path.isdir(folder)
    if built:
        embeddings = encode_texts(tokenizer, text_encoder, captions, batch_size, device)
        write_atomically(folder, {"embeddings": embeddings}, {"captions": captions})
    tensors, meta = read(folder)
    index = {caption: row for row, caption in enumerate(meta["captions"])}
    return TextCache(tensors["embeddings"], index, folder, built)
