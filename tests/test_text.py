import os

import torch
from transformers import CLIPTokenizer

from ldm.data.captions import tokenize
from ldm.models.text import build_text_encoder, train_tokenizer
from tests.conftest import TINY_CAPTIONS


def test_tokenizer_round_trip_through_clip_format(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for caption in TINY_CAPTIONS:
        ids = reloaded(caption).input_ids
        assert ids[0] == reloaded.bos_token_id and ids[-1] == reloaded.eos_token_id
        assert reloaded.decode(ids, skip_special_tokens=True) == caption
    # BPE merged whole training words into single tokens, not characters.
    assert len(reloaded("grinning").input_ids) == 3


def test_tokenizer_saves_vocab_and_merges(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    tiny_tokenizer.backend_tokenizer.model.save(str(tmp_path))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path))


def test_long_prompts_are_truncated_to_the_context(tiny_tokenizer):
    ids = tokenize(tiny_tokenizer, ["red heart " * 100, "cat face"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == tiny_tokenizer.eos_token_id


def test_text_encoder_from_config_matches_tokenizer(tiny_tokenizer, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
                      '"num_attention_heads": 4, "vocab_size": 5}')
    encoder = build_text_encoder(tiny_tokenizer, str(config))
    assert encoder.config.vocab_size == len(tiny_tokenizer)  # the file's vocab_size is overridden
    out = encoder(tokenize(tiny_tokenizer, ["rocket"])).last_hidden_state
    assert out.shape == (1, 77, 32) and torch.isfinite(out).all()


def test_a_tokenizer_trained_again_on_the_same_captions_has_the_same_ids(tmp_path):
    """BPE's trainer numbers equally frequent characters in hash-map order, which differs between
    trainings; train_tokenizer numbers them in sorted order, so a seed trains one model."""
    captions = [f"square {i % 6} {'red green blue'.split()[i % 3]} x{i}y" for i in range(40)]
    vocabularies = [train_tokenizer(captions, 300, str(tmp_path / str(i)), 16).get_vocab() for i in range(4)]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "0")
    assert tokenizer.convert_ids_to_tokens(tokenize(tokenizer, ["square 3 red"])[0, :4].tolist())[1:] == [
        "square</w>", "3</w>", "red</w>"]
