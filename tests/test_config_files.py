"""The shipped config files parse, and describe what the README says they do."""

import glob
import json

import pytest
from accelerate import init_empty_weights
from accelerate.commands.config.config_args import ClusterConfig
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel

from ldm.config import parse_config
from ldm.models.architecture import read_architecture, vae_scale_factor
from ldm.models.denoiser import read_denoiser_architecture
from ldm.training.unet_config import UNetConfig

CLIP_VIT_L_HIDDEN_SIZE = 768  # openai/clip-vit-large-patch14's text states, as in Stable Diffusion 1.x
# The GPU configs' UNets, with the parameter counts the README gives. A fine-tuning config names a Hub
# model that cannot be fetched here; its architecture is the config.json beside it in configs/models.
GPU_UNETS = {"configs/unet/sd_f8_256.yaml": ("configs/models/unet_256.json", 355.7),
             "configs/unet/sd_f8_256_flow.yaml": ("configs/models/unet_256.json", 355.7),
             "configs/unet/finetune_sd15.yaml": ("configs/models/unet_sd15.json", 859.5)}


def test_every_unet_config_is_covered():
    # configs/unet/lora_demo.yaml is tested with `make lora-demo` (tests/test_demo.py)
    assert set(glob.glob("configs/unet/*.yaml")) == {"configs/unet/demo.yaml", "configs/unet/lora_demo.yaml",
                                                      *GPU_UNETS}


def test_demo_config_parses_and_its_unet_builds():
    config = parse_config(UNetConfig, ["--config", "configs/unet/demo.yaml"])
    architecture = read_architecture(config.unet_config, UNet2DConditionModel)
    with open(config.text_encoder_config) as f:
        assert architecture["cross_attention_dim"] == json.load(f)["hidden_size"]
    UNet2DConditionModel.from_config(architecture)


@pytest.mark.parametrize("path", sorted(GPU_UNETS))
def test_gpu_configs_parse_and_their_unet_builds_on_the_meta_device(path):
    config = parse_config(UNetConfig, ["--config", path])
    unet_config, millions = GPU_UNETS[path]
    assert config.unet_config == unet_config or config.pretrained_model_name_or_path is not None
    architecture = read_architecture(unet_config, UNet2DConditionModel)
    assert architecture["cross_attention_dim"] == CLIP_VIT_L_HIDDEN_SIZE and config.text_encoder_name_or_path
    factor = vae_scale_factor(read_architecture("configs/models/vae_sd_f8.json", AutoencoderKL))  # SD's VAE: f = 8
    assert config.resolution // factor == architecture["sample_size"]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(architecture)
    count = sum(p.numel() for p in unet.parameters())
    print(f"{path}: {count / 1e6:.1f}M UNet parameters")
    assert round(count / 1e6, 1) == millions and next(unet.parameters()).device.type == "meta"
    assert config.mixed_precision == "bf16" and config.uses_caches and config.cache_dtype == "float16"


def test_the_flow_config_differs_from_its_epsilon_twin_only_in_the_objective():
    epsilon, flow = (vars(parse_config(UNetConfig, ["--config", f"configs/unet/{name}.yaml"]))
                     for name in ("sd_f8_256", "sd_f8_256_flow"))
    changed = {name for name in epsilon if epsilon[name] != flow[name]}
    assert changed == {"prediction_type", "timestep_sampling", "snr_gamma", "output_dir"}
    assert (flow["prediction_type"], flow["flow_shift"], flow["snr_gamma"]) == ("flow_prediction", 1.0, 0)


@pytest.mark.parametrize("name,processes,machines", [("one_gpu", 1, 1), ("multi_gpu", 4, 1), ("multi_node", 16, 2)])
def test_accelerate_configs(name, processes, machines):
    config = ClusterConfig.from_yaml_file(f"configs/accelerate/{name}.yaml")
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "bf16" and not config.use_cpu


GPU_TRANSFORMERS = {"configs/transformer/sd_f8_256_flow.yaml": ("configs/models/pixart_256.json", 367.5)}


def test_every_transformer_config_is_covered():
    assert set(glob.glob("configs/transformer/*.yaml")) == {"configs/transformer/demo.yaml", *GPU_TRANSFORMERS}


@pytest.mark.parametrize("path, millions", [("configs/transformer/demo.yaml", 5.1),
                                            *((path, count) for path, (_, count) in GPU_TRANSFORMERS.items())])
def test_transformer_configs_parse_and_build_on_the_meta_device(path, millions):
    config = parse_config(UNetConfig, ["--config", path])
    model_class, architecture = read_denoiser_architecture(config.denoiser_config)
    assert model_class is PixArtTransformer2DModel
    text_width = CLIP_VIT_L_HIDDEN_SIZE if config.text_encoder_name_or_path else json.load(
        open(config.text_encoder_config))["hidden_size"]
    assert architecture["caption_channels"] == text_width
    with init_empty_weights():
        transformer = PixArtTransformer2DModel.from_config(architecture)
    count = sum(p.numel() for p in transformer.parameters())
    print(f"{path}: {count / 1e6:.1f}M transformer parameters")
    assert round(count / 1e6, 1) == millions and next(transformer.parameters()).device.type == "meta"


@pytest.mark.parametrize("unet, transformer", [("configs/unet/demo.yaml", "configs/transformer/demo.yaml"),
                                               ("configs/unet/sd_f8_256_flow.yaml",
                                                "configs/transformer/sd_f8_256_flow.yaml")])
def test_each_transformer_config_differs_from_its_unet_twin_only_in_the_denoiser(unet, transformer):
    theirs, ours = (vars(parse_config(UNetConfig, ["--config", path])) for path in (unet, transformer))
    # unet_config is read only where denoiser_config is unset
    assert {name for name in ours if ours[name] != theirs[name]} - {"unet_config"} == {"denoiser_config", "output_dir"}
