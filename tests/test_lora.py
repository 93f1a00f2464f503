"""LoRA fine-tuning end to end on tiny models (ldm/models/lora.py): train_unet.py --lora_rank on a saved tiny
pipeline, its adapter-only checkpoints and exact resume, the adapter file in our pipeline and in
diffusers' StableDiffusionPipeline, fusing, generate.py --lora, the bad settings, and two processes."""

import os

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

import generate
import train_unet
from ldm.config import RUN_CONFIG, ConfigError
from ldm.diffusion.objective import noise_scheduler
from ldm.hub.files import LORA_WEIGHTS
from ldm.models.lora import check_targets
from ldm.models.text import text_encoder_config
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, run_in_two_processes

pytestmark = pytest.mark.usefixtures("single_thread")

# Attention projections and the ResNet convolutions: both kinds of layer get adapters.
TARGETS = ["--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def save_base(folder, tokenizer, scheduler) -> str:
    """A tiny pipeline to adapt, with `scheduler`, written to `folder`."""
    torch.manual_seed(0)
    LatentDiffusionPipeline(
        vae=AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8}),
        # attention only in the lower block, as in the demo UNet: the file's first keys are then a
        # convolution's, which decides how diffusers' loader reads every key (see assert_every_unet_adapter_loaded)
        unet=UNet2DConditionModel.from_config(dict(TINY_UNET, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])),
        text_encoder=CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_ENCODER)), tokenizer=tokenizer,
        scheduler=scheduler,
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> str:
    """Its DDIM scheduler has Stable Diffusion's steps_offset=1, which StableDiffusionPipeline would otherwise
    rewrite on loading (and then draw on other timesteps)."""
    return save_base(tmp_path_factory.mktemp("base") / "pipeline", tiny_tokenizer,
                     DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1))


FLOW_SHIFT = 2.0


@pytest.fixture(scope="module")
def flow_base(tmp_path_factory, tiny_tokenizer) -> str:
    """A rectified-flow pipeline, with the sampler train_unet.py saves for one (DPM-Solver++ on flow sigmas)."""
    return save_base(tmp_path_factory.mktemp("flow-base") / "pipeline", tiny_tokenizer,
                     noise_scheduler("flow_prediction", flow_shift=FLOW_SHIFT))


def lora_argv(base, output_dir, *extra):
    """A LoRA run of a few steps at a high learning rate, so that the adapters move well away from zero."""
    return ["--pretrained_model_name_or_path", str(base), "--lora_rank", "4", "--output_dir", str(output_dir),
            "--resolution", "16", "--max_train_samples", "20", "--train_batch_size", "8", "--report_to", "none",
            "--validation_prompts", "red heart", "--validation_inference_steps", "2", "--validation_steps", "100",
            "--lr_scheduler", "constant", "--learning_rate", "1e-2", *extra]


# 20 rows at batch 8 are 3 steps an epoch: a run stopped at step 4 resumes mid-epoch. The text encoder gets
# adapters too, so its states cannot come from the cache; caption dropout, EMA and alpha != rank are on.
RESUMABLE = ["--lora_alpha", "8", *TARGETS, "--train_text_encoder_lora", "--use_ema", "--ema_decay", "0.9",
             "--caption_dropout", "0.3", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory, openmoji_32) -> str:
    """A LoRA run of 5 steps on `base`: adapters on the UNet's projections and convolutions and on the text
    encoder. On one thread, like the tests (a module fixture comes before their `single_thread`): the
    resumed run must add up its sums in the same order to end with the same bits."""
    folder = tmp_path_factory.mktemp("lora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_unet.main(lora_argv(base, folder / "straight", *RESUMABLE, "--max_train_steps", "5",
                                  "--cache_dir", str(folder / "cache")))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    return str(folder / "straight")


def draw(pipe, **options) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("red heart", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **options).images


def test_checkpoints_hold_only_the_adapters_and_a_resumed_run_ends_with_the_same_ones(trained, base, tmp_path):
    resumed = tmp_path / "resumed"
    train_unet.main(lora_argv(base, resumed, *RESUMABLE, "--max_train_steps", "4"))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(lora_argv(base, resumed, *RESUMABLE, "--max_train_steps", "5", "--resume_from_checkpoint",
                              "latest"))
    straight, again = load_file(os.path.join(trained, LORA_WEIGHTS)), load_file(resumed / LORA_WEIGHTS)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)

    checkpoint = os.path.join(trained, "checkpoint-4")
    assert not [name for name in os.listdir(checkpoint) if name.startswith(("model", "pytorch_model"))]
    adapters = load_file(os.path.join(checkpoint, LORA_WEIGHTS))
    assert all("lora" in key and key.startswith(("unet.", "text_encoder.")) for key in adapters)
    assert any(".conv1.lora" in key for key in adapters) and any(key.startswith("text_encoder.") for key in adapters)
    unet_adapters = sum(v.numel() for k, v in adapters.items() if k.startswith("unet."))
    base_unet = load_file(os.path.join(base, "unet", "diffusion_pytorch_model.safetensors"))
    assert unet_adapters < sum(v.numel() for v in base_unet.values()) / 4
    ema = torch.load(os.path.join(checkpoint, "custom_checkpoint_0.pkl"), weights_only=True)
    assert sum(p.numel() for p in ema["shadow_params"]) == unet_adapters  # the UNet's adapters, averaged
    assert not all(torch.equal(straight[k], adapters[k]) for k in adapters)  # step 5 (and the EMA) moved them
    assert not os.path.exists(os.path.join(trained, "unet"))  # the adapters, not a pipeline
    # the text encoder trains, so only the latents were cached (beside the dataset)
    caches = {name.split("-")[0] for name in os.listdir(os.path.join(os.path.dirname(trained), "cache"))}
    assert "latents" in caches and "texts" not in caches


def assert_every_unet_adapter_loaded(pipe, folder):
    """The file's UNet adapters, attention projections and convolutions alike, are the pipeline's: diffusers'
    loader judges the whole file's key style by its first key, and silently skips what does not fit."""
    saved = load_file(os.path.join(folder, LORA_WEIGHTS))
    saved = convert_unet_state_dict_to_peft({key[5:]: value for key, value in saved.items() if key.startswith("unet.")})
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=next(iter(pipe.unet.peft_config)))
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_our_pipeline_and_diffusers_draw_the_same_with_the_adapters_and_the_base_without(trained, base):
    ours = LatentDiffusionPipeline.from_pretrained(base)
    theirs = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    without = draw(ours)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(trained)
        assert_every_unet_adapter_loaded(pipe, trained)
    adapted = draw(ours)
    assert abs(adapted - draw(theirs)).max() <= 1e-4
    assert abs(adapted - without).max() > 1e-2
    half = draw(ours, cross_attention_kwargs={"scale": 0.5})
    assert abs(half - draw(theirs, cross_attention_kwargs={"scale": 0.5})).max() <= 1e-4
    assert min(abs(half - adapted).max(), abs(half - without).max()) > 1e-3
    for pipe in (ours, theirs):
        pipe.unload_lora_weights()
    assert abs(draw(ours) - without).max() <= 1e-6 and abs(draw(theirs) - without).max() <= 1e-4


def adapted_conv1(unet):
    return next(module for name, module in unet.named_modules() if name.endswith("conv1") and
                hasattr(module, "base_layer"))


def test_fast_mode_draws_with_the_adapters_loaded_after_its_first_call(trained, base):
    plain, fast = LatentDiffusionPipeline.from_pretrained(base), LatentDiffusionPipeline.from_pretrained(base)
    fast.enable_fast_mode()
    draw(fast)  # makes the low-precision copy of the UNet without adapters
    for pipe in (plain, fast):
        pipe.load_lora_weights(trained)
    assert abs(draw(fast) - draw(plain)).max() < 0.03  # bf16's usual distance, not the adapters'


def test_fused_adapters_draw_what_the_unfused_ones_draw(trained, base):
    pipe = LatentDiffusionPipeline.from_pretrained(base)
    without = draw(pipe)
    pipe.load_lora_weights(trained, adapter_name="emoji")
    # alpha 8 at rank 4, from the file's metadata: without it a loader would take alpha = rank
    assert pipe.unet.peft_config["emoji"].lora_alpha == pipe.text_encoder.peft_config["emoji"].lora_alpha == 8
    unfused = draw(pipe)
    base_weight = adapted_conv1(pipe.unet).base_layer.weight.clone()
    pipe.fuse_lora()
    assert not torch.equal(base_weight, adapted_conv1(pipe.unet).base_layer.weight)  # the adapters went in
    assert abs(draw(pipe) - unfused).max() <= 1e-4
    pipe.unfuse_lora()
    pipe.set_adapters(["emoji"], adapter_weights=[0.0])
    assert abs(draw(pipe) - without).max() <= 1e-5  # unfusing subtracts what fusing added: float rounding


def test_generate_draws_with_the_adapters_and_records_them(trained, base, tmp_path):
    """--lora_scale 0 draws the model's own images; 1 (the default) and 0.5 draw others, each recorded."""
    runs = {"plain": [], "adapted": ["--lora", trained], "half": ["--lora", trained, "--lora_scale", "0.5"],
            "off": ["--lora", trained, "--lora_scale", "0"]}
    png = {}
    for name, flags in runs.items():
        common = ["--model", base, "--prompt", "red heart", "--num_inference_steps", "2"]
        assert generate.main([*common, *flags, "--output_dir", str(tmp_path / name)]) == 0
        png[name] = Image.open(tmp_path / name / "0000-red-heart-seed0.png")
    assert (png["adapted"].text["lora"], png["adapted"].text["lora_scale"]) == (trained, "1.0")
    assert (png["half"].text["lora"], png["half"].text["lora_scale"]) == (trained, "0.5")
    assert "lora" not in png["plain"].text
    pixels = {name: np.asarray(image) for name, image in png.items()}
    assert np.array_equal(pixels["off"], pixels["plain"])
    assert not np.array_equal(pixels["adapted"], pixels["plain"])
    assert not np.array_equal(pixels["half"], pixels["adapted"])


def test_generate_refuses_a_scale_without_adapters_and_a_folder_without_them(base, tmp_path, capsys):
    common = ["--model", base, "--prompt", "red heart", "--output_dir", str(tmp_path / "out")]
    assert generate.main([*common, "--lora_scale", "0.5"]) == 2
    assert "--lora_scale weighs LoRA adapters: pass --lora too" in capsys.readouterr().err
    assert generate.main([*common, "--lora", base]) == 2
    assert f"{base} is not a LoRA adapter: it has no {LORA_WEIGHTS}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


BAD_SETTINGS = {  # flags (after the base pipeline's, where "base" stands for it) -> what the error says
    "no pretrained pipeline": (["--lora_rank", "4"], "trains adapters on a pretrained pipeline: pass "
                                                     "--pretrained_model_name_or_path"),
    "rank 0": (["base", "--lora_rank", "0"], "lora_rank = 0 is invalid; expected a positive integer"),
    "alpha without rank": (["--lora_alpha", "8"], "lora_alpha = 8.0 is invalid; expected unset without --lora_rank"),
    "text encoder twice": (["base", "--lora_rank", "4", "--train_text_encoder_lora", "--train_text_encoder"],
                           "expected false with --train_text_encoder_lora: the text encoder trains either whole or "
                           "through adapters"),
    "another text encoder": (["base", "--lora_rank", "4", "--text_encoder_name_or_path", "other/clip"],
                             "text_encoder_name_or_path = 'other/clip' is invalid"),
    "unknown module": (["base", "--lora_rank", "4", "--lora_target_modules", "to_q", "to_z"],
                       "lora_target_modules 'to_z' matches no module; the Linear and Conv2d layers of the UNet end "
                       "in: conv, conv1, conv2,"),
    "a normalisation": (["base", "--lora_rank", "4", "--lora_target_modules", "norm1"],
                        "lora_target_modules 'norm1' matches down_blocks.0.resnets.0.norm1 "
                        "(GroupNorm), which LoRA does not adapt here"),
    "a UNet alone": (["unet", "--lora_rank", "4"], "holds a UNet2DConditionModel, not a pipeline"),
    "another objective than the base's": (["flow", "--lora_rank", "4", "--prediction_type", "epsilon"],
                                          "prediction_type = 'epsilon' is invalid; expected unset or "
                                          "'flow_prediction', the base pipeline's, with --lora_rank"),
    "another shift than the base's": (["flow", "--lora_rank", "4", "--flow_shift", "3"],
                                      "flow_shift = 3.0 is invalid; expected unset or 2.0, the base pipeline's"),
    "flow on an epsilon base": (["base", "--lora_rank", "4", "--prediction_type", "flow_prediction"],
                                "prediction_type = 'flow_prediction' is invalid; expected unset or 'epsilon'"),
}


def test_unet_layers_with_text_encoder_names_are_refused():
    """diffusers' format renames adapters on any *.q_proj to text-encoder keys (the demo UNet's text pool
    has q/k/v_proj): saved, they would not load back into the UNet."""
    pool = torch.nn.Module()
    pool.q_proj, pool.proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    unet = torch.nn.Module()
    unet.pool = pool
    check_targets(unet, ["proj"])
    with pytest.raises(ConfigError, match="lora_target_modules 'q_proj' matches pool.q_proj, whose adapters"):
        check_targets(unet, ["q_proj"])


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_lora_settings_fail_before_any_work(base, flow_base, tmp_path, case):
    flags, message = BAD_SETTINGS[case]
    where = {"base": base, "unet": os.path.join(base, "unet"), "flow": flow_base}
    flags = ["--pretrained_model_name_or_path", where[flags[0]], *flags[1:]] if flags[0] in where else flags
    with pytest.raises(ConfigError) as raised:
        train_unet.main(["--output_dir", str(tmp_path / "run"), "--report_to", "none", *flags])
    assert message in str(raised.value)
    assert not os.path.exists(tmp_path / "run")


def test_two_process_lora_run_with_mixed_precision(base, tmp_path, openmoji_32):
    out = tmp_path / "run"
    launched = run_in_two_processes(31, "train_unet.py", *lora_argv(base, out, "--max_train_steps", "2",
                                                                    "--checkpointing_steps", "2", "--mixed_precision",
                                                                    "bf16", "--train_text_encoder_lora"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    checkpoint = set(os.listdir(out / "checkpoint-2"))
    assert {"random_states_0.pkl", "random_states_1.pkl", LORA_WEIGHTS} <= checkpoint
    assert not [name for name in checkpoint if name.startswith(("model", "pytorch_model"))]
    adapters = load_file(out / LORA_WEIGHTS)
    assert {value.dtype for value in adapters.values()} == {torch.float32}  # trained in fp32 under bf16 autocast
    pipe = LatentDiffusionPipeline.from_pretrained(base)
    without = draw(pipe)
    pipe.load_lora_weights(str(out))
    assert abs(draw(pipe) - without).max() > 1e-3


# ---------------------------------------------------------------- a rectified-flow base


def test_a_lora_of_a_flow_base_trains_its_objective_and_generate_draws_with_it(flow_base, tmp_path, openmoji_32):
    """Neither --prediction_type nor --flow_shift given: the run takes both from the base's scheduler config, and
    its adapters load into the flow pipeline; scale 0 draws the base's own image, scale 1 another."""
    out = tmp_path / "lora"
    train_unet.main(lora_argv(flow_base, out, "--max_train_steps", "3", *TARGETS))
    resolved = yaml.safe_load((out / RUN_CONFIG).read_text())
    assert (resolved["prediction_type"], resolved["flow_shift"]) == ("flow_prediction", FLOW_SHIFT)
    png = {}
    for name, flags in {"plain": [], "adapted": ["--lora", str(out)], "off": ["--lora", str(out), "--lora_scale", "0"]
                        }.items():
        assert generate.main(["--model", flow_base, "--prompt", "red heart", "--num_inference_steps", "3",
                              "--output_dir", str(tmp_path / name), *flags]) == 0
        png[name] = Image.open(tmp_path / name / "0000-red-heart-seed0.png")
    assert png["plain"].text["scheduler"] == "dpm++2m"  # the base's flow sampler, adapters or not
    pixels = {name: np.asarray(image) for name, image in png.items()}
    assert np.array_equal(pixels["off"], pixels["plain"])
    assert not np.array_equal(pixels["adapted"], pixels["plain"])

