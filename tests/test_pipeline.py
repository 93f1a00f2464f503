import json
import logging

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from PIL import Image

from ldm.diffusion.consistency import student_from
from ldm.diffusion.schedulers import SCHEDULERS, make_scheduler
from ldm.pipelines.guidance import rescale_guidance
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["red heart", "cat face"]
NEGATIVES = ["blue circle", ""]


def sd_v1_config(tiny_scheduler):
    """The tiny schedule with SD v1's `steps_offset=1`: StableDiffusionPipeline rewrites any other
    value when it is built, which would shift its timesteps away from ours."""
    return make_scheduler("ddim", tiny_scheduler.config).from_config(tiny_scheduler.config, steps_offset=1).config


def both_pipelines(components, scheduler_config, name, diffusers_class=StableDiffusionPipeline):
    """Ours and diffusers' `diffusers_class` on the same components, each with its own (stateful)
    scheduler instance built from the same config."""
    ours = LatentDiffusionPipeline(**dict(components, scheduler=make_scheduler(name, scheduler_config)))
    theirs = diffusers_class(**dict(components, scheduler=make_scheduler(name, scheduler_config)),
                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture
def pipe(tiny_components):
    pipe = LatentDiffusionPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, **kwargs):
    args = dict(prompt="red heart", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_same_images_as_stable_diffusion_pipeline(name, tiny_components, tiny_scheduler):
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), name)
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=4,
                guidance_scale=6.0, output_type="np")
    a = ours(**args, generator=torch.Generator().manual_seed(7)).images
    b = theirs(**args, generator=torch.Generator().manual_seed(7)).images
    assert a.shape == (4, 16, 16, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_a_unet_with_a_guidance_input_draws_as_in_diffusers_pipelines(name, tiny_components, tiny_scheduler):
    """A distilled UNet (time_cond_proj_dim) gets the guidance as `timestep_cond` and one pass per step."""
    student = student_from(tiny_components["unet"], embedding_dim=16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)  # a trained one: guidance changes the image
    components = dict(tiny_components, unet=student)
    ours, theirs = both_pipelines(components, sd_v1_config(tiny_scheduler), name)
    args = dict(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=4, output_type="np")
    pipelines = [ours, theirs]
    if name == "lcm":
        pipelines.append(LatentConsistencyModelPipeline(
            **dict(components, scheduler=make_scheduler(name, sd_v1_config(tiny_scheduler))),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False))
        pipelines[-1].set_progress_bar_config(disable=True)
    images = [pipe(**args, guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images
              for pipe in pipelines]
    for other in images[1:]:
        assert np.abs(images[0] - other).max() <= 1e-4
    other_guidance = ours(**args, guidance_scale=2.0, generator=torch.Generator().manual_seed(7)).images
    assert np.abs(images[0] - other_guidance).max() > 1e-3


@pytest.mark.parametrize("args", [
    dict(guidance_scale=8.0, guidance_rescale=0.7, scheduler="euler_a"),
    dict(guidance_scale=1.0, scheduler="ddim", eta=0.5),  # no guidance; DDIM with noise
])
def test_same_images_with_rescale_generator_lists_and_no_guidance(args, tiny_components, tiny_scheduler):
    ours, theirs = both_pipelines(tiny_components, sd_v1_config(tiny_scheduler), args.pop("scheduler"))
    args.update(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=4, output_type="np")
    seeds = [3, 1, 4, 1]
    a = ours(**args, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    b = theirs(**args, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert np.abs(a - b).max() <= 1e-4


def test_saved_folder_has_the_diffusers_layout_and_loads_in_stable_diffusion(tmp_path, tiny_components,
                                                                               tiny_scheduler):
    components = dict(tiny_components, scheduler=make_scheduler("ddim", sd_v1_config(tiny_scheduler)))
    LatentDiffusionPipeline(**components).save_pretrained(tmp_path)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
        assert (tmp_path / weights).is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()

    ours = LatentDiffusionPipeline.from_pretrained(tmp_path)
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    assert type(ours.scheduler).__name__ == type(theirs.scheduler).__name__ == "DDIMScheduler"
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=3,
                output_type="np")
    a = ours(**args, generator=torch.Generator().manual_seed(0)).images
    b = theirs(**args, generator=torch.Generator().manual_seed(0)).images
    original = LatentDiffusionPipeline(**components)(**args, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - original).max() == 0


# ---------------------------------------------------------------- the recipe


def unet_batches(pipe):
    """The batch size of every UNet call, recorded by a forward hook."""
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]),
                                        with_kwargs=True)
    return batches


def test_guidance_is_one_batched_unet_call_per_step(pipe):
    batches = unet_batches(pipe)
    draw(pipe, prompt=PROMPTS, num_images_per_prompt=3, num_inference_steps=4, guidance_scale=5.0)
    assert batches == [2 * 2 * 3] * 4


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_guidance_scale_at_most_one_skips_the_unconditional_pass(pipe, guidance_scale):
    batches = unet_batches(pipe)
    draw(pipe, prompt=PROMPTS, num_inference_steps=2, guidance_scale=guidance_scale)
    assert batches == [2, 2]


def test_guidance_moves_the_images(pipe):
    assert np.abs(draw(pipe, guidance_scale=1.0) - draw(pipe, guidance_scale=9.0)).max() > 1e-3
    assert np.abs(draw(pipe, negative_prompt="blue circle") - draw(pipe)).max() > 1e-3


def test_each_image_is_reproducible_from_its_own_generator(pipe):
    pipe.set_scheduler("euler_a")  # draws fresh noise at every step too
    seeds = [10, 11, 12, 13]
    batch = draw(pipe, prompt=PROMPTS, num_images_per_prompt=2,
                 generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = draw(pipe, prompt=PROMPTS[1], generator=[torch.Generator().manual_seed(13)])
    assert np.abs(batch[3] - alone[0]).max() <= 1e-5
    assert np.abs(batch[2] - batch[3]).max() > 1e-3


def test_output_types(pipe):
    pil = draw(pipe, output_type="pil", height=16, width=24)
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (24, 16)
    array = draw(pipe, output_type="np", num_images_per_prompt=2)
    assert array.shape == (2, 16, 16, 3) and 0 <= array.min() and array.max() <= 1
    tensor = draw(pipe, output_type="pt")
    assert tensor.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), draw(pipe), atol=1e-6)
    latents = draw(pipe, output_type="latent", height=32)
    assert latents.shape == (1, 4, 16, 8)
    assert isinstance(pipe("red heart", num_inference_steps=1, return_dict=False)[0], list)


def test_default_size_is_the_unet_sample_size_times_the_vae_factor(pipe):
    assert pipe.vae_scale_factor == 2
    assert draw(pipe).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=15), "height 15 is not a positive multiple of the VAE factor 2"),
    (dict(width=0), "width 0 is not a positive multiple of the VAE factor 2"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
    (dict(num_images_per_prompt=-1), "num_images_per_prompt must be a positive integer, got -1"),
    (dict(prompt=None), "exactly one of `prompt` and `prompt_embeds`"),
    (dict(prompt=[]), "non-empty list of strings"),
    (dict(prompt=PROMPTS, negative_prompt=["one"]), "a list of 2 strings"),
    (dict(generator=[torch.Generator()] * 3), "3 generators for 1 images"),
    (dict(output_type="jpeg"), "output_type 'jpeg' is not one of pil, np, pt, latent"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\], got 1.5"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"`latents` has shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), r"\['noise'\] are not among"),
])
def test_bad_inputs_name_the_value_and_what_is_valid(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        draw(pipe, **kwargs)


def test_prompt_embeds_give_the_same_images_as_the_prompts(pipe):
    with torch.no_grad():
        embeds, negative = pipe.encode_text(["red heart"], "cpu"), pipe.encode_text(["blue circle"], "cpu")
    from_text = draw(pipe, negative_prompt="blue circle")
    from_embeds = draw(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_array_equal(from_text, from_embeds)


def test_given_latents_replace_the_drawn_noise(pipe):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(draw(pipe, latents=noise, generator=None), draw(pipe))


def test_callback_on_step_end_sees_each_step_and_can_replace_the_latents(pipe):
    seen = []

    def zero_the_latents(pipe, step, timestep, tensors):
        seen.append((step, int(timestep), sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    latents = draw(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_the_latents,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [step for step, _, _ in seen] == [0, 1, 2]
    assert seen[0][2] == ["latents", "prompt_embeds"]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.count_nonzero(latents) == 0


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["red heart"] * 60)
    with caplog.at_level(logging.WARNING, logger="ldm.pipelines.latent_diffusion"):
        images = draw(pipe, prompt=long_prompt)
    assert images.shape == (1, 16, 16, 3)
    assert "longer than the text encoder's 77" in caplog.text
    with caplog.at_level(logging.WARNING, logger="ldm.pipelines.latent_diffusion"):
        caplog.clear()
        draw(pipe, prompt="red heart")
    assert caplog.text == ""


def test_the_progress_bar_counts_the_steps(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    draw(pipe, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err


def test_set_scheduler_swaps_the_sampler_and_keeps_the_schedule(pipe):
    pipe.set_scheduler("dpm++2m_karras")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.beta_end == 0.012
    with pytest.raises(ValueError, match="unknown scheduler 'dpm3'"):
        pipe.set_scheduler("dpm3")


# ---------------------------------------------------------------- guidance rescale


def test_rescale_guidance_matches_the_conditional_std_and_blends_by_phi():
    generator = torch.Generator().manual_seed(0)
    guided, conditional = 3 * torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    full = rescale_guidance(guided, conditional, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(guided, conditional, 0.0), guided)
    torch.testing.assert_close(rescale_guidance(guided, conditional, 0.25), 0.25 * full + 0.75 * guided)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("config, undo", [
    (dict(scaling_factor=0.5), lambda z: z / 0.5),
    (dict(scaling_factor=0.5, shift_factor=0.1), lambda z: z / 0.5 + 0.1),
    (dict(scaling_factor=0.5, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0]),
     lambda z: z * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) / 0.5
     + torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)),
])
def test_decoding_undoes_the_latent_normalisation_the_vae_declares(pipe, config, undo):
    pipe.vae.register_to_config(**config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode_latents(latents), pipe.vae.decode(undo(latents)).sample)


def test_a_half_precision_vae_with_force_upcast_decodes_in_float32(pipe):
    pipe.vae.half()
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    with torch.inference_mode():
        assert pipe.decode_latents(latents).dtype == torch.float32
        assert pipe.vae.dtype == torch.float16  # and goes back to half precision afterwards
        pipe.vae.register_to_config(force_upcast=False)
        assert pipe.decode_latents(latents).dtype == torch.float16
    assert not any(p.is_inference() for p in pipe.vae.parameters())  # still trainable


def test_tiled_decoding_handles_images_larger_than_the_vae_tile(pipe):
    plain = draw(pipe, height=48, width=48)
    pipe.vae.enable_tiling()  # tiles of 16 px, the VAE's sample_size
    tiled = draw(pipe, height=48, width=48)
    assert tiled.shape == plain.shape == (1, 48, 48, 3)
    assert 0 < np.abs(tiled - plain).max() < 0.5


def test_sliced_decoding_gives_the_same_images(pipe):
    plain = draw(pipe, num_images_per_prompt=2)
    pipe.vae.enable_slicing()
    np.testing.assert_allclose(draw(pipe, num_images_per_prompt=2), plain, atol=1e-5)


# ---------------------------------------------------------------- fast mode


def test_fast_mode_stays_close_to_the_default_and_keeps_the_unet_full_precision(pipe, tmp_path):
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=4)
    default = draw(pipe, **args)
    pipe.enable_fast_mode()
    fast = draw(pipe, **args)
    assert pipe.denoising_unet().dtype == torch.bfloat16
    assert 0 < np.abs(fast - default).max() <= 0.03  # bf16 keeps 8 bits of mantissa
    assert pipe.unet.dtype == torch.float32
    pipe.save_pretrained(tmp_path)
    assert LatentDiffusionPipeline.from_pretrained(tmp_path).unet.dtype == torch.float32
    pipe.disable_fast_mode()
    np.testing.assert_array_equal(draw(pipe, **args), default)


def test_fast_mode_follows_the_unet_to_a_new_device(pipe):
    pipe.enable_fast_mode()
    first = pipe.denoising_unet()
    assert pipe.denoising_unet() is first  # made once, then reused
    pipe.to("meta")  # any other device
    assert pipe.denoising_unet().device == torch.device("meta")
