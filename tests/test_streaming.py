"""--streaming: a dataset of Parquet shards, as on the Hub, read as a stream split across processes."""

import os

import pytest
import torch

from ldm.config import ConfigError
from ldm.data.dataset import ImageCaptionDataset, load_splits
from ldm.data.streaming import StreamBatches, open_stream
from ldm.training.unet_config import UNetConfig


def write_parquet_shards(folder, shards=4, rows=40):
    """The first `rows` OpenMoji training rows (PNG bytes and captions) as a Hub-style dataset
    repository: data/train-0000k-of-0000n.parquet."""
    train, _ = load_splits(UNetConfig(resolution=32, max_train_samples=rows))
    os.makedirs(folder / "data", exist_ok=True)
    for k in range(shards):
        path = folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"
        train.shard(shards, k, contiguous=True).to_parquet(str(path))
    return train


def stream_config(folder, **overrides):
    return UNetConfig(dataset_name=str(folder), resolution=32, streaming=True, **overrides)


def take(batches, count):
    iterator = iter(batches)
    # range first: zip stops on it before drawing one batch too many from the stream
    return [(number, batch["captions"], batch["pixel_values"]) for _, (number, batch) in zip(range(count), iterator)]


def rank_batches(stream, config, rank, world=2, batch_size=3):
    examples = ImageCaptionDataset.from_config(None, config, seed=config.seed)
    return StreamBatches(stream, examples, batch_size, rank, world)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, openmoji_32):
    folder = tmp_path_factory.mktemp("parquet")
    return folder, write_parquet_shards(folder)


def test_each_process_reads_its_own_shards_in_an_order_drawn_per_epoch(shards):
    folder, rows = shards
    config = stream_config(folder, random_flip=True)
    stream = open_stream(config)
    assert stream.num_shards == 4
    epochs = {}
    for rank in (0, 1):
        seen = take(rank_batches(stream, config, rank), 14)  # 20 rows = 7 batches of 3 (the 7th of 2) an epoch
        assert [number for number, _, _ in seen] == list(range(14))
        epochs[rank] = [[c for _, captions, _ in seen[e * 7:(e + 1) * 7] for c in captions] for e in (0, 1)]
        assert [len(epoch) for epoch in epochs[rank]] == [20, 20]
    for epoch in (0, 1):  # the two processes share each epoch between them, each row once
        assert sorted(epochs[0][epoch] + epochs[1][epoch]) == sorted(rows["text"])
    assert epochs[0][0] != epochs[0][1] or epochs[1][0] != epochs[1][1]  # the shards are dealt anew


def test_a_resumed_stream_continues_at_the_next_unseen_example(shards):
    folder, _ = shards
    config = stream_config(folder, random_flip=True)
    straight = take(rank_batches(open_stream(config), config, rank=1), 12)
    first = rank_batches(open_stream(config), config, rank=1)
    begun = take(first, 9)  # into the second epoch, mid-shard
    resumed = rank_batches(open_stream(config), config, rank=1)
    resumed.load_state_dict(first.state_dict())
    rest = take(resumed, 3)
    assert [n for n, _, _ in begun + rest] == list(range(12))
    for (_, captions, pixels), (_, expected_captions, expected_pixels) in zip(begun + rest, straight):
        assert captions == expected_captions and torch.equal(pixels, expected_pixels)


def test_a_position_saved_with_another_split_is_refused(shards):
    folder, _ = shards
    config = stream_config(folder)
    two = rank_batches(open_stream(config), config, rank=1, world=2)
    take(two, 2)
    four = rank_batches(open_stream(config), config, rank=1, world=4)
    with pytest.raises(ConfigError, match="saved with 2 process.*over 4 shard.*this run has 4 over 4"):
        four.load_state_dict(two.state_dict())


def test_a_stream_that_processes_cannot_share_evenly_is_refused(shards):
    folder, _ = shards
    config = stream_config(folder)
    with pytest.raises(ConfigError, match="has 4 shard.*3 processes cannot share evenly"):
        rank_batches(open_stream(config), config, rank=0, world=3)


def test_streaming_settings_that_cannot_work_fail_at_parse_time():
    from ldm.config import parse_config

    with pytest.raises(ConfigError, match="dataloader_num_workers = 2 is invalid; expected 0 with --streaming"):
        parse_config(UNetConfig, ["--streaming", "--dataloader_num_workers", "2"])
    with pytest.raises(ConfigError, match="max_train_samples = 5 is invalid"):
        parse_config(UNetConfig, ["--streaming", "--max_train_samples", "5"])
    with pytest.raises(ConfigError, match="a pretrained text encoder with --streaming"):
        parse_config(UNetConfig, ["--streaming"])  # a tokenizer trained on the captions would read it all first
    # a stream is not cached, so a random crop is allowed
    assert not parse_config(UNetConfig, ["--streaming", "--center_crop", "false", "--text_encoder_name_or_path",
                                         "openai/clip-vit-large-patch14"]).uses_caches
