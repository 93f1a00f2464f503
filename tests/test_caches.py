import torch

from ldm.caches import load_or_build_latents, load_or_build_texts
from ldm.config import DataConfig
from ldm.data import ImageCaptionDataset, load_splits
from ldm.text import tokenize


def small_dataset(samples=12, flip=False):
    config = DataConfig(resolution=32, max_train_samples=samples, random_flip=flip)
    train, _ = load_splits(config)
    return ImageCaptionDataset.from_config(train, config, train=False)


def test_latent_cache_hit_and_contents(openmoji_32, tiny_vae, tmp_path):
    dataset = small_dataset()
    first = load_or_build_latents(tiny_vae, dataset, random_flip=False, cache_root=str(tmp_path))
    again = load_or_build_latents(tiny_vae, dataset, random_flip=False, cache_root=str(tmp_path))
    assert first.built and not again.built and again.folder == first.folder
    assert torch.equal(first.mean, again.mean) and again.mean.shape == (12, 1, 4, 16, 16)
    with torch.no_grad():
        posterior = tiny_vae.encode(dataset[3]["pixel_values"][None]).latent_dist
    torch.testing.assert_close(again.mean[3, 0], posterior.mean[0])
    torch.testing.assert_close(again.std[3, 0], posterior.std[0])
    assert again.captions[3] == dataset.rows[3]["text"]


def test_latent_cache_is_rebuilt_when_an_input_changes(openmoji_32, tiny_vae, tmp_path):
    root = str(tmp_path)
    base = load_or_build_latents(tiny_vae, small_dataset(), random_flip=False, cache_root=root)
    flipped = load_or_build_latents(tiny_vae, small_dataset(flip=True), random_flip=True, cache_root=root)
    assert flipped.built and flipped.mean.shape[1] == 2
    with torch.no_grad():
        expected = tiny_vae.encode(small_dataset()[0]["pixel_values"].flip(-1)[None]).latent_dist.mean[0]
    torch.testing.assert_close(flipped.mean[0, 1], expected)
    assert load_or_build_latents(tiny_vae, small_dataset(samples=10), random_flip=False, cache_root=root).built
    with torch.no_grad():
        tiny_vae.encoder.conv_in.weight.add_(0.01)
    changed = load_or_build_latents(tiny_vae, small_dataset(), random_flip=False, cache_root=root)
    assert changed.built and changed.folder != base.folder
    assert not torch.equal(changed.mean, base.mean)


def test_text_cache_hit_lookup_and_empty_prompt(tiny_tokenizer, tiny_text_encoder, tmp_path):
    rows = ["red heart", ["cat face", "dog face"], "red heart"]
    first = load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, str(tmp_path))
    again = load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, str(tmp_path))
    assert first.built and not again.built
    assert set(again.index) == {"", "red heart", "cat face", "dog face"}
    with torch.no_grad():
        expected = tiny_text_encoder(tokenize(tiny_tokenizer, ["dog face", ""]))[0]
    torch.testing.assert_close(again.lookup(["dog face"]), expected[:1])
    torch.testing.assert_close(again.empty, expected[1:])
    with torch.no_grad():
        next(tiny_text_encoder.parameters()).add_(1.0)
    assert load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows, str(tmp_path)).built
    assert load_or_build_texts(tiny_tokenizer, tiny_text_encoder, rows + ["rocket"], str(tmp_path)).built
