import pytest
import yaml

from ldm.config import ConfigError, parse_config, require_divisible, save_config
from ldm.training.config import TrainConfig


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"resolution": 64, "learning_rate": 0.001, "random_flip": True})
    config = parse_config(TrainConfig, ["--config", config_file, "--learning_rate", "0.5"])
    assert config.resolution == 64 and config.random_flip is True
    assert config.learning_rate == 0.5


def test_flag_order_does_not_matter(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"train_batch_size": 4})
    config = parse_config(TrainConfig, ["--train_batch_size", "8", "--config", config_file])
    assert config.train_batch_size == 8


def test_resolved_config_round_trips(tmp_path):
    config = parse_config(TrainConfig, ["--max_train_steps", "7", "--mixed_precision", "bf16"])
    save_config(config, str(tmp_path / "out" / "config.yaml"))
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "out" / "config.yaml")]) == config


def test_unknown_yaml_key_names_the_key_and_suggests(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"learnin_rate": 1.0})
    with pytest.raises(ConfigError, match="unknown key 'learnin_rate'.*did you mean 'learning_rate'"):
        parse_config(TrainConfig, ["--config", config_file])


def test_wrong_yaml_type_names_key_and_value(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"resolution": "big"})
    with pytest.raises(ConfigError, match=r"resolution = 'big' in .* has the wrong type; expected int"):
        parse_config(TrainConfig, ["--config", config_file])


def test_yaml_bool_is_not_an_int(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"max_train_steps": True})
    with pytest.raises(ConfigError, match="max_train_steps = True"):
        parse_config(TrainConfig, ["--config", config_file])


def test_yaml_literal_lists_valid_choices(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="mixed_precision = 'fp8'.*'no', 'fp16', 'bf16'"):
        parse_config(TrainConfig, ["--config", config_file])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("argv", [["--resolution", "abc"], ["--bogus_flag", "1"], ["--mixed_precision", "fp8"]])
def test_bad_command_line_exits_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, argv)
    assert exit_info.value.code == 2
    assert argv[0].lstrip("-").split("_")[0] in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--max_train_steps", "-3", "max_train_steps = -3 is invalid"),
    ("--resolution", "0", "resolution = 0 is invalid"),
    ("--learning_rate", "0", "learning_rate = 0.0 is invalid"),
    ("--checkpoints_total_limit", "0", "checkpoints_total_limit = 0 is invalid"),
    ("--ema_decay", "1.5", "ema_decay = 1.5 is invalid"),
])
def test_invalid_values_fail_before_work(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, [flag, value])


def test_missing_train_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="train_data_dir .* is not a folder"):
        parse_config(TrainConfig, ["--train_data_dir", str(tmp_path / "missing")])


def test_resolution_must_fit_the_vae_factor():
    require_divisible(64, 8, "VAE")
    with pytest.raises(ConfigError, match="resolution 30 is not divisible by the VAE factor 4"):
        require_divisible(30, 4, "VAE")


def test_yaml_float_without_a_dot_is_read_as_a_float(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; users write it anyway.
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\n")
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml")]).learning_rate == 1e-4


def test_a_pretrained_text_encoder_cannot_be_trained_jointly():
    from ldm.training.unet_config import UNetConfig

    with pytest.raises(ConfigError, match="train_text_encoder = True is invalid; expected false with a pretrained"):
        parse_config(UNetConfig, ["--train_text_encoder", "--text_encoder_name_or_path", "some/clip"])
