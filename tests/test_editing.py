"""Image-to-image and inpainting: the same images as diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline loaded on the same components, and the checks before any work."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.test_pipeline import NEGATIVES, PROMPTS, both_pipelines, sd_v1_config

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLERS = ["ddim", "euler_a", "dpm++2m_karras"]


def picture(size: int, seed: int = 0) -> Image.Image:
    """A smooth colour picture with some texture: gradients plus noise, like a photo, not a flat fill."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    channels = [np.sin(3 * x + 1), np.cos(4 * y), x * y]
    pixels = np.stack(channels, -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (size, size, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def square_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def generators(count: int, seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def both_draw(ours, theirs, generator_list: bool, **args):
    """Each pipeline's images from fresh, identically seeded generators."""
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=6,
                guidance_scale=6.0, **args)
    draws = []
    for pipe in (ours, theirs):
        generator = generators(4) if generator_list else torch.Generator().manual_seed(7)
        draws.append(np.asarray(pipe(**args, generator=generator).images, dtype=np.float32))
    return draws


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_image_to_image_draws_as_stable_diffusion_img2img(name, strength, tiny_components, tiny_scheduler):
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), name, StableDiffusionImg2ImgPipeline)
    a, b = both_draw(ours, theirs, generator_list=True, image=picture(16), strength=strength, output_type="np")
    assert a.shape == (4, 16, 16, 3)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a[0] - a[1]).max() > 1e-3  # each image its own draw


@pytest.mark.parametrize("name", [*SAMPLERS, "heun", "euler", "lms", "unipc"])
@pytest.mark.filterwarnings("ignore:You have passed 4 text prompts:FutureWarning")  # diffusers' own, on one image
def test_image_to_image_with_one_generator_draws_as_diffusers(name, tiny_components, tiny_scheduler):
    """Also the samplers that keep a step index (Heun repeats its timesteps) start where the edit starts."""
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), name, StableDiffusionImg2ImgPipeline)
    a, b = both_draw(ours, theirs, generator_list=False, image=picture(16), strength=0.75, output_type="np")
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("generator_list", [True, False])
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_inpainting_draws_as_stable_diffusion_inpaint(name, strength, generator_list, tiny_components,
                                                      tiny_scheduler):
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), name, StableDiffusionInpaintPipeline)
    a, b = both_draw(ours, theirs, generator_list=generator_list, image=picture(16),
                     mask_image=square_mask(16, (4, 4, 12, 10)), strength=strength, output_type="np")
    assert a.shape == (4, 16, 16, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_inpainting_a_crop_around_the_mask_draws_as_diffusers(name, strength, tiny_components, tiny_scheduler):
    """padding_mask_crop: the crop around the mask is drawn at the model's size and pasted back."""
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), name, StableDiffusionInpaintPipeline)
    image, mask = picture(40), square_mask(40, (20, 8, 30, 16))
    a, b = both_draw(ours, theirs, generator_list=name != "ddim", image=image, mask_image=mask, strength=strength,
                     padding_mask_crop=2)
    assert a.shape == (4, 40, 40, 3)
    assert np.abs(a - b).max() <= 1e-4 * 255  # PIL images: 8-bit pixel values


def test_a_crop_keeps_every_pixel_outside_the_mask(tiny_components):
    pipe = LatentDiffusionPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    image, mask = picture(40), square_mask(40, (20, 8, 30, 16))
    drawn = pipe("red heart", image=image, mask_image=mask, padding_mask_crop=2, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    original, result, outside = np.asarray(image), np.asarray(drawn), np.asarray(mask) == 0
    assert drawn.size == image.size
    np.testing.assert_array_equal(result[outside], original[outside])
    assert np.abs(result[~outside].astype(int) - original[~outside]).mean() > 5  # the mask was redrawn


def test_inpainting_keeps_the_unmasked_latents_and_redraws_the_masked(tiny_components):
    """Without a crop, the blend is in latent space: the kept region decodes close to the original,
    the masked one does not."""
    pipe = LatentDiffusionPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    image, mask = picture(16), square_mask(16, (0, 0, 8, 16))  # left half repainted
    args = dict(prompt="red heart", image=image, num_inference_steps=4, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    edited = pipe(**args, mask_image=mask).images
    original = pipe.encode_image(pipe.image_processor.preprocess(image), torch.Generator().manual_seed(0))
    kept, repainted = edited[..., 4:] - original[..., 4:], edited[..., :4] - original[..., :4]
    assert kept.abs().max() == 0  # after the last step, the clean image latents outside the mask
    assert repainted.abs().mean() > 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0.0), "strength must be in (0, 1], got 0.0"),
    (dict(strength=1.5), "strength must be in (0, 1], got 1.5"),
    (dict(strength=0.1), "strength 0.1 of 4 steps leaves 0 steps to run"),
    (dict(image=picture(1)), "`image` is 1×1 pixels, smaller than one latent pixel (2×2)"),
    (dict(mask_image=square_mask(12, (0, 0, 4, 4))), "`mask_image` is 12×12 pixels but `image` is 16×16"),
    (dict(image=None, mask_image=square_mask(16, (0, 0, 4, 4))), "`mask_image` applies to an edit of an image"),
    (dict(image=None, strength=0.5), "`strength` applies to an edit of an image"),
    (dict(padding_mask_crop=4), "`padding_mask_crop` crops around the mask: pass `mask_image=` too"),
    (dict(image=[picture(16), picture(16)]), "`image` must be one image"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "not both"),
    (dict(image=picture(16).convert("RGBA")), "`image` is a RGBA image; pass an RGB one"),
    (dict(image=torch.zeros(4, 16, 16)), "`image` has 4 channels; it must have 3"),
    (dict(image=np.zeros((16, 16))), "`image` must be one image"),
    (dict(mask_image=torch.zeros(3, 16, 16)), "`mask_image` has 3 channels; it must have 1"),
    (dict(mask_image=square_mask(16, (0, 0, 0, 0)), padding_mask_crop=2), "`mask_image` is black everywhere"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
])
def test_bad_edit_inputs_fail_before_any_model_runs(kwargs, message, tiny_components):
    pipe = LatentDiffusionPipeline(**tiny_components)
    calls = []
    for model in (pipe.vae.encoder, pipe.text_encoder, pipe.unet):  # none may run
        model.register_forward_pre_hook(lambda *args: calls.append(1))
    args = dict(prompt="red heart", image=picture(16), num_inference_steps=4)
    with pytest.raises(ValueError) as raised:
        pipe(**{**args, **kwargs})
    assert message in str(raised.value)
    assert not calls
    pipe.set_progress_bar_config(disable=True)
    pipe(**args)
    assert calls  # the hooks do see a run
