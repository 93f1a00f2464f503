"""train_vae.py end to end on tiny VAEs (f = 2, 8-16 channels) and tiny data: the saved model and its
measured scale, exact resume, two processes, corrupt images, the NaN guard, the discriminator's
switch, config errors, metrics, and the shipped configs."""

import glob
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.config import ConfigError, parse_config, require_divisible
from ldm.data.dataset import ImageCaptionDataset, load_splits
from ldm.models.architecture import vae_scale_factor
from ldm.training.loop import NonFiniteLossError
from ldm.training.vae import load_vae, psnr, ssim, vae_architecture
from ldm.training.vae_config import VAEConfig
from ldm.training.vae_loss import PatchDiscriminator
from tests.conftest import TINY_VAE, two_processes
from tests.test_data import write_metadata
from tests.test_training import fresh_accelerator_state  # noqa: F401 (autouse fixture)
from train_vae import main

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_vae_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "vae_tiny.json"
    path.write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE}))
    return str(path)


def write_imagefolder(folder, count=12, size=20, corrupt=0):
    """`count` coloured squares on white (size px), plus `corrupt` truncated PNGs, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        array = np.full((size, size, 3), 255, np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        array[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3)
        names.append(f"{i:02d}.png")
        Image.fromarray(array).save(folder / names[-1])
    for i in range(corrupt):
        names.append(f"broken{i}.png")
        (folder / names[-1]).write_bytes((folder / names[0]).read_bytes()[:60])
    write_metadata(folder, names)
    return str(folder)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("squares"))


def flags(**values):
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def tiny_run(output_dir, data_dir, vae_json, **overrides):
    """Flags for a run of a few 16 px steps on an imagefolder, nothing logged."""
    values = dict(train_data_dir=data_dir, vae_config=vae_json, output_dir=output_dir, resolution=16,
                  train_batch_size=3, validation_fraction=0.25, max_train_steps=2, learning_rate=1e-3,
                  checkpointing_steps=100, validation_steps=100, num_validation_images=2, report_to="none")
    values.update(overrides)
    return flags(**values)


def scalars(output_dir):
    events = EventAccumulator(glob.glob(os.path.join(output_dir, "logs", "train_vae", "events.*"))[0])
    events.Reload()
    return events, {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def training_images(output_dir):
    """The training split exactly as the run saw it, from the resolved config it saved."""
    config = parse_config(VAEConfig, ["--config", os.path.join(output_dir, "training_config.yaml")])
    rows = ImageCaptionDataset.from_config(load_splits(config)[0], config, train=False)
    return torch.stack([rows[i]["pixel_values"] for i in range(len(rows)) if not rows[i].get("skipped")])


def test_two_steps_write_a_loadable_vae_whose_scale_is_one_over_the_latent_std(tmp_path, openmoji_32, tiny_vae_json):
    output_dir = str(tmp_path / "vae")
    result = main(flags(vae_config=tiny_vae_json, output_dir=output_dir, resolution=32, max_train_samples=24,
                        max_validation_samples=8, train_batch_size=8, max_train_steps=2, checkpointing_steps=2,
                        validation_steps=1, mixed_precision="bf16", latent_channel_stats="true",
                        report_to="tensorboard"))

    assert {"config.json", "diffusion_pytorch_model.safetensors", "training_config.yaml"} <= set(os.listdir(output_dir))
    vae = AutoencoderKL.from_pretrained(output_dir)
    assert vae.config.scaling_factor == result["scaling_factor"] != 0.18215
    # The std of real posterior samples over the training images, drawn here, matches 1/scaling_factor
    # (8 draws of 24x4x16x16 latents: the sampling error of the std is about 0.2%).
    images = training_images(output_dir)
    assert len(images) == 24
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack([posterior.sample(generator=generator) for _ in range(8)])
    assert vae.config.scaling_factor == pytest.approx(1 / samples.std().item(), rel=0.02)
    channels = samples.transpose(0, 2).flatten(1)  # latent channel first
    assert vae.config.latents_std == pytest.approx(channels.std(1).tolist(), rel=0.02)
    assert vae.config.latents_mean == pytest.approx(channels.mean(1).tolist(), abs=0.03)

    # Mixed precision autocasts the forward only; the trainable weights stay fp32.
    for weights in (load_file(os.path.join(output_dir, "checkpoint-2", "model.safetensors")),
                    load_file(os.path.join(output_dir, "diffusion_pytorch_model.safetensors"))):
        assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    # Without a discriminator there is one model and one optimizer in the checkpoint.
    assert not glob.glob(os.path.join(output_dir, "checkpoint-2", "*_1.*"))

    events, tags = scalars(output_dir)
    for tag in ("train/loss", "train/reconstruction", "train/kl", "train/learning_rate", "train/images_per_second",
                "train/latent_std"):
        assert tags[tag] == [1, 2], tag
    assert tags["validation/psnr"] == tags["validation/ssim"] == [1, 2]
    assert tags["latents/scaling_factor"] == [2] and "train/generator" not in tags
    assert [e.step for e in events.Images("validation/reconstructions")] == [1, 2]
    grid = Image.open(os.path.join(output_dir, "validation", "step-000002.png"))
    assert grid.size == (8 * 32, 2 * 32)  # 8 originals above their 8 reconstructions
    assert 5 < result["psnr"] < 60 and 0 < result["ssim"] < 1


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, squares, tiny_vae_json):
    """Every stateful part is on: discriminator, EMA, a cosine schedule with warmup, gradient
    accumulation, random crops and flips. 9 training images in batches of 3, 2 batches per
    step: steps_per_epoch = 2, so checkpoint-3 stops one step (two batches) into epoch 1."""
    run = dict(max_train_steps=6, checkpointing_steps=3, use_discriminator="true", disc_start=1, disc_layers=2,
               disc_channels=8, use_ema="true", ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=2,
               gradient_accumulation_steps=2, center_crop="false", random_flip="true", validation_steps=2)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    main(tiny_run(whole, squares, tiny_vae_json, **run))
    # What a run killed after its first checkpoint leaves behind:
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    main(tiny_run(resumed, squares, tiny_vae_json, resume_from_checkpoint="latest", **run))

    # On one CPU process with a fixed thread count every operation is deterministic and every
    # random draw is replayed from checkpointed or (seed, batch)-derived state, so the runs should
    # agree to the bit; 1e-6 leaves room only for float reassociation, while one batch seen twice
    # or skipped moves these weights by more than 1e-3 (checked below against checkpoint-3).
    def same(name, tolerance=1e-6):
        a, b = (load_file(os.path.join(run_dir, name)) for run_dir in (whole, resumed))
        assert a.keys() == b.keys()
        return max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance

    assert same("checkpoint-6/model.safetensors")  # the VAE
    assert same("checkpoint-6/model_1.safetensors")  # the discriminator
    assert same("diffusion_pytorch_model.safetensors")  # the saved VAE: its EMA weights
    emas = [torch.load(os.path.join(d, "checkpoint-6", "custom_checkpoint_0.pkl"), weights_only=True)
            for d in (whole, resumed)]
    assert emas[0]["optimization_step"] == emas[1]["optimization_step"] == 6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(emas[0]["shadow_params"], emas[1]["shadow_params"]))
    optimizers = [torch.load(os.path.join(d, "checkpoint-6", "optimizer_1.bin"), weights_only=True)
                  for d in (whole, resumed)]
    assert all(torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-6)
               for a, b in zip(optimizers[0]["state"].values(), optimizers[1]["state"].values()))

    start = load_file(os.path.join(whole, "checkpoint-3", "model.safetensors"))
    end = load_file(os.path.join(whole, "checkpoint-6", "model.safetensors"))
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-3
    configs = [AutoencoderKL.load_config(d)["scaling_factor"] for d in (whole, resumed)]
    assert configs[0] == pytest.approx(configs[1], rel=1e-6)

    # A run resumed at its last step (here mid-epoch) takes no further step.
    done = str(tmp_path / "done")
    result = main(tiny_run(done, squares, tiny_vae_json, **{**run, "max_train_steps": 3,
                                                              "resume_from_checkpoint": f"{whole}/checkpoint-3"}))
    assert result["global_step"] == 3
    ema = torch.load(os.path.join(whole, "checkpoint-3", "custom_checkpoint_0.pkl"), weights_only=True)
    saved = AutoencoderKL.from_pretrained(done).parameters()
    assert all(torch.equal(p, average) for p, average in zip(saved, ema["shadow_params"]))


def test_two_processes_with_accelerate_launch(tmp_path, squares, tiny_vae_json):
    output_dir = str(tmp_path / "ddp")
    # `accelerate launch --cpu --num_processes 2` starts one process; torchrun (--multi_gpu) with
    # ACCELERATE_USE_CPU starts two that find each other over gloo.
    command = [*two_processes(0), "train_vae.py",
               *tiny_run(output_dir, squares, tiny_vae_json, max_train_steps=3, checkpointing_steps=3,
                         validation_steps=2, use_discriminator="true", disc_start=1, disc_layers=2,
                         disc_channels=8, use_ema="true")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoint = os.listdir(os.path.join(output_dir, "checkpoint-3"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "model_1.safetensors", "optimizer_1.bin"} <= set(checkpoint)
    vae = AutoencoderKL.from_pretrained(output_dir)
    # Both processes measured half of the training set each; the reduced result is the whole set's.
    with torch.no_grad():
        posterior = vae.encode(training_images(output_dir)).latent_dist
    second_moment, mean = (posterior.mean ** 2 + posterior.var).mean(), posterior.mean.mean()
    assert vae.config.scaling_factor == pytest.approx(1 / (second_moment - mean ** 2).sqrt().item(), rel=1e-4)
    assert "on each of 2 process(es)" in done.stderr and "held-out PSNR" in done.stderr


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny_vae_json):
    data = write_imagefolder(tmp_path / "data", count=11, corrupt=1)
    output_dir = str(tmp_path / "vae")
    result = main(tiny_run(output_dir, data, tiny_vae_json, validation_fraction=0, train_batch_size=4,
                           max_train_steps=3))  # 12 rows in 3 batches: every row is seen
    assert len(result["unreadable_images"]) == 1
    assert result["psnr"] is None  # no held-out split was asked for
    assert AutoencoderKL.from_pretrained(output_dir).config.scaling_factor == result["scaling_factor"]


def test_fine_tunes_a_pretrained_vae_and_measures_its_scale_anew(tmp_path, squares):
    torch.manual_seed(1)
    pretrained = AutoencoderKL.from_config(TINY_VAE)
    pretrained.save_pretrained(tmp_path / "pretrained")
    output_dir = str(tmp_path / "tuned")
    # A learning rate of 1e-9 leaves the weights where they started: the pretrained ones.
    main(tiny_run(output_dir, squares, "no-such-config.json", max_train_steps=1, learning_rate=1e-9,
                  pretrained_vae_model_name_or_path=str(tmp_path / "pretrained")))
    tuned = AutoencoderKL.from_pretrained(output_dir)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned.parameters(), pretrained.parameters()))
    assert tuned.config.scaling_factor != pretrained.config.scaling_factor


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tmp_path, squares, tiny_vae_json):
    output_dir = str(tmp_path / "vae")
    # A learning rate of 1e30 makes the first update's weights overflow on the next forward.
    with pytest.raises(NonFiniteLossError, match=r"the loss is .* at step (\d+): training diverged") as error:
        main(tiny_run(output_dir, squares, tiny_vae_json, learning_rate=1e30, checkpointing_steps=1,
                      max_train_steps=5))
    step = int(error.value.args[0].split(" at step ")[1].split(":")[0])
    assert step >= 2
    assert sorted(os.listdir(output_dir)) == sorted(["training_config.yaml"] +
                                                    [f"checkpoint-{s}" for s in range(1, step)])
    last = load_file(os.path.join(output_dir, f"checkpoint-{step - 1}", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())


def test_the_discriminator_switches_on_at_disc_start(tmp_path, squares, tiny_vae_json):
    output_dir = str(tmp_path / "gan")
    main(tiny_run(output_dir, squares, tiny_vae_json, max_train_steps=3, checkpointing_steps=1, validation_steps=3,
                  use_discriminator="true", disc_start=2, disc_layers=2, disc_channels=8, report_to="tensorboard"))
    _, tags = scalars(output_dir)
    assert tags["train/loss"] == [1, 2, 3]
    for tag in ("train/generator", "train/adaptive_weight", "train/discriminator", "train/logits_real"):
        assert tags[tag] == [3], tag  # global steps 0 and 1 ran before disc_start = 2
    critic = [load_file(os.path.join(output_dir, f"checkpoint-{step}", "model_1.safetensors")) for step in (1, 2, 3)]
    assert all(torch.equal(critic[0][k], critic[1][k]) for k in critic[0])  # untouched before disc_start
    assert any(not torch.equal(critic[1][k], critic[2][k]) for k in critic[0])  # trained after


def write_json(path, values):
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("overrides, message", [
    (dict(resolution=15), "resolution 15 is not divisible by the VAE factor 2"),
    (dict(lpips_weight=1.0), "lpips_weight = 1.0 needs the `lpips` package"),
    (dict(resume_from_checkpoint="elsewhere/checkpoint-x"), "'elsewhere/checkpoint-x' is not a complete checkpoint"),
    (dict(vae_config="missing.json"), "vae_config 'missing.json' is not a file"),
])
def test_config_errors_come_before_any_data_is_read(tmp_path, tiny_vae_json, monkeypatch, overrides, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no LPIPS weights here
    # The dataset does not exist: had the run got as far as reading it, the error would differ.
    argv = tiny_run(str(tmp_path / "out"), None, tiny_vae_json, **overrides)
    argv[argv.index("--train_data_dir"):argv.index("--train_data_dir") + 2] = ["--dataset_name", "no/such-dataset"]
    with pytest.raises(ConfigError, match=message):
        main(argv)


@pytest.mark.parametrize("change, message", [
    (dict(laten_channels=4), r"unknown AutoencoderKL key\(s\) laten_channels; valid keys: .*latent_channels"),
    (dict(_class_name="UNet2DConditionModel"), "describes a UNet2DConditionModel, not a AutoencoderKL"),
])
def test_a_wrong_architecture_file_is_named(tmp_path, change, message):
    path = write_json(tmp_path / "vae.json", {**TINY_VAE, **change})
    with pytest.raises(ConfigError, match=message):
        vae_architecture(VAEConfig(vae_config=path))


def test_demo_config_is_the_small_cpu_model():
    config = parse_config(VAEConfig, ["--config", os.path.join(REPO, "configs/vae/demo.yaml")])
    config.vae_config = os.path.join(REPO, config.vae_config)
    architecture = vae_architecture(config)
    assert (config.dataset_name, config.resolution, vae_scale_factor(architecture)) == ("openmoji", 32, 4)
    vae = load_vae(config, architecture)
    assert vae.config.latent_channels == 4
    assert sum(p.numel() for p in vae.parameters()) < 1_000_000


def test_gpu_config_parses_and_builds_a_stable_diffusion_sized_vae():
    config = parse_config(VAEConfig, ["--config", os.path.join(REPO, "configs/vae/sd_f8_256.yaml")])
    config.vae_config = os.path.join(REPO, config.vae_config)
    architecture = vae_architecture(config)
    assert (config.resolution, vae_scale_factor(architecture)) == (256, 8)
    require_divisible(config.resolution, vae_scale_factor(architecture), "VAE")
    vae = load_vae(config, architecture)
    assert vae.config.latent_channels == 4
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84e6  # Stable Diffusion's VAE: 83.7M
    critic = PatchDiscriminator(config.disc_channels, config.disc_layers)
    assert critic(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert config.use_discriminator and config.lpips_weight == 1.0 and config.kl_weight == 1e-6


def test_psnr_of_a_known_error():
    images = torch.zeros(2, 3, 8, 8)
    assert psnr(images, images + 0.2).tolist() == pytest.approx([20.0, 20.0])  # 10·log10(2² / 0.04)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 24, 24) * 2 - 1
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    ours = ssim(images, noisy)
    for i in range(2):
        reference = metrics.structural_similarity(
            ((images[i] + 1) / 2).numpy(), ((noisy[i] + 1) / 2).numpy(), channel_axis=0, data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(reference, abs=1e-4)
    assert ssim(images, images).tolist() == pytest.approx([1.0, 1.0])
