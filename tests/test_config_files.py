"""The shipped config files parse, and describe what the README says they do."""

import glob
import json

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from diffusers import UNet2DConditionModel

from ldm.config import UNetConfig, parse_config
from ldm.models import read_architecture


@pytest.mark.parametrize("path", sorted(glob.glob("configs/unet/*.yaml")))
def test_unet_configs_parse_and_their_unet_builds(path):
    config = parse_config(UNetConfig, ["--config", path])
    architecture = read_architecture(config.unet_config, UNet2DConditionModel)
    with open(config.text_encoder_config) as f:
        assert architecture["cross_attention_dim"] == json.load(f)["hidden_size"]
    UNet2DConditionModel.from_config(architecture)


@pytest.mark.parametrize("name,processes,machines", [("one_gpu", 1, 1), ("multi_gpu", 4, 1), ("multi_node", 16, 2)])
def test_accelerate_configs(name, processes, machines):
    config = ClusterConfig.from_yaml_file(f"configs/accelerate/{name}.yaml")
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "bf16" and not config.use_cpu
