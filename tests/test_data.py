import csv
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import ConfigError
from ldm.data.config import DataConfig
from ldm.data.dataset import (
    ImageCaptionDataset,
    ImageTransform,
    SkipCounter,
    dataloader,
    load_splits,
    open_rgb,
    row_random,
)


def save_modes(folder):
    """One image per awkward mode, each a known colour, written as real files."""
    folder.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (40, 24), (255, 0, 0))
    Image.new("L", (20, 20), 128).save(folder / "grey.png")
    Image.new("LA", (20, 20), (0, 0)).save(folder / "grey_clear.png")  # fully transparent black
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(folder / "rgba_clear.png")  # transparent blue
    red.convert("P").save(folder / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(folder / "deep.png")  # I;16 white
    return {"grey.png": (128, 128, 128), "grey_clear.png": (255, 255, 255), "rgba_clear.png": (255, 255, 255),
            "palette.png": (255, 0, 0), "cmyk.jpg": (255, 0, 0), "deep.png": (255, 255, 255)}


def save_broken(folder):
    good = folder / "grey.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:40])
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    return ["truncated.png", "empty.png", "garbage.jpg"]


def write_metadata(folder, names, fmt="jsonl"):
    rows = [{"file_name": name, "text": f"picture {name}"} for name in names]
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)


def iterate(config, rows, epoch=0):
    dataset = ImageCaptionDataset.from_config(rows, config)
    dataset.set_epoch(epoch)
    counter, batches = SkipCounter(), []
    for batch in dataloader(dataset, batch_size=4, shuffle=False):
        counter.update(batch)
        batches.append(batch)
    return batches, counter


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_with_every_mode_and_broken_files(tmp_path, fmt):
    colours = save_modes(tmp_path)
    broken = save_broken(tmp_path)
    write_metadata(tmp_path, list(colours) + broken, fmt)
    config = DataConfig(train_data_dir=str(tmp_path), resolution=8, validation_fraction=0)
    train, _ = load_splits(config)
    batches, counter = iterate(config, train)

    assert len(counter.rows) == len(broken)
    assert "skipped 3 unreadable image(s)" in counter.report()
    seen = {}
    for batch in batches:
        for index, pixels, caption in zip(batch["indices"], batch["pixel_values"], batch["captions"]):
            name = caption.removeprefix("picture ")
            seen[name] = tuple(((pixels[:, 4, 4] + 1) * 127.5).round().int().tolist())
    assert set(seen) == set(colours)
    for name, colour in colours.items():
        assert np.allclose(seen[name], colour, atol=3), (name, seen[name], colour)


def test_hub_style_dataset_repository(tmp_path):
    """A dataset id resolves through datasets.load_dataset, here on a local repository folder."""
    images = [Image.new("RGB", (12, 12), (i * 40, 0, 0)) for i in range(5)]
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"img": images, "caption": [[f"red {i}", f"crimson {i}"] for i in range(5)]},
                                       features=features)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    config = DataConfig(dataset_name=str(tmp_path / "repo"), image_column="img", caption_column="caption",
                        resolution=8, validation_fraction=0.4)
    train, validation = load_splits(config)
    assert (len(train), len(validation)) == (3, 2)
    epochs = [iterate(config, train, epoch)[0][0]["captions"] for epoch in range(6)]
    picked = {caption.split()[0] for captions in epochs for caption in captions}
    assert picked == {"red", "crimson"}  # one of several captions, chosen anew each epoch
    assert iterate(config, train, 3)[0][0]["captions"] == epochs[3]  # and the same again for the same epoch


def test_missing_columns_list_the_real_ones(tmp_path):
    save_modes(tmp_path)
    write_metadata(tmp_path, ["grey.png", "palette.png"])
    message = "caption_column 'prompt' is not in the dataset; its columns are: image, text"
    with pytest.raises(ConfigError, match=message):
        load_splits(DataConfig(train_data_dir=str(tmp_path), caption_column="prompt"))
    with pytest.raises(ConfigError, match="image_column 'pixels'"):
        load_splits(DataConfig(train_data_dir=str(tmp_path), image_column="pixels"))


def test_openmoji_is_the_default_source(openmoji_32):
    train, validation = load_splits(DataConfig(resolution=32))
    assert len(train) == len(openmoji_32["train"]) and len(validation) == len(openmoji_32["validation"])
    assert open_rgb(train[0]["image"]).size == (32, 32)


def test_transform_resizes_crops_scales_and_flips():
    picture = Image.new("RGB", (60, 30), (255, 255, 255))
    picture.paste((0, 0, 0), (0, 0, 30, 30))  # left half black
    transform = ImageTransform(resolution=16, center_crop=True)
    tensor = transform(picture)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    assert tensor[0, 8, 0] == -1.0 and tensor[0, 8, 15] == 1.0  # centre crop straddles the edge
    flipped = transform(picture, flip=True)
    assert torch.equal(flipped, tensor.flip(-1))
    crops = {ImageTransform(16, center_crop=False).crop_box((32, 16), row_random(0, epoch, 5)) for epoch in range(20)}
    assert len(crops) > 1


def test_a_file_named_by_url_is_read_like_a_streamed_dataset_s_remote_file():
    """A stream of image files yields their URLs (hf://...); they are read through fsspec, here
    from its in-memory filesystem."""
    import fsspec

    with fsspec.open("memory://streamed/green.png", "wb") as f:
        Image.new("RGB", (4, 4), (0, 255, 0)).save(f, format="PNG")
    picture = open_rgb({"path": "memory://streamed/green.png", "bytes": None})
    assert picture.getpixel((0, 0)) == (0, 255, 0)
