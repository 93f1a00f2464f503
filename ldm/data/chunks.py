"""A chunked, memory-mapped store of rows that every process helps build: the format of the
latent and text caches (ldm/data/caches.py), made to scale past what fits in RAM.

- A store is a folder of 🤗 datasets Arrow files, each holding a fixed range of `chunk_rows`
  source rows (by global row index, so the chunks do not depend on how many processes built
  them), and a `manifest.json` written last: the rows, bytes and payload of each chunk, the tensor
  shapes, the storage dtype and the key. Opening one reads the manifest and memory-maps the chunks;
  no row is read until it is fetched, so every process shares the page cache instead of a copy.
- Every process encodes the missing chunks it owns (chunk k belongs to process k mod N). Each
  chunk is written under a temporary name, flushed and renamed, so a build killed at any moment
  loses at most the chunk each process was writing, and a rerun, at any process count, encodes only
  the missing ones. After one barrier the main process writes the manifest.
- Tensors are stored flat (fixed-size Arrow lists, no per-row offsets: disk is the payload), in
  float16 or float32.
- `ChunkShuffle` orders an epoch with memory that does not grow with the rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from datasets.arrow_writer import ArrowWriter
from datasets.table import MemoryMappedTable, concat_tables
from tqdm.auto import tqdm

from ldm.config import ConfigError

FORMAT_VERSION = 2  # 1: one safetensors file per cache, loaded whole into every process
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


def key_of(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class CacheLayout:
    """What a cache holds: its tensor columns (name -> shape of one item; stored flat), its other
    columns (name -> 🤗 feature), and how they are stored."""

    tensors: dict[str, tuple[int, ...]]
    others: dict[str, datasets.features.FeatureType]
    dtype: str
    nested: tuple[str, ...] = ()  # tensor columns holding a list of items per row (a row's captions)

    def features(self) -> datasets.Features:
        flat = {name: datasets.List(datasets.Value(self.dtype), length=int(np.prod(shape)))
                for name, shape in self.tensors.items()}
        return datasets.Features({**self.others, **{
            name: datasets.List(item) if name in self.nested else item for name, item in flat.items()}})


class ChunkedCache:
    """An opened cache: its manifest, and its chunks memory-mapped as one Arrow-format 🤗 Dataset."""

    def __init__(self, folder: str, encoded_now: int = 0):
        self.folder, self.encoded_now = folder, encoded_now
        with open(os.path.join(folder, MANIFEST)) as f:
            self.manifest = json.load(f)
        self.shapes = {name: tuple(shape) for name, shape in self.manifest["shapes"].items()}
        # One Dataset over every chunk's memory-mapped table, fingerprinted by the cache key:
        # Dataset.from_file per chunk would hash each file's schema, 60% of the time to open.
        chunks = [MemoryMappedTable.from_file(os.path.join(folder, chunk["file"])) for chunk in self.manifest["chunks"]]
        self.table = datasets.Dataset(concat_tables(chunks), fingerprint=self.manifest["key"]).with_format("arrow")

    @property
    def built(self) -> bool:
        return self.encoded_now > 0

    @property
    def chunk_rows(self) -> list[int]:
        """Rows in each chunk, in order (fewer than `chunk_rows` where images were unreadable)."""
        return [chunk["rows"] for chunk in self.manifest["chunks"]]

    @property
    def skipped(self) -> int:
        return sum(chunk["skipped"] for chunk in self.manifest["chunks"])

    def __len__(self) -> int:
        return self.manifest["rows"]

    def take(self, indices: list[int]) -> pa.Table:
        """Rows by position in the cache, in one gather."""
        return self.table[indices]

    def tensor(self, column: pa.Array | pa.ChunkedArray, name: str) -> torch.Tensor:
        """A fixed-size-list column as a (rows, *shape) tensor in the storage dtype, without a copy
        through Python objects."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(values.reshape(len(column), *self.shapes[name]).copy())


def chunk_file(index: int) -> str:
    return f"chunk-{index:05d}.arrow"


def load_or_build(folder: str, layout: CacheLayout, source_rows: int, chunk_rows: int,
                  encode: Callable[[range], Iterator[pa.Table]], processes: PartialState | Accelerator, what: str,
                  key_parts: dict) -> ChunkedCache:
    """Open the cache in `folder`, first encoding the chunks that are missing.

    `encode(rows)` yields Arrow tables of the layout's columns for the source rows `rows`. Every
    process calls this; process p encodes the missing chunks k with k mod N = p.
    """
    if source_rows == 0:
        raise ConfigError("the training set is empty: there is nothing to train on")
    encoded = 0
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        os.makedirs(folder, exist_ok=True)
        ranges = [range(start, min(start + chunk_rows, source_rows)) for start in range(0, source_rows, chunk_rows)]
        mine = [k for k in range(processes.process_index, len(ranges), processes.num_processes)
                if not os.path.isfile(os.path.join(folder, chunk_file(k)))]
        failure = None
        try:
            for k in tqdm(mine, desc=f"encoding {what}", disable=not mine):
                write_chunk(os.path.join(folder, chunk_file(k)), layout, encode(ranges[k]))
        except Exception as error:  # raised below, once every process knows: none may wait for this one forever
            failure = error
        encoded = len(mine)
        processes.wait_for_everyone()
        check_build(folder, len(ranges), failure, processes)
        if processes.is_main_process:
            write_manifest(folder, layout, ranges, chunk_rows, key_parts)
        processes.wait_for_everyone()
    return ChunkedCache(folder, encoded)


def check_build(folder: str, chunks: int, failure: Exception | None, processes: PartialState | Accelerator) -> None:
    """Every process stops if any failed, or if any cannot see every chunk (on several machines,
    a --cache_dir that is not shared), rather than wait for the others at the next barrier."""
    unseen = sum(not os.path.isfile(os.path.join(folder, chunk_file(k))) for k in range(chunks))
    failed, missing = reduce(torch.tensor([float(failure is not None), float(unseen)], device=processes.device),
                             "sum").tolist()
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"another process failed while building the cache in {folder}; its log says why")
    if missing:
        raise ConfigError(f"{folder}: chunks that other processes wrote are missing here; on several machines, "
                          "--cache_dir must be a folder that every machine shares")


def write_chunk(path: str, layout: CacheLayout, tables: Iterator[pa.Table]) -> None:
    """Write under a temporary name, then rename: a chunk file that exists is complete."""
    partial = partial_name(path)
    writer = ArrowWriter(features=layout.features(), path=partial)
    try:
        for table in tables:
            writer.write_table(table)
        writer.finalize()
    finally:
        writer.close()
    durable_replace(partial, path)


def partial_name(path: str) -> str:
    """A temporary name no other writer uses, also on another machine sharing the folder."""
    return f"{path}.partial-{socket.gethostname()}-{os.getpid()}"


def durable_replace(partial: str, path: str) -> None:
    """Rename `partial` to `path` once its bytes are on disk, so that not even a machine's crash
    leaves a truncated file under the final name."""
    descriptor = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(partial, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_manifest(folder: str, layout: CacheLayout, ranges: list[range], chunk_rows: int, key_parts: dict) -> None:
    """Count each chunk's rows, bytes and payload, then write the manifest atomically; partial
    files of killed builds go."""
    chunks = []
    for k, source in enumerate(ranges):
        path = os.path.join(folder, chunk_file(k))
        table = datasets.Dataset.from_file(path).data
        chunks.append({"file": chunk_file(k), "source_rows": [source.start, source.stop], "rows": table.num_rows,
                       "skipped": len(source) - table.num_rows, "bytes": os.path.getsize(path),
                       "payload_bytes": payload_bytes(table, layout)})
    manifest = {"format": FORMAT_VERSION, "key": key_of(**key_parts), "inputs": key_parts, "dtype": layout.dtype,
                "chunk_rows": chunk_rows,
                "shapes": {name: list(shape) for name, shape in layout.tensors.items()},
                "rows": sum(chunk["rows"] for chunk in chunks), "chunks": chunks}
    path = os.path.join(folder, MANIFEST)
    partial = partial_name(path)
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1)
    durable_replace(partial, path)
    for leftover in glob.glob(os.path.join(folder, "*.partial-*")):
        os.remove(leftover)


def payload_bytes(table, layout: CacheLayout) -> int:
    """The bytes of the tensors and the caption text a chunk holds: what any format must store."""
    total = 0
    for name in table.column_names:
        column = table.column(name)
        if name in layout.tensors:
            values = pc.list_flatten(column) if name in layout.nested else column
            total += len(pc.list_flatten(values)) * np.dtype(layout.dtype).itemsize
        elif name == "captions":
            total += pc.sum(pc.binary_length(pc.list_flatten(column))).as_py() or 0
    return total


def flat_column(array: np.ndarray, dtype: str, what: str) -> pa.FixedSizeListArray:
    """(rows, ...) values as a fixed-size-list column in the storage dtype; values that overflow
    it (float16 ends at 65504) stop the build rather than train on infinities."""
    with np.errstate(over="ignore"):
        stored = array.astype(DTYPES[dtype])
    if np.isinf(stored).any() and not np.isinf(array).any():
        raise ValueError(f"{what} reach {np.abs(array).max():.4g}, beyond {dtype}'s range; "
                         "rebuild the cache with --cache_dtype float32")
    rows = stored.reshape(len(stored), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])


def as_batch(batch: dict) -> dict:
    """The collate function for datasets that fetch whole batches: nothing left to do."""
    return batch


class ChunkShuffle(torch.utils.data.Sampler):
    """An epoch's order over a chunked cache, with memory that does not grow with its rows: the
    chunks in a random order, then the rows of each window of consecutive chunks (about
    `window_rows` rows, a few chunks) in a random order, both drawn from (seed, epoch). A batch
    therefore mixes rows from several chunks, and reads stay within a window of the files."""

    def __init__(self, chunk_rows: list[int], seed: int, window_rows: int = 65536):
        self.sizes, self.seed, self.window_rows, self.epoch = np.array(chunk_rows), seed, window_rows, 0
        self.starts = np.cumsum(self.sizes) - self.sizes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        window: list[int] = []
        for chunk in rng.permutation(len(self.sizes)):
            window.append(chunk)
            if self.sizes[window].sum() >= self.window_rows:
                yield from self.shuffled(window, rng)
                window = []
        if window:
            yield from self.shuffled(window, rng)

    def shuffled(self, chunks: list[int], rng: np.random.Generator) -> list[int]:
        rows = np.concatenate([np.arange(self.starts[c], self.starts[c] + self.sizes[c]) for c in chunks])
        return rng.permutation(rows).tolist()
