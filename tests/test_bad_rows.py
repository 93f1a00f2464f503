"""Rows a real dataset has, tried as a new user would: null, numeric, empty and 10,000-character
captions, lists of captions holding a null, a missing image file, a file that is not an image, an
image column holding numbers, duplicate rows, and a column of mixed types. Each is a real
metadata.jsonl on disk, read by both trainers and the cache build; none may end in a traceback."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import train_unet
import train_vae

# chaos as a module of bench/, not with bench/ first on sys.path: there, bench/onnx.py would shadow the
# onnx package that torch.onnx.export imports (and test_onnx.py's exports fail).
from bench import chaos
from ldm.config import ConfigError
from ldm.data.captions import caption_list
from tests.test_train_vae import tiny_vae_json  # noqa: F401 (a fixture)
from tests.test_training import fresh_accelerator_state  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

LONG = "very " * 2000  # 10,000 characters: longer than any tokenizer's context


def write_rows(folder, rows, images=8):
    """`images` coloured squares 0.png... and a metadata.jsonl of `rows` (each written as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        array = np.full((16, 16, 3), 255, np.uint8)
        array[4:12, 4:12] = rng.integers(0, 256, 3)
        Image.fromarray(array).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def good_rows(count=8):
    return [{"file_name": f"{i}.png", "text": f"square {i}"} for i in range(count)]


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    """Good rows plus: a null, an empty and a 10,000-character caption, a missing file, a text file
    named .png, and two duplicated rows."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "notes.png").write_text("this is not an image")
    rows = good_rows() + [{"file_name": "0.png", "text": None}, {"file_name": "1.png", "text": ""},
                          {"file_name": "2.png", "text": LONG}, {"file_name": "gone.png", "text": "a missing file"},
                          {"file_name": "notes.png", "text": "not an image"}] + good_rows()[:2]
    return write_rows(folder, rows)


@pytest.fixture(scope="module")
def numeric_captions(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("numeric"), [{**row, "text": i} for i, row in enumerate(good_rows())])


@pytest.fixture(scope="module")
def caption_lists(tmp_path_factory):
    rows = [{**row, "text": [row["text"], None]} for row in good_rows()]
    rows[0]["text"] = [None]
    return write_rows(tmp_path_factory.mktemp("lists"), rows)


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("models"))
    chaos.write_models(folder)
    return folder


def vae_flags(data, output_dir, vae_json, *extra):
    return ["--train_data_dir", data, "--output_dir", str(output_dir), "--vae_config", vae_json, "--resolution", "16",
            "--train_batch_size", "4", "--max_train_steps", "4", "--validation_fraction", "0", "--report_to", "none",
            "--checkpointing_steps", "100", "--validation_steps", "100", *extra]


def unet_flags(data, output_dir, parts, *extra):
    return ["--train_data_dir", data, "--output_dir", str(output_dir), "--resolution", "16",
            "--pretrained_vae_model_name_or_path", os.path.join(parts, "vae"),
            "--unet_config", os.path.join(parts, "unet.json"),
            "--text_encoder_config", os.path.join(parts, "text_encoder.json"), "--tokenizer_vocab_size", "300",
            "--tokenizer_max_length", "16", "--train_batch_size", "4", "--max_train_steps", "4",
            "--validation_fraction", "0", "--report_to", "none", "--checkpointing_steps", "100",
            "--validation_steps", "100", "--validation_prompts", "square 1", "--validation_inference_steps", "1",
            *extra]


def test_captions_are_read_as_the_readme_says():
    assert caption_list(None) == [""]  # the empty prompt: an unconditional example, as caption dropout makes
    assert caption_list("") == [""]
    assert caption_list(42) == ["42"] and caption_list(2.5) == ["2.5"]
    assert caption_list(["a cat", None, "a dog"]) == ["a cat", "a dog"]
    assert caption_list([None]) == caption_list([]) == [""]


def test_the_vae_trains_past_every_bad_row_and_counts_the_unreadable_images(mixed_rows, tiny_vae_json, tmp_path):
    result = train_vae.main(vae_flags(mixed_rows, tmp_path / "vae", tiny_vae_json))
    assert result["global_step"] == 4
    assert result["unreadable_images"] == [11, 12]  # rows of gone.png and notes.png, counted once each


@pytest.mark.parametrize("cache", ["cached", "encoded in the step"])
def test_the_unet_trains_past_every_bad_row_and_counts_the_unreadable_images(mixed_rows, parts_dir, tmp_path,
                                                                           isolated_cache, cache):
    flags = ["--cache_dir", str(tmp_path / "cache")] if cache == "cached" else ["--cache_latents", "false"]
    result = train_unet.main(unet_flags(mixed_rows, tmp_path / "unet", parts_dir, *flags))
    assert result["global_step"] == 4 and result["unreadable_images"] == 2
    vocabulary = json.load(open(tmp_path / "unet" / "tokenizer" / "vocab.json"))
    assert "very</w>" in vocabulary  # the long caption reached the tokenizer, and was cut to its context


@pytest.mark.parametrize("data", ["numeric_captions", "caption_lists"])
def test_numeric_captions_and_lists_holding_a_null_train_both_models(data, parts_dir, tiny_vae_json, tmp_path,
                                                                    request):
    folder = request.getfixturevalue(data)
    assert train_vae.main(vae_flags(folder, tmp_path / "vae", tiny_vae_json))["unreadable_images"] == []
    result = train_unet.main(unet_flags(folder, tmp_path / "unet", parts_dir, "--cache_dir", str(tmp_path / "c")))
    assert result["unreadable_images"] == 0
    vocabulary = json.load(open(tmp_path / "unet" / "tokenizer" / "vocab.json"))
    if data == "numeric_captions":
        assert "7</w>" in vocabulary  # the number 7 is the caption "7", not an empty one


def test_an_image_column_of_numbers_stops_with_a_clear_error(tmp_path, parts_dir, tiny_vae_json):
    folder = write_rows(tmp_path / "ids", [{**row, "id": i} for i, row in enumerate(good_rows())])
    message = "image_column 'id' holds int64 values, not images, paths or bytes"
    with pytest.raises(ConfigError, match=message):
        train_vae.main(vae_flags(folder, tmp_path / "vae", tiny_vae_json, "--image_column", "id"))
    with pytest.raises(ConfigError, match=message):
        train_unet.main(unet_flags(folder, tmp_path / "unet", parts_dir, "--image_column", "id"))


def test_a_column_of_mixed_types_stops_with_arrow_s_reason(tmp_path, tiny_vae_json):
    folder = write_rows(tmp_path / "mixed", good_rows() + [{"file_name": "1.png", "text": 42}])
    with pytest.raises(ConfigError, match=r"cannot be read: JSON parse error: Column\(/text\) changed from string to "
                                          r"number in row 8\. Each column must hold one type"):
        train_vae.main(vae_flags(folder, tmp_path / "vae", tiny_vae_json))
