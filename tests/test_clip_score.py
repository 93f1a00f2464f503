"""CLIP score through torchmetrics' CLIPScore on a tiny random CLIP saved to a folder and loaded offline."""

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel

from ldm.evaluation.clip_score import clip_score, load_clip
from tests.conftest import TINY_CAPTIONS, tiny_clip_config


def images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_per_pair_scores_are_100_cosines_of_clip_embeddings(clip_folder):
    pictures, captions = images(5), TINY_CAPTIONS[:5]
    result = clip_score(pictures, captions, clip_folder)

    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder, local_files_only=True)
    with torch.no_grad():
        output = model(**processor(text=captions, images=list(pictures), return_tensors="pt", padding=True))
    expected = 100 * (output.image_embeds * output.text_embeds).sum(-1)  # CLIPModel normalises both embeddings
    assert torch.allclose(result.per_pair, expected, atol=1e-4), (result.per_pair, expected)
    assert result.count == 5 and result.score == pytest.approx(max(expected.mean().item(), 0), abs=1e-4)

    # In batches, from a model loaded once, and from floats in [0, 1] (rounded to the same uint8): the same pairs.
    loaded = load_clip(clip_folder)
    batched = clip_score(pictures.float() / 255, captions, loaded, batch_size=2)
    assert torch.allclose(batched.per_pair, result.per_pair, atol=1e-5)


def test_missing_or_wrong_folders_and_captions_fail_clearly(clip_folder, tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match=f"CLIP model folder {tmp_path / 'none'} does not exist"):
        clip_score(images(1), ["cat face"], str(tmp_path / "none"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} holds no CLIP model: it has no config.json"):
        load_clip(str(empty))
    text_only = tmp_path / "text_encoder"
    text = tiny_clip_config(tiny_tokenizer).text_config
    CLIPTextModel(CLIPTextConfig(**text.to_dict())).save_pretrained(text_only)
    with pytest.raises(ValueError, match="holds a model of type 'clip_text_model', not 'clip'"):
        load_clip(str(text_only))
    no_processor = tmp_path / "no_processor"
    CLIPModel(tiny_clip_config(tiny_tokenizer)).save_pretrained(no_processor)
    with pytest.raises(ValueError, match="has a CLIP config but its weights or processor .* do not load"):
        load_clip(str(no_processor))
    with pytest.raises(ValueError, match="one caption per image: 2 images, 1 captions"):
        clip_score(images(2), ["cat face"], clip_folder)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        clip_score(images(1).float(), ["cat face"], clip_folder)
