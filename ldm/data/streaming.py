"""`--streaming`: image-caption rows read as they arrive, through 🤗 datasets' IterableDataset, for
data bigger than the disk. The encoders run in the training step and nothing is cached.

- Each process reads only its own shards (`split_dataset_by_node`). Accelerate never sees the
  stream, so it cannot dispatch every batch from process 0, which would read everything.
- There is no shuffle buffer: a resumed run would lose its contents. Each epoch visits the shards
  in an order drawn from (seed, epoch), each shard in its stored order.
- The position is the stream's own `state_dict()` after the last example of the last batch handed
  out. Each process saves its own in every checkpoint, and a resumed run continues at the next
  unseen example (datasets skips whole shards, and seeks within Arrow and Parquet shards).
"""

from __future__ import annotations

import hashlib
import json
import os

import datasets
from datasets.distributed import split_dataset_by_node

from ldm.config import ConfigError
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, collate, require_columns, require_image_feature, train_split
from ldm.data.openmoji import load_openmoji

LOCAL_SHARDS = 64  # an on-disk dataset (the built-in OpenMoji) is streamed from its Arrow file in this many shards


def open_stream(config: DataConfig) -> datasets.IterableDataset:
    """The training split as a stream, its images left undecoded."""
    if config.train_data_dir is not None:
        raw = datasets.load_dataset("imagefolder", data_dir=config.train_data_dir, streaming=True)
    elif config.dataset_name == "openmoji":
        raw = datasets.IterableDatasetDict({name: split.to_iterable_dataset(num_shards=LOCAL_SHARDS) for name, split
                                            in load_openmoji(config.resolution, config.cache_dir).items()})
    else:
        raw = datasets.load_dataset(config.dataset_name, config.dataset_config_name, streaming=True)
    stream = train_split(raw)
    if stream.features is not None:
        require_columns(stream.column_names, config)
        require_image_feature(stream.features[config.image_column], config)
        if isinstance(stream.features[config.image_column], datasets.Image):
            stream = stream.cast_column(config.image_column, datasets.Image(decode=False))
    return stream


def epoch_key(seed: int, epoch: int) -> int:
    """The stream's epoch number for (seed, epoch): datasets orders the shards by it, and keeps
    them in their stored order for 0, so 0 never comes out."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:4], "little") | 1


class StreamBatches:
    """Batches of this process's share of a stream, epoch after epoch, without end, resumable.

    Yields (batch number, batch) like `ldm.training.checkpoints.resumed_batches`; the batch number counts this
    process's batches since the run began, for the noise generator. A batch is `collate`d rows of
    `examples.prepare`, each row's random crop, flip and caption drawn from (seed, epoch, process,
    its position in the epoch), so a resumed run draws the same. The position is only valid for the
    same split: resuming with another number of processes stops with an error."""

    def __init__(self, stream: datasets.IterableDataset, examples: ImageCaptionDataset, batch_size: int,
                 process_index: int, num_processes: int):
        if stream.num_shards % num_processes:
            raise ConfigError(f"the stream has {stream.num_shards} shard(s), which {num_processes} processes cannot "
                              "share evenly, so each would read every example; use a process count that divides it, "
                              "or a dataset with more shards (files)")
        self.stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
        self.examples, self.batch_size, self.process_index = examples, batch_size, process_index
        self.split = {"processes": num_processes, "shards": stream.num_shards}
        self.position = {"epoch": 0, "examples": 0, "batches": 0, "dataset": None}

    def state_dict(self) -> dict:
        return {**self.position, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop("split")
        if saved != self.split:
            raise ConfigError(f"the stream's position was saved with {saved['processes']} process(es) over "
                              f"{saved['shards']} shard(s); this run has {self.split['processes']} over "
                              f"{self.split['shards']}: resume with the same processes and data")
        self.position = state

    def __iter__(self):
        while True:
            epoch = self.position["epoch"]
            self.stream.set_epoch(epoch_key(self.examples.seed, epoch))
            self.examples.set_epoch(epoch)
            if self.position["dataset"] is not None:  # applied by datasets to this epoch only
                self.stream.load_state_dict(self.position["dataset"])
            rows, seen = [], self.position["examples"]
            for example in self.stream:
                rows.append(self.examples.prepare(example[self.examples.image_column],
                                                  example[self.examples.caption_column],
                                                  f"{self.process_index}/{epoch}/{seen}"))
                seen += 1
                if len(rows) == self.batch_size:
                    yield self.advance(epoch, seen, self.stream.state_dict()), collate(rows)
                    rows = []
            if rows:  # the epoch's last, smaller batch
                yield self.advance(epoch, seen, self.stream.state_dict()), collate(rows)
            self.position.update(epoch=epoch + 1, examples=0, dataset=None)

    def advance(self, epoch: int, seen: int, state: dict) -> int:
        """Record the position after a batch; returns that batch's number."""
        number = self.position["batches"]
        self.position = {"epoch": epoch, "examples": seen, "batches": number + 1, "dataset": state}
        return number


def stream_state_file(checkpoint: str, process_index: int) -> str:
    return os.path.join(checkpoint, f"stream_state_{process_index}.json")


def save_stream_state(batches: StreamBatches, checkpoint: str) -> None:
    with open(stream_state_file(checkpoint, batches.process_index), "w") as f:
        json.dump(batches.state_dict(), f)


def load_stream_state(batches: StreamBatches, checkpoint: str) -> None:
    path = stream_state_file(checkpoint, batches.process_index)
    if not os.path.isfile(path):
        raise ConfigError(f"{checkpoint} holds no stream position for process {batches.process_index} ({path}): "
                          "resume a --streaming run from its own checkpoints, with the same number of processes")
    with open(path) as f:
        batches.load_state_dict(json.load(f))
