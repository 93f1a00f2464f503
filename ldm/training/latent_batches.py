"""The training-data path of both denoiser trainers (train_unet.py, distill.py): rows from the caches,
a stream or the images themselves, made into batches of VAE posteriors and caption states.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import send_to_device
from diffusers import AutoencoderKL

from ldm.data.caches import CachedRows, load_or_build_latents, load_or_build_texts
from ldm.data.captions import text_states, tokenize
from ldm.data.chunks import ChunkedCache, ChunkShuffle, as_batch
from ldm.data.dataset import ImageCaptionDataset, SkipCounter, dataloader
from ldm.data.openmoji import default_cache_dir
from ldm.data.streaming import StreamBatches, load_stream_state, save_stream_state
from ldm.diffusion import objective
from ldm.training.checkpoints import load_checkpoint, resume_state, resumed_batches
from ldm.training.distill_config import DistillConfig
from ldm.training.loop import unreadable_rows
from ldm.training.unet_config import UNetConfig

logger = get_logger(__name__)


class TrainingData:
    """Where the batches come from, and what resuming and checkpointing them takes.

    - Caches (the default): the latent cache, and the text cache when the text encoder is frozen,
      read with flat memory (ldm/data/caches.py), through a DataLoader that Accelerate prepares.
    - A stream (`--streaming`): each process's own shards, outside Accelerate (ldm/data/streaming.py).
    - Images (`--cache_latents false`): decoded and encoded in the step, through a DataLoader.
    """

    def __init__(self, loader=None, stream: StreamBatches | None = None, latents: ChunkedCache | None = None,
                 texts_cached: bool = False, rows: int | None = None):
        self.loader, self.stream, self.latents, self.rows = loader, stream, latents, rows
        self.texts_cached = texts_cached

    def resume(self, accelerator: Accelerator, config: UNetConfig | DistillConfig):
        """Load the checkpoint to resume from, if any: (steps taken, (batch number, batch) from there on)."""
        if self.stream is not None:
            global_step, checkpoint = load_checkpoint(accelerator, config)
            if checkpoint is not None:
                load_stream_state(self.stream, checkpoint)
            logger.info(f"streaming {self.stream.stream.num_shards} shard(s) on each of {accelerator.num_processes} "
                        "process(es)")  # split_dataset_by_node's num_shards is this process's share
            return global_step, ((number, send_to_device(batch, accelerator.device)) for number, batch in self.stream)
        steps_per_epoch = math.ceil(len(self.loader) / config.gradient_accumulation_steps)
        global_step, first_epoch, batches_to_skip = resume_state(accelerator, config, steps_per_epoch)
        logger.info(f"{self.rows} training rows; {steps_per_epoch} steps per epoch on each of "
                    f"{accelerator.num_processes} process(es)")
        return global_step, resumed_batches(accelerator, self.loader, first_epoch, batches_to_skip)

    def add_checkpoint_files(self, checkpoint: str) -> None:
        if self.stream is not None:
            save_stream_state(self.stream, checkpoint)

    def unreadable(self, skipped: SkipCounter, accelerator: Accelerator) -> int:
        """Unreadable images: left out of the cache when it was built, or met in the step (each
        row once; for a stream, each time it was met)."""
        if self.latents is not None:
            return self.latents.skipped
        if self.stream is not None:
            return int(accelerator.reduce(torch.tensor(len(skipped.rows), device=accelerator.device), "sum"))
        return len(unreadable_rows(skipped, self.rows, accelerator))


def training_data(config: UNetConfig | DistillConfig, accelerator: Accelerator, train_rows, vae, tokenizer,
                  text_encoder, padding_eos: int | None = None) -> TrainingData:
    """The batches to train on. `padding_eos`: the text states are a masking denoiser's (see `text_states`)."""
    if config.streaming:
        examples = ImageCaptionDataset.from_config(None, config, seed=config.seed)
        return TrainingData(stream=StreamBatches(train_rows, examples, config.train_batch_size,
                                                 accelerator.process_index, accelerator.num_processes))
    if not config.uses_caches:
        train_set = ImageCaptionDataset.from_config(train_rows, config, seed=config.seed)
        return TrainingData(dataloader(train_set, config.train_batch_size, shuffle=True,
                                       num_workers=config.dataloader_num_workers), rows=len(train_set))
    # Every process encodes its share of whatever chunks are missing; the cache holds center crops,
    # both ways round when flipping.
    cache_root = config.cache_dir or default_cache_dir()
    latents = load_or_build_latents(vae, ImageCaptionDataset.from_config(train_rows, config, train=False),
                                    config.random_flip, cache_root, config.cache_dtype, config.cache_chunk_rows,
                                    config.cache_batch_size, processes=accelerator)
    logger.info(f"latent cache {latents.folder} ({latents.encoded_now} chunk(s) encoded by this process); "
                f"{latents.skipped} unreadable image(s) left out")
    texts = None
    if config.cache_text_embeddings and not config.trains_text_encoder:
        texts = load_or_build_texts(tokenizer, text_encoder, train_rows, config.caption_column, cache_root,
                                    config.cache_dtype, config.cache_chunk_rows, processes=accelerator,
                                    padding_eos=padding_eos)
        logger.info(f"text cache {texts.folder} ({texts.encoded_now} chunk(s) encoded by this process)")
    rows = CachedRows(latents, texts, config.seed)
    loader = torch.utils.data.DataLoader(rows, batch_size=config.train_batch_size,
                                         sampler=ChunkShuffle(latents.chunk_rows, config.seed), collate_fn=as_batch,
                                         num_workers=config.dataloader_num_workers)
    return TrainingData(loader, latents=latents, texts_cached=texts is not None, rows=len(rows))


@torch.no_grad()
def cached_empty_prompt(text_encoder, empty_ids: torch.Tensor, cache_dtype: str,
                        padding_eos: int | None = None) -> torch.Tensor:
    """The empty prompt's states, rounded to the cache's dtype like the captions' they stand in for."""
    return text_states(text_encoder, empty_ids, padding_eos).to(getattr(torch, cache_dtype)).float()


# ---------------------------------------------------------------- components


def posterior(vae: AutoencoderKL, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z | image): read from the cache, or computed now by the frozen VAE."""
    if "mean" in batch:
        return batch["mean"].float(), batch["std"].float()
    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def encode_captions(batch: dict, tokenizer, text_encoder, empty: torch.Tensor | None, empty_ids: torch.Tensor,
                    dropout: float, generator: torch.Generator, padding_eos: int | None = None) -> torch.Tensor:
    """Text embeddings for a batch, cached or computed now, with `dropout` of them swapped for the
    empty prompt's (for CFG). A frozen text encoder runs without building a graph."""
    if "embeddings" in batch:
        return objective.drop_conditioning(batch["embeddings"].float(), empty, dropout, generator)
    ids = objective.drop_conditioning(tokenize(tokenizer, batch["captions"]).to(empty_ids.device), empty_ids,
                                      dropout, generator)
    with torch.set_grad_enabled(text_encoder.training):
        return text_states(text_encoder, ids, padding_eos)

