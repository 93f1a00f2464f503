"""The shipped config files parse, and describe what the README says they do."""

import glob
import json

import pytest
from accelerate import init_empty_weights
from accelerate.commands.config.config_args import ClusterConfig
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.config import parse_config
from ldm.models.architecture import read_architecture, vae_scale_factor
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
