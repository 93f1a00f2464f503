import os

import numpy as np

from ldm.data.openmoji import cache_key, is_validation, load_openmoji


def test_size_split_and_captions(openmoji_32):
    train, validation = openmoji_32["train"], openmoji_32["validation"]
    assert len(train) + len(validation) >= 3000
    assert 0.03 < len(validation) / (len(train) + len(validation)) < 0.07
    assert not set(list(train["text"])) & set(validation["text"])
    assert all(is_validation(caption) for caption in validation["text"])
    assert not any(is_validation(caption) for caption in train["text"])
    assert "grinning face" in list(train["text"]) + list(validation["text"])
    assert not any(":" == caption[0] or "_" in caption for caption in train["text"])


def test_images_are_square_on_white_and_distinct(openmoji_32):
    train = openmoji_32["train"]
    pixels = [np.asarray(train[i]["image"]) for i in range(0, len(train), 97)]
    assert all(image.shape == (32, 32, 3) for image in pixels)
    # padding is white, not black or transparent; only glyphs that fill their box reach a corner
    white_corners = [(image[0, 0] >= 250).all() for image in pixels]
    assert sum(white_corners) > 0.8 * len(pixels)
    assert len({image.tobytes() for image in pixels}) == len(pixels)
    # colour survives: the COLR layers render, not just a black outline
    assert any(np.ptp(image.reshape(-1, 3).astype(int), axis=1).max() > 100 for image in pixels)


def test_cache_is_reused_and_keyed_by_parameters(openmoji_32, isolated_cache):
    folder = os.path.join(isolated_cache, f"openmoji-32px-{cache_key(32)}")
    stamp = os.stat(folder).st_mtime_ns
    again = load_openmoji(32)
    assert os.stat(folder).st_mtime_ns == stamp
    assert list(again["train"]["text"]) == list(openmoji_32["train"]["text"])
    assert cache_key(64) != cache_key(32)


def test_build_is_deterministic(openmoji_32, tmp_path):
    fresh = load_openmoji(32, cache_dir=str(tmp_path))
    assert list(fresh["validation"]["text"]) == list(openmoji_32["validation"]["text"])
    rows = range(0, len(fresh["train"]), 211)
    assert all(np.array_equal(np.asarray(fresh["train"][i]["image"]), np.asarray(openmoji_32["train"][i]["image"]))
               for i in rows)
    assert not [name for name in os.listdir(tmp_path) if ".partial" in name]
