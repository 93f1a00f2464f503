"""ONNX export (ldm/export.py) and the ONNX Runtime pipeline (ldm/pipelines/onnx_pipeline.py) on a tiny model
shaped like the demo's: three down blocks without attention, cross-attention in the middle block,
the text attention-pooled into the timestep embedding, and a VAE of factor 4."""

import json
import os
import re
import subprocess
import sys

import diffusers
import numpy as np
import onnx
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

import generate
from ldm.diffusion.objective import noise_scheduler
from ldm.export import export_onnx
from ldm.export import main as export_main
from ldm.models.text import text_encoder_config
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.onnx_pipeline import OnnxLatentDiffusionPipeline
from tests.conftest import TINY_TEXT_ENCODER

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO_SHAPED_UNET = dict(  # configs/models/unet_demo.json at a quarter of the widths
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32, 32],
    down_block_types=["DownBlock2D"] * 3, up_block_types=["UpBlock2D"] * 3, mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text", addition_embed_type_num_heads=4,
    norm_num_groups=8,
)
DEMO_SHAPED_VAE = dict(  # configs/models/vae_demo.json at a quarter of the widths, with a measured-looking scale
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8,
    sample_size=32, mid_block_add_attention=False, scaling_factor=0.6,
)
SAMPLERS = ("ddim", "euler_a", "dpm++2m_karras")


def demo_shaped_pipeline(tokenizer, **unet_options) -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    return LatentDiffusionPipeline(
        vae=AutoencoderKL.from_config(DEMO_SHAPED_VAE).eval(),
        text_encoder=CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_ENCODER)).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config({**DEMO_SHAPED_UNET, **unet_options}).eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1))


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory, tiny_tokenizer):
    path = str(tmp_path_factory.mktemp("demo-shaped"))
    demo_shaped_pipeline(tiny_tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, torch_dir):
    path = str(tmp_path_factory.mktemp("exports") / "onnx")
    export_onnx(torch_dir, path)
    return path


def draw(pipe, sampler: str, **options) -> np.ndarray:
    pipe.set_scheduler(sampler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    return pipe(["grinning face", "red heart"], num_images_per_prompt=2, num_inference_steps=8, guidance_scale=5.0,
                generator=generators, output_type="np", **options).images


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_seed_draws_the_pytorch_pipelines_image(torch_dir, onnx_dir, sampler):
    expected = draw(LatentDiffusionPipeline.from_pretrained(torch_dir), sampler, negative_prompt="blue circle")
    drawn = draw(OnnxLatentDiffusionPipeline.from_pretrained(onnx_dir), sampler, negative_prompt="blue circle")
    assert drawn.shape == expected.shape == (4, 32, 32, 3)
    assert np.abs(drawn - expected).max() <= 1e-3
    assert np.abs(drawn[0] - drawn[1]).mean() > 1e-2  # distinct seeds, distinct images: the comparison has content


def test_other_sizes_and_batches_run_and_unsupported_sizes_fail_first(torch_dir, onnx_dir):
    options = dict(num_inference_steps=3, guidance_scale=5.0, height=48, width=16, output_type="np")
    torch_pipe = LatentDiffusionPipeline.from_pretrained(torch_dir)
    onnx_pipe = OnnxLatentDiffusionPipeline.from_pretrained(onnx_dir)
    expected = torch_pipe("cat face", generator=torch.Generator().manual_seed(3), **options).images
    drawn = onnx_pipe("cat face", generator=torch.Generator().manual_seed(3), **options).images
    assert drawn.shape == (1, 48, 16, 3) and np.abs(drawn - expected).max() <= 1e-3
    # The VAE factor is 4 and two upsamplers were traced: sides must be multiples of 16 pixels.
    with pytest.raises(ValueError, match=r"width 24 does not fit this ONNX UNet.*multiples of 16 pixels"):
        onnx_pipe("cat face", height=32, width=24)
    with pytest.raises(TypeError, match="image"):  # editing needs the PyTorch VAE encoder's sampling
        onnx_pipe("cat face", image=Image.new("RGB", (32, 32)))


def test_the_export_has_diffusers_onnx_layout_and_names(onnx_dir):
    index = json.load(open(os.path.join(onnx_dir, "model_index.json")))
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert index[name] == ["diffusers", "OnnxRuntimeModel"]
        assert os.path.isfile(os.path.join(onnx_dir, name, "model.onnx"))
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"] and index["scheduler"][0] == "diffusers"
    assert os.path.isfile(os.path.join(onnx_dir, "unet", "weights.pb"))
    graphs = {name: onnx.load(os.path.join(onnx_dir, name, "model.onnx"), load_external_data=False)
              for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder")}
    inputs = {name: [node.name for node in graph.graph.input] for name, graph in graphs.items()}
    outputs = {name: [node.name for node in graph.graph.output] for name, graph in graphs.items()}
    assert inputs == dict(text_encoder=["input_ids"], unet=["sample", "timestep", "encoder_hidden_states"],
                          vae_encoder=["sample"], vae_decoder=["latent_sample"])
    assert outputs == dict(text_encoder=["last_hidden_state", "pooler_output"], unet=["out_sample"],
                           vae_encoder=["latent_sample"], vae_decoder=["sample"])
    manifest = json.load(open(os.path.join(onnx_dir, "onnx_export.json")))
    assert (manifest["opset"], manifest["quantize"], manifest["exporter"]) == (17, None, "torchscript")


@pytest.mark.skipif(not hasattr(diffusers, "OnnxStableDiffusionPipeline"),
                    reason=f"diffusers {diffusers.__version__} has no OnnxStableDiffusionPipeline (removed in 0.43)")
def test_diffusers_onnx_pipeline_loads_and_runs_the_export(onnx_dir):
    pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    # It assumes a VAE factor of 8 and a scale of 0.18215: 64 "pixels" are our 8 latent pixels, 32 real ones.
    images = pipe("grinning face", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                  generator=np.random.RandomState(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert images.std() > 1e-3


def test_int8_quantizes_the_unets_matmuls_and_still_draws(torch_dir, onnx_dir, tmp_path):
    out = str(tmp_path / "int8")
    assert export_main(["onnx", torch_dir, out, "--quantize", "int8"]) == 0
    unet = onnx.load(os.path.join(out, "unet", "model.onnx"))
    ops = {node.op_type for node in unet.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops
    assert "Conv" in ops and "ConvInteger" not in ops
    assert not os.path.exists(os.path.join(out, "unet", "weights.pb"))
    assert json.load(open(os.path.join(out, "onnx_export.json")))["quantize"] == "int8"
    fp32 = draw(OnnxLatentDiffusionPipeline.from_pretrained(onnx_dir), "ddim")
    int8 = draw(OnnxLatentDiffusionPipeline.from_pretrained(out), "ddim")
    difference = np.abs(int8 - fp32).mean()
    assert 0 < difference < 0.05


def test_a_distilled_unet_exports_with_its_guidance_input(tmp_path, tiny_tokenizer):
    pipe = demo_shaped_pipeline(tiny_tokenizer, time_cond_proj_dim=8)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "lcm")
    export_onnx(str(tmp_path / "lcm"), str(tmp_path / "lcm-onnx"))
    unet = onnx.load(str(tmp_path / "lcm-onnx" / "unet" / "model.onnx"), load_external_data=False)
    assert [node.name for node in unet.graph.input][-1] == "timestep_cond"
    expected = draw(LatentDiffusionPipeline.from_pretrained(tmp_path / "lcm"), "lcm")
    drawn = draw(OnnxLatentDiffusionPipeline.from_pretrained(str(tmp_path / "lcm-onnx")), "lcm")
    assert np.abs(drawn - expected).max() <= 1e-3


@pytest.mark.parametrize("sampler", ["dpm++2m", "flow_euler"])
def test_a_flow_model_exports_and_draws_the_pytorch_pipelines_image(tmp_path, tiny_tokenizer, sampler):
    """The saved flow sampler (and FlowMatch Euler, float timesteps σ·T) through the traced UNet."""
    pipe = demo_shaped_pipeline(tiny_tokenizer)
    pipe.scheduler = noise_scheduler("flow_prediction", flow_shift=2.0)
    pipe.save_pretrained(tmp_path / "flow")
    export_onnx(str(tmp_path / "flow"), str(tmp_path / "flow-onnx"))
    expected = draw(LatentDiffusionPipeline.from_pretrained(tmp_path / "flow"), sampler)
    drawn = draw(OnnxLatentDiffusionPipeline.from_pretrained(str(tmp_path / "flow-onnx")), sampler)
    assert np.abs(drawn - expected).max() <= 1e-3


@pytest.mark.parametrize("case, message", [
    ("not a pipeline", "is not a pipeline folder: it has no model_index.json"),
    ("missing", "does not exist"),
    ("output under a file", "cannot be written: .* is a file, not a folder"),
    ("output holds other files", "holds other files"),
    ("opset 12", "--opset 12 is not supported: choose 14-20"),
    ("quantize int4", "--quantize 'int4' is not one of int8"),
])
def test_bad_input_fails_before_any_export(torch_dir, tmp_path, capsys, case, message):
    source, out, flags = torch_dir, tmp_path / "out", []
    if case == "not a pipeline":
        source = str(tmp_path / "empty")
        os.makedirs(source)
    elif case == "missing":
        source = str(tmp_path / "nowhere")
    elif case == "output under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "output holds other files":
        os.makedirs(out)
        (out / "notes.txt").write_text("mine")
    else:
        flag, value = case.split()
        flags = [f"--{flag}", value]
    assert export_main(["onnx", source, str(out), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m ldm.export: error:")
    assert re.search(message, error), error
    assert sorted(os.listdir(tmp_path)) in (["out"], [], ["empty"], ["file"])  # no staging folder left behind
    if case == "output holds other files":
        assert os.listdir(out) == ["notes.txt"]


def test_the_pipeline_refuses_a_pytorch_folder_with_the_fix(torch_dir):
    with pytest.raises(ValueError, match="not an ONNX export.*python -m ldm.export onnx"):
        OnnxLatentDiffusionPipeline.from_pretrained(torch_dir)


def test_generate_backend_onnx_writes_the_pytorch_backends_pngs(torch_dir, onnx_dir, tmp_path):
    flags = ["--prompt", "grinning face", "--prompt", "rocket", "--num_inference_steps", "4", "--scheduler", "euler_a",
             "--seed", "7"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "generate.py", "--model", onnx_dir, "--backend", "onnx", *flags,
                             "--output_dir", str(tmp_path / "onnx")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert generate.main(["--model", torch_dir, *flags, "--output_dir", str(tmp_path / "torch")]) == 0
    names = ["0000-grinning-face-seed7.png", "0001-rocket-seed8.png", "grid.png"]
    assert sorted(os.listdir(tmp_path / "onnx")) == names
    for name in names:
        onnx_png, torch_png = Image.open(tmp_path / "onnx" / name), Image.open(tmp_path / "torch" / name)
        assert np.abs(np.asarray(onnx_png, dtype=int) - np.asarray(torch_png, dtype=int)).max() <= 1
    text = Image.open(tmp_path / "onnx" / names[1]).text
    assert (text["backend"], text["model"], text["scheduler"], text["seed"]) == ("onnx", onnx_dir, "euler_a", "8")


@pytest.mark.parametrize("flags, named", [
    (["--fast"], "--fast"), (["--dtype", "bfloat16"], "--dtype"), (["--vae_tiling"], "--vae_tiling"),
    (["--lora", "adapter.safetensors"], "--lora"), (["--init_image", "in.png"], "--init_image"),
    (["--device", "cuda"], "--device cuda"),
])
def test_generate_backend_onnx_names_the_flags_it_cannot_honour(tmp_path, capsys, flags, named):
    # The model does not exist: the flag's error comes first, before anything loads.
    assert generate.main(["--model", str(tmp_path / "nowhere"), "--backend", "onnx", "--prompt", "x", *flags]) == 2
    error = capsys.readouterr().err
    assert f"{named} does not apply to --backend onnx" in error, error


def test_generate_backend_onnx_rejects_a_size_the_traced_unet_cannot_draw(onnx_dir, tmp_path, capsys):
    assert generate.main(["--model", onnx_dir, "--backend", "onnx", "--prompt", "x", "--height", "24",
                          "--output_dir", str(tmp_path / "out")]) == 2
    assert "height 24 does not fit this ONNX UNet" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_generate_with_an_onnx_export_and_the_torch_backend_says_which_backend(onnx_dir, tmp_path, capsys):
    assert generate.main(["--model", onnx_dir, "--prompt", "x", "--output_dir", str(tmp_path)]) == 2
    assert "is an ONNX export (python -m ldm.export onnx), not a PyTorch pipeline: generate.py runs it with " \
           "--backend onnx" in capsys.readouterr().err


def test_generate_backend_onnx_with_a_pytorch_folder_says_to_export(torch_dir, tmp_path, capsys):
    assert generate.main(["--model", torch_dir, "--backend", "onnx", "--prompt", "x",
                          "--output_dir", str(tmp_path)]) == 2
    assert "export it with `python -m ldm.export onnx` first" in capsys.readouterr().err
