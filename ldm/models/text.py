"""The text side: a CLIP tokenizer and CLIPTextModel, pretrained or built from scratch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.hub.files import find_model

MODEL_MAX_LENGTH = 77  # CLIP's context; without it truncation has no limit to cut at


def train_tokenizer(captions: Iterable[str], vocab_size: int, save_dir: str,
                    max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Train a byte-level BPE tokenizer on `captions` with CLIP's normalizer, pre-tokenizer
    and `</w>` end-of-word suffix, and save it so `CLIPTokenizer.from_pretrained` loads it.
    A `max_length` below CLIP's 77 suits short captions: attention cost grows with the context.

    Besides `tokenizer.json` it writes the classic `vocab.json` + `merges.txt` pair, which is
    what other CLIP loaders look for.
    """
    template = CLIPTokenizer(model_max_length=max_length)
    tokenizer = template.train_new_from_iterator(captions, vocab_size=vocab_size)
    tokenizer.save_pretrained(save_dir)
    tokenizer.backend_tokenizer.model.save(save_dir)
    number_alphabet_in_order(save_dir, set(tokenizer.all_special_tokens))
    return CLIPTokenizer.from_pretrained(save_dir)


def number_alphabet_in_order(save_dir: str, special_tokens: set[str]) -> None:
    """Give the single characters of a trained vocabulary their ids in sorted order.

    The BPE trainer numbers the characters it starts from in the order of a hash map, so characters
    seen equally often get other ids in another process, and the same seed trained another model.
    The merges, and the ids of what they make, do not vary.
    """
    path = os.path.join(save_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as file:
        state = json.load(file)
    vocab = state["model"]["vocab"]
    made = {"".join(pair.split(" ") if isinstance(pair, str) else pair) for pair in state["model"]["merges"]}
    alphabet = sorted(token for token in vocab if token not in made and token not in special_tokens)
    vocab.update(zip(alphabet, sorted(vocab[token] for token in alphabet)))
    with open(path, "w", encoding="utf-8") as file:
        json.dump(state, file, ensure_ascii=False)
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as file:
        json.dump(dict(sorted(vocab.items(), key=lambda item: item[1])), file, ensure_ascii=False)


def text_encoder_config(tokenizer: CLIPTokenizer, **architecture) -> CLIPTextConfig:
    """A CLIPTextConfig whose vocabulary and special ids match `tokenizer`.

    The special ids matter: CLIPTextModel pools the hidden state at the first `eos_token_id`.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **architecture,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, config_path: str) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel with the architecture in a `config.json` file."""
    architecture = CLIPTextConfig.from_json_file(config_path).to_diff_dict()
    for key in ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "model_type", "transformers_version"):
        architecture.pop(key, None)
    return CLIPTextModel(text_encoder_config(tokenizer, **architecture))


def load_text_components(name_or_path: str, revision: str | None = None):
    """Tokenizer and text encoder from a pretrained CLIP (a Hub id or a local folder).

    A diffusers pipeline folder keeps them in `tokenizer/` and `text_encoder/` subfolders;
    a plain CLIP checkpoint keeps both at its root.
    """
    is_pipeline = find_model(name_or_path, revision).is_pipeline
    tokenizer_kwargs = {"subfolder": "tokenizer"} if is_pipeline else {}
    encoder_kwargs = {"subfolder": "text_encoder"} if is_pipeline else {}
    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, revision=revision, **tokenizer_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, revision=revision, **encoder_kwargs)
    return tokenizer, text_encoder

