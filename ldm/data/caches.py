"""On-disk caches of what the frozen encoders make of the data: VAE latents and text embeddings.

Encoding every image through the VAE and every caption through CLIP on every step is most of the
cost of small-model training (diffusers' train_text_to_image.py does exactly that). Both encoders
are frozen, so their outputs are computed once, written beside the dataset cache, and reused by
later runs and by every process. Each cache is keyed by everything its contents depend on, so a
changed input builds a new one instead of silently reusing a stale one. Each is a chunked store
(ldm/data/chunks.py), built by every process and memory-mapped, in float16 by default, which halves the
disk and the reads (`--cache_dtype float32` keeps them exact).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import Accelerator, PartialState

from ldm.data.captions import caption_list, pick_caption, text_states, tokenize
from ldm.data.chunks import FORMAT_VERSION, CacheLayout, ChunkedCache, flat_column, key_of, load_or_build
from ldm.data.dataset import EpochDataset, ImageCaptionDataset, dataloader

CHUNK_ROWS = 1024  # source rows per chunk: 32 MiB of SD-sized latents with flips, 115 MiB of CLIP-L states


def fingerprint_module(module: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, merges and normalisation; not of the padding and truncation
    settings, which the tokenizer changes on itself whenever it is called."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("padding", None)
    definition.pop("truncation", None)
    return key_of(**definition)


# ---------------------------------------------------------------- latents


def latent_layout(shape: tuple[int, ...], dtype: str) -> CacheLayout:
    """Rows of (flips, channels, height, width) posteriors, their source row and all its captions."""
    return CacheLayout({"mean": shape, "std": shape},
                       {"row": datasets.Value("int64"), "captions": datasets.List(datasets.Value("string"))}, dtype)


@torch.no_grad()
def encode_latents(vae, dataset: ImageCaptionDataset, flips: list[bool], batch_size: int, device: torch.device,
                   layout: CacheLayout, rows: range) -> Iterator[pa.Table]:
    """The posteriors (mean and std, unscaled) of the readable images among `rows`, both ways
    round when flipping, with every caption of their rows. Batches start at the chunk's first row,
    so a chunk's bits do not depend on which process encodes it."""
    captions = dataset.rows.select_columns([dataset.caption_column])
    loader = dataloader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size, shuffle=False)
    for batch in loader:
        if not batch["indices"]:
            continue
        pixels = batch["pixel_values"].to(device, vae.dtype)
        posteriors = [vae.encode(pixels.flip(-1) if flip else pixels).latent_dist for flip in flips]
        columns = {"row": pa.array(batch["indices"], pa.int64()),
                   "captions": pa.array([caption_list(c) for c in captions[batch["indices"]][dataset.caption_column]],
                                        pa.list_(pa.string()))}
        for name in ("mean", "std"):
            stacked = torch.stack([getattr(p, name).float().cpu() for p in posteriors], dim=1).numpy()
            columns[name] = flat_column(stacked, layout.dtype, f"latent {name}s")
        yield pa.table(columns, schema=layout.features().arrow_schema)


def load_or_build_latents(vae, dataset: ImageCaptionDataset, random_flip: bool, cache_root: str,
                          dtype: str = "float16", chunk_rows: int = CHUNK_ROWS, batch_size: int = 64,
                          processes: PartialState | Accelerator | None = None) -> ChunkedCache:
    """The latent cache of `dataset` under `vae`, built on first use.

    Images are encoded center-cropped (and flipped when `random_flip`), so a random crop cannot be
    cached; the training script refuses that combination.
    """
    processes = processes or PartialState()
    transform = dataset.transform
    parts = dict(format=FORMAT_VERSION, vae=fingerprint_module(vae), data=dataset.rows._fingerprint,
                 image_column=dataset.image_column, caption_column=dataset.caption_column,
                 resolution=transform.resolution, center_crop=transform.center_crop, random_flip=random_flip,
                 dtype=dtype, chunk_rows=chunk_rows)
    flips = [False, True] if random_flip else [False]
    side = transform.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    layout = latent_layout((len(flips), vae.config.latent_channels, side, side), dtype)
    folder = os.path.join(cache_root, f"latents-{key_of(**parts)}")
    encode = functools.partial(encode_latents, vae, dataset, flips, batch_size, processes.device, layout)
    return load_or_build(folder, layout, len(dataset), chunk_rows, encode, processes, "latents", parts)


# ---------------------------------------------------------------- text embeddings


def text_layout(tokens: int, hidden_size: int, dtype: str) -> CacheLayout:
    """Rows of a list of (tokens, hidden_size) states: one per caption of the source row."""
    return CacheLayout({"embeddings": (tokens, hidden_size)}, {}, dtype, nested=("embeddings",))


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, caption_rows: datasets.Dataset, caption_column: str, batch_size: int,
                 device, layout: CacheLayout, encode_ids: Callable, rows: range) -> Iterator[pa.Table]:
    """The last hidden state of every caption of each row in `rows`, as a list per row."""
    per_row = [caption_list(c) for c in caption_rows[rows.start:rows.stop][caption_column]]
    flat = [caption for captions in per_row for caption in captions]
    states = [encode_ids(tokenize(tokenizer, flat[start:start + batch_size]).to(device)).float().cpu().numpy()
              for start in range(0, len(flat), batch_size)]
    embeddings = flat_column(np.concatenate(states), layout.dtype, "text embeddings")
    offsets = pa.array(np.cumsum([0] + [len(captions) for captions in per_row]), pa.int32())
    yield pa.table({"embeddings": pa.ListArray.from_arrays(offsets, embeddings)},
                   schema=layout.features().arrow_schema)


def load_or_build_texts(tokenizer, text_encoder, caption_rows: datasets.Dataset, caption_column: str,
                        cache_root: str, dtype: str = "float16", chunk_rows: int = CHUNK_ROWS,
                        batch_size: int = 256, processes: PartialState | Accelerator | None = None,
                        padding_eos: int | None = None) -> ChunkedCache:
    """The frozen text encoder's states for every caption of every source row, row i of the cache
    holding row i's captions, so a latent row finds its text by its `row` without an index. With
    `padding_eos`, the states a masking denoiser reads (ldm/models/text.py `text_states`)."""
    processes = processes or PartialState()
    parts = dict(format=FORMAT_VERSION, text_encoder=fingerprint_module(text_encoder), padding_eos=padding_eos,
                 tokenizer=tokenizer_fingerprint(tokenizer), max_length=tokenizer.model_max_length,
                 data=caption_rows._fingerprint, caption_column=caption_column, dtype=dtype, chunk_rows=chunk_rows)
    layout = text_layout(tokenizer.model_max_length, text_encoder.config.hidden_size, dtype)
    folder = os.path.join(cache_root, f"texts-{key_of(**parts)}")
    captions = caption_rows.select_columns([caption_column])
    encode_ids = functools.partial(text_states, text_encoder, eos_token_id=padding_eos)
    encode = functools.partial(encode_texts, tokenizer, text_encoder, captions, caption_column, batch_size,
                               processes.device, layout, encode_ids)
    return load_or_build(folder, layout, len(caption_rows), chunk_rows, encode, processes, "captions", parts)


# ---------------------------------------------------------------- reading


class CachedRows(EpochDataset):
    """Training rows of a latent cache: the posterior of each image (a random flip of it when the
    cache holds both) and one of its captions, or that caption's embedding when there is a text
    cache. Every choice comes from (seed, epoch, row), so it does not depend on the order rows are
    fetched in. Rows are fetched a batch at a time (`__getitems__`): one Arrow gather per cache."""

    def __init__(self, latents: ChunkedCache, texts: ChunkedCache | None, seed: int):
        self.latents, self.texts, self.seed = latents, texts, seed

    def __len__(self) -> int:
        return len(self.latents)

    def __getitems__(self, indices: list[int]) -> dict:
        rows = self.latents.take(indices)
        rngs = [self.random_for(index) for index in indices]
        flips = torch.tensor([rng.randrange(self.latents.shapes["mean"][0]) for rng in rngs])
        picked = (torch.arange(len(indices)), flips)
        batch = {name: self.latents.tensor(rows.column(name), name)[picked] for name in ("mean", "std")}
        if self.texts is None:
            batch["captions"] = [pick_caption(captions, rng)
                                 for captions, rng in zip(rows.column("captions").to_pylist(), rngs)]
        else:
            batch["embeddings"] = self.text_embeddings(rows.column("row").to_pylist(), rngs)
        return batch

    def text_embeddings(self, source_rows: list[int], rngs) -> torch.Tensor:
        """The embedding of one caption, chosen as `pick_caption` would, of each source row."""
        lists = self.texts.take(source_rows).column("embeddings").combine_chunks()
        counts = pc.list_value_length(lists).to_numpy()
        starts = np.cumsum(counts) - counts
        picks = starts + np.array([rng.randrange(count) for count, rng in zip(counts, rngs)], dtype=np.int64)
        return self.texts.tensor(lists.flatten().take(pa.array(picks)), "embeddings")
