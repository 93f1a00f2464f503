"""The chunked latent and text caches: contents, keys, chunking, fp16, crash safety, multi-process
builds, and reading with flat memory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm.data.caches import CachedRows, load_or_build_latents, load_or_build_texts
from ldm.data.captions import tokenize
from ldm.data.chunks import MANIFEST, ChunkShuffle, chunk_file
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, load_splits, row_random
from tests.conftest import two_processes
from tests.test_data import save_broken, save_modes, write_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("single_thread")


def small_dataset(samples=12, flip=False):
    config = DataConfig(resolution=32, max_train_samples=samples, random_flip=flip)
    train, _ = load_splits(config)
    return ImageCaptionDataset.from_config(train, config, train=False)


def tensors(cache, name, rows=None):
    """A cache column as one tensor, (rows, *shape), read through the same path training uses."""
    rows = list(range(len(cache))) if rows is None else rows
    return cache.tensor(cache.take(rows).column(name), name)


def test_latent_cache_hit_and_contents(openmoji_32, tiny_vae, tmp_path):
    dataset = small_dataset()
    first = load_or_build_latents(tiny_vae, dataset, random_flip=False, cache_root=str(tmp_path), dtype="float32",
                                  chunk_rows=5)
    again = load_or_build_latents(tiny_vae, dataset, random_flip=False, cache_root=str(tmp_path), dtype="float32",
                                  chunk_rows=5)
    assert first.built and not again.built and again.folder == first.folder
    assert first.encoded_now == 3 and again.encoded_now == 0 and again.chunk_rows == [5, 5, 2]
    mean = tensors(again, "mean")
    assert mean.shape == (12, 1, 4, 16, 16) and mean.dtype == torch.float32
    with torch.no_grad():
        posterior = tiny_vae.encode(dataset[7]["pixel_values"][None]).latent_dist
    torch.testing.assert_close(mean[7, 0], posterior.mean[0])
    torch.testing.assert_close(tensors(again, "std")[7, 0], posterior.std[0])
    assert again.take([7]).column("captions").to_pylist() == [[dataset.rows[7]["text"]]]
    assert again.take([7]).column("row").to_pylist() == [7]


def test_latent_cache_is_rebuilt_when_an_input_changes(openmoji_32, tiny_vae, tmp_path):
    root = str(tmp_path)
    base = load_or_build_latents(tiny_vae, small_dataset(), random_flip=False, cache_root=root)
    flipped = load_or_build_latents(tiny_vae, small_dataset(flip=True), random_flip=True, cache_root=root,
                                    dtype="float32")
    assert flipped.built and flipped.shapes["mean"][0] == 2
    with torch.no_grad():
        expected = tiny_vae.encode(small_dataset()[0]["pixel_values"].flip(-1)[None]).latent_dist.mean[0]
    torch.testing.assert_close(tensors(flipped, "mean")[0, 1], expected)
    assert load_or_build_latents(tiny_vae, small_dataset(samples=10), random_flip=False, cache_root=root).built
    assert load_or_build_latents(tiny_vae, small_dataset(), random_flip=False, cache_root=root, chunk_rows=4).built
    with torch.no_grad():
        tiny_vae.encoder.conv_in.weight.add_(0.01)
    changed = load_or_build_latents(tiny_vae, small_dataset(), random_flip=False, cache_root=root)
    assert changed.built and changed.folder != base.folder
    assert not torch.equal(tensors(changed, "mean"), tensors(base, "mean"))


def test_manifest_counts_rows_bytes_and_unreadable_images(tmp_path, tiny_vae):
    """Unreadable images are left out of their chunk and counted; the manifest has every chunk's
    rows, skips and bytes, and the tensors take no more room than their payload."""
    save_modes(tmp_path / "data")
    broken = save_broken(tmp_path / "data")
    names = sorted(os.listdir(tmp_path / "data"))
    write_metadata(tmp_path / "data", names)
    config = DataConfig(train_data_dir=str(tmp_path / "data"), resolution=32, validation_fraction=0)
    train, _ = load_splits(config)
    dataset = ImageCaptionDataset.from_config(train, config, train=False)
    cache = load_or_build_latents(tiny_vae, dataset, False, str(tmp_path / "cache"), chunk_rows=4)
    with open(os.path.join(cache.folder, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["dtype"] == "float16" and manifest["chunk_rows"] == 4 and manifest["inputs"]["dtype"] == "float16"
    assert os.path.basename(cache.folder) == f"latents-{manifest['key']}"
    assert [c["file"] for c in manifest["chunks"]] == [chunk_file(k) for k in range(3)]
    assert cache.skipped == len(broken) and len(cache) == len(names) - len(broken) == manifest["rows"]
    readable = [train[row]["text"] for row in range(len(train))
                if train[row]["image"]["path"].rsplit("/", 1)[-1] not in broken]
    assert [c[0] for c in cache.take(list(range(len(cache)))).column("captions").to_pylist()] == readable
    for chunk in manifest["chunks"]:
        assert chunk["bytes"] == os.path.getsize(os.path.join(cache.folder, chunk["file"]))
        tensor_bytes = chunk["rows"] * 2 * 4 * 16 * 16 * 2  # mean and std, fp16
        assert chunk["payload_bytes"] >= tensor_bytes and (chunk["payload_bytes"] == 0) == (chunk["rows"] == 0)
    assert 0 in cache.chunk_rows  # a chunk of unreadable images only is a chunk of no rows
    assert not [name for name in os.listdir(cache.folder) if "partial" in name]


def test_float16_round_trip_of_real_latents_and_embeddings(openmoji_32, tiny_vae, tiny_tokenizer,
                                                           tiny_text_encoder, tmp_path):
    dataset = small_dataset(flip=True)
    caches = {dtype: (load_or_build_latents(tiny_vae, dataset, True, str(tmp_path), dtype=dtype),
                      load_or_build_texts(tiny_tokenizer, tiny_text_encoder, dataset.rows, "text", str(tmp_path),
                                          dtype=dtype))
              for dtype in ("float16", "float32")}
    (half_latents, half_texts), (full_latents, full_texts) = caches["float16"], caches["float32"]
    assert half_latents.folder != full_latents.folder and half_texts.folder != full_texts.folder
    pairs = [(tensors(half_latents, name), tensors(full_latents, name)) for name in ("mean", "std")]
    embeddings = [cache.tensor(cache.take(list(range(12))).column("embeddings").combine_chunks().flatten(),
                               "embeddings") for cache in (half_texts, full_texts)]
    for half, full in pairs + [tuple(embeddings)]:
        assert half.dtype == torch.float16 and full.dtype == torch.float32
        assert torch.isfinite(half).all()
        # relative 1e-3 (float16 rounds to 2^-11), and half a step where float16 goes subnormal
        assert ((half.float() - full).abs() <= 1e-3 * full.abs() + 2 ** -25).all()
    assert os.path.getsize(os.path.join(half_latents.folder, chunk_file(0))) < 0.6 * os.path.getsize(
        os.path.join(full_latents.folder, chunk_file(0)))


def test_float16_overflow_stops_the_build_and_names_the_way_out(openmoji_32, tiny_vae, tmp_path):
    with torch.no_grad():
        tiny_vae.quant_conv.bias.fill_(1e5)  # the posterior's means, far beyond float16's 65504
    with pytest.raises(ValueError, match="beyond float16's range; rebuild the cache with --cache_dtype float32"):
        load_or_build_latents(tiny_vae, small_dataset(), False, str(tmp_path))
    cache = load_or_build_latents(tiny_vae, small_dataset(), False, str(tmp_path), dtype="float32")
    assert tensors(cache, "mean").max() > 65504


def test_text_cache_rows_follow_the_source_rows(tiny_tokenizer, tiny_text_encoder, tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"text": [["cat face", "dog face"], ["red heart"], [], [None, "rocket"]]})
    first = load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, "text", str(tmp_path), dtype="float32",
                                chunk_rows=3)
    again = load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, "text", str(tmp_path), dtype="float32",
                                chunk_rows=3)
    assert first.built and not again.built and again.chunk_rows == [3, 1]
    lists = again.take([0, 1, 2, 3]).column("embeddings").combine_chunks()
    # no caption is the empty prompt; a null among several is left out
    assert [len(row) for row in lists.to_pylist()] == [2, 1, 1, 1]
    with torch.no_grad():
        expected = tiny_text_encoder(tokenize(tiny_tokenizer, ["cat face", "dog face", "red heart", "",
                                                               "rocket"]))[0]
    torch.testing.assert_close(again.tensor(lists.flatten(), "embeddings"), expected)
    with torch.no_grad():
        next(tiny_text_encoder.parameters()).add_(1.0)
    assert load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, "text", str(tmp_path)).built


def test_cached_rows_draw_flips_and_captions_from_seed_epoch_and_row(openmoji_32, tiny_vae, tiny_tokenizer,
                                                                      tiny_text_encoder, tmp_path):
    """A batch holds, for each row, the flip and the caption that row_random(seed, epoch, row)
    chooses, whichever other rows it is fetched with; with a text cache, that caption's embedding."""
    import datasets

    config = DataConfig(resolution=32, max_train_samples=12, random_flip=True)
    train, _ = load_splits(config)
    train = train.map(lambda row, i: {"text": [row["text"], f"alt {i}", f"other {i}"]}, with_indices=True)
    dataset = ImageCaptionDataset.from_config(train, config, train=False)
    latents = load_or_build_latents(tiny_vae, dataset, True, str(tmp_path), dtype="float32", chunk_rows=5)
    texts = load_or_build_texts(tiny_tokenizer, tiny_text_encoder, train, "text", str(tmp_path), dtype="float32")
    plain, embedded = CachedRows(latents, None, seed=3), CachedRows(latents, texts, seed=3)
    for rows in (plain, embedded):
        rows.set_epoch(2)
    batch, with_text = plain.__getitems__([9, 2, 5]), embedded.__getitems__([9, 2, 5])
    alone = plain.__getitems__([2])
    torch.testing.assert_close(batch["mean"][1], alone["mean"][0])
    assert batch["captions"][1] == alone["captions"][0]
    means = tensors(latents, "mean")
    for position, row in enumerate([9, 2, 5]):
        rng = row_random(3, 2, row)
        flip = rng.randrange(2)
        caption = train[row]["text"][rng.randrange(3)]
        torch.testing.assert_close(batch["mean"][position], means[row, flip])
        assert batch["captions"][position] == caption
        with torch.no_grad():
            expected = tiny_text_encoder(tokenize(tiny_tokenizer, [caption]))[0][0]
        torch.testing.assert_close(with_text["embeddings"][position], expected, rtol=1e-5, atol=1e-5)
    assert isinstance(train, datasets.Dataset) and "captions" not in with_text


def test_chunk_shuffle_covers_every_row_with_memory_bounded_by_its_window():
    """Every row once per epoch, in an order fixed by (seed, epoch); rows are shuffled within
    windows of whole chunks of about `window_rows`, so a chunk's rows all lie within one window."""
    sizes = [7, 3, 8, 8, 1, 8]
    sampler = ChunkShuffle(sizes, seed=0, window_rows=10)
    starts = np.cumsum(sizes) - sizes
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(sum(sizes))) and len(sampler) == len(order)
        for start, size in zip(starts, sizes):
            places = [order.index(row) for row in range(start, start + size)]
            assert max(places) - min(places) < 10 + max(sizes)
        orders.append(order)
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert list(ChunkShuffle(sizes, seed=1)) != list(ChunkShuffle(sizes, seed=0))
    whole = ChunkShuffle(sizes, seed=0)  # the default window holds every chunk here: a full shuffle
    assert max(list(whole)[:8]) > 8


def test_a_killed_build_keeps_its_whole_chunks_and_a_rerun_encodes_only_the_rest(openmoji_32, tmp_path):
    """SIGKILL in the middle of writing the third chunk: the two whole chunks stay untouched and the
    rerun encodes the three missing ones; the result equals an uninterrupted build, bit for bit."""
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "kill"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = [p for p in (tmp_path / "a").iterdir() if p.name.startswith("latents-")]
    whole = sorted(name for name in os.listdir(folder) if name.endswith(".arrow"))
    assert whole == [chunk_file(0), chunk_file(1)] and not os.path.exists(folder / MANIFEST)
    assert [name for name in os.listdir(folder) if ".partial-" in name]  # the chunk it was writing
    stamps = {name: os.stat(folder / name).st_mtime_ns for name in whole}
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.splitlines()[-1])["encoded_now"] == 3
    assert {name: os.stat(folder / name).st_mtime_ns for name in whole} == stamps
    assert not [name for name in os.listdir(folder) if ".partial-" in name]
    straight = subprocess.run([sys.executable, str(script), str(tmp_path / "b")], env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert_same_cache_files(folder, tmp_path / "b" / folder.name)


def assert_same_cache_files(one, other):
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(other))
    for name in names:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


def test_two_processes_build_the_same_caches_as_one(openmoji_32, tiny_tokenizer, tmp_path):
    """Chunks by global row index: two processes (torchrun over gloo) each encode only their own
    chunks, and the latent and text caches equal a one-process build, bit for bit."""
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "ACCELERATE_USE_CPU": "true", "TOKENIZER": str(tmp_path / "tokenizer")}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "texts"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*two_processes(11), str(script), str(tmp_path / "two"), "texts"],
        env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = sorted((json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["process"])
    assert [r["encoded_now"] for r in reports] == [3, 2]  # chunks 0, 2, 4 and 1, 3 of 5
    assert [r["text_encoded_now"] for r in reports] == [2, 2]
    for folder in os.listdir(tmp_path / "one"):
        if folder.startswith(("latents-", "texts-")):
            assert_same_cache_files(tmp_path / "one" / folder, tmp_path / "two" / folder)


@pytest.mark.parametrize("mode,message", [
    ("fail", "another process failed while building the cache"),
    ("unshared", "--cache_dir must be a folder that every machine shares")])
def test_a_failed_or_unshared_build_stops_every_process_instead_of_hanging(openmoji_32, tmp_path, mode, message):
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(
        [*two_processes(len(mode)), str(script), str(tmp_path / "c"), mode],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr
    assert "the encoder ran out of memory" in done.stderr or mode != "fail"  # the failing process says why


BUILD_SCRIPT = '''
"""Build the latent (and text) cache of 20 OpenMoji rows in chunks of 4 under argv[1], with
tests/conftest.py's tiny models (and the text cache with the tokenizer saved at $TOKENIZER, for
"texts"); "kill" SIGKILLs the process while it writes its third chunk."""
import json, os, signal, sys
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer
import ldm.data.caches as caches
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, load_splits
from ldm.models.text import text_encoder_config
from ldm.training.loop import finish_training
from tests.conftest import TINY_TEXT_ENCODER, TINY_VAE

root, mode = sys.argv[1], sys.argv[2:]
state = Accelerator()  # honours ACCELERATE_USE_CPU, as the trainers do
if "unshared" in mode:  # as if each machine had its own --cache_dir
    root = os.path.join(root, f"machine{state.process_index}")
torch.manual_seed(0)
vae = AutoencoderKL.from_config(TINY_VAE).eval()
config = DataConfig(resolution=32, max_train_samples=20, random_flip=True)
train, _ = load_splits(config)
dataset = ImageCaptionDataset.from_config(train, config, train=False)
if "fail" in mode and state.process_index == 1:
    def failing(*args):
        raise ValueError("the encoder ran out of memory")
        yield
    caches.encode_latents = failing
if "kill" in mode:
    encode, calls = caches.encode_latents, []
    def dying(*args):
        calls.append(1)
        for number, table in enumerate(encode(*args)):
            if len(calls) == 3 and number == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield table
    caches.encode_latents = dying
cache = caches.load_or_build_latents(vae, dataset, True, root, chunk_rows=4, batch_size=2, processes=state)
report = {"process": state.process_index, "encoded_now": cache.encoded_now}
if "texts" in mode:
    tokenizer = CLIPTokenizer.from_pretrained(os.environ["TOKENIZER"])
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_ENCODER)).eval()
    texts = caches.load_or_build_texts(tokenizer, encoder, train, "text", root, chunk_rows=6, processes=state)
    report["text_encoded_now"] = texts.encoded_now
# one write, one line: under PYTHONUNBUFFERED, print() writes the text and its newline separately,
# and the two processes' lines could interleave
sys.stdout.write(json.dumps(report) + "\\n")
finish_training(state)  # a barrier, then the process group closed, as the trainers end
'''
