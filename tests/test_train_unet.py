"""train_unet.py end to end on tiny models: real datasets, real files, real subprocesses."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import train_unet
from ldm.config import RUN_CONFIG, ConfigError, parse_config
from ldm.data.dataset import load_splits
from ldm.diffusion.objective import noise_scheduler
from ldm.models.text import load_text_components
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.training.latent_batches import training_data
from ldm.training.loop import NonFiniteLossError, make_accelerator
from ldm.training.unet import load_frozen_vae
from ldm.training.unet_config import UNetConfig
from tests.conftest import TINY_UNET, TINY_VAE, run_in_two_processes
from tests.test_streaming import write_parquet_shards

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def argv(parts, output_dir, *extra, prompts=("red heart", "cat face")):
    """A tiny run's flags; `prompts=()` leaves the validation prompts to a --config file in `extra`."""
    return ["--pretrained_vae_model_name_or_path", str(parts / "vae"), "--unet_config", str(parts / "unet.json"),
            "--text_encoder_config", str(parts / "text_encoder.json"), "--output_dir", str(output_dir),
            "--resolution", "16", "--max_train_samples", "20", "--train_batch_size", "8",
            "--tokenizer_vocab_size", "400", "--tokenizer_max_length", "16", "--report_to", "none",
            *(["--validation_prompts", *prompts] if prompts else []), "--validation_inference_steps", "2",
            "--lr_scheduler", "constant", "--use_ema", "--ema_decay", "0.9", *extra]


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("schedule", ["scaled_linear", "sigmoid"])
def test_two_step_run_writes_a_pipeline_that_generate_loads(parts, tmp_path, openmoji_32, schedule):
    """Also with a noise schedule that only DDPMScheduler knows: every sampler, ours and diffusers',
    reads the schedule the model was trained with from the saved config."""
    out = tmp_path / "run"
    result = train_unet.main(argv(parts, out, "--max_train_steps", "2", "--validation_steps", "1",
                                  "--beta_schedule", schedule, "--beta_start", "0.0001", "--beta_end", "0.02"))
    assert result["global_step"] == 2
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    trained = noise_scheduler("epsilon", beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)
    assert saved["beta_schedule"] == schedule and saved["beta_start"] == 0.0001
    assert torch.equal(DDIMScheduler.from_config(saved).alphas_cumprod, trained.alphas_cumprod)
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
            "training_config.yaml"} <= set(os.listdir(out))
    assert os.path.isfile(out / "validation" / "step-000001.png")
    assert AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor == 0.8
    # diffusers' own pipeline reads the folder as it is, and draws the same images
    ours = LatentDiffusionPipeline.from_pretrained(out)
    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    drawn = [pipe("rocket", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images for pipe in (ours, theirs)]
    assert abs(drawn[0] - drawn[1]).max() <= 1e-4
    generated = subprocess.run(
        [sys.executable, "generate.py", "--model", str(out), "--prompt", "red heart", "--num_inference_steps", "2",
         "--output_dir", str(tmp_path / "images")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert [name for name in os.listdir(tmp_path / "images") if name.endswith(".png")]


def cache_stamps(cache_root):
    return {name: os.stat(os.path.join(cache_root, name)).st_mtime_ns for name in os.listdir(cache_root)
            if name.startswith(("latents-", "texts-"))}


def test_runs_reuse_the_caches_and_rebuild_them_when_inputs_change(parts, tmp_path, isolated_cache, openmoji_32):
    """A run with the first run's (frozen, untrained) text encoder and the same VAE and data reuses
    its caches; another VAE invalidates the latent caches only (the training rows' and the held-out
    images')."""
    train_unet.main(argv(parts, tmp_path / "a", "--max_train_steps", "1"))
    after_a = cache_stamps(isolated_cache)
    assert {name.split("-")[0] for name in after_a} == {"latents", "texts"}
    AcceleratorState._reset_state(reset_partial_state=True)
    frozen_text = ["--text_encoder_name_or_path", str(tmp_path / "a"), "--max_train_steps", "1"]
    train_unet.main(argv(parts, tmp_path / "b", *frozen_text))
    after_b = cache_stamps(isolated_cache)
    assert after_b == after_a
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(1)
    AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8}).save_pretrained(tmp_path / "other_vae")
    train_unet.main(argv(parts, tmp_path / "d", *frozen_text, "--pretrained_vae_model_name_or_path",
                         str(tmp_path / "other_vae")))
    new = set(cache_stamps(isolated_cache)) - set(after_b)
    # the training rows' latent cache at least (the held-out images' may exist from another test's run)
    assert new and all(name.startswith("latents-") for name in new)


FLOW = ["--prediction_type", "flow_prediction", "--flow_shift", "2.5"]


@pytest.mark.parametrize("sampling", ["uniform", "importance", "flow_logit_normal"])
def test_resumed_run_ends_with_the_same_weights(parts, tmp_path, openmoji_32, sampling):
    """20 rows at batch 8 are 3 steps an epoch: the run stops mid-epoch at step 4, and the resumed
    run must skip the batches it saw and replay the same noise, dropout, flips and captions.

    Stopping at max_train_steps 4 and resuming to 7 is what a kill after checkpoint-4 leaves:
    nothing after a checkpoint survives a kill, and with a constant LR the total length changes
    nothing before step 4. Both runs share a saved text encoder (a BPE tokenizer trained anew can
    break ties differently). CPU kernels are deterministic here, so the weights match exactly."""
    common = ["--checkpointing_steps", "2", "--validation_steps", "100", "--caption_dropout", "0.3",
              "--random_flip", "--text_encoder_name_or_path", str(parts / "clip")]
    common += [*FLOW, "--timestep_sampling", "logit_normal"] if sampling == "flow_logit_normal" else [
        "--timestep_sampling", sampling]
    if sampling == "importance":  # 4 timesteps x 2 losses: warmed up within the first steps, then non-uniform
        common += ["--num_train_timesteps", "4", "--importance_history", "2"]
    train_unet.main(argv(parts, tmp_path / "straight", "--max_train_steps", "7", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(argv(parts, tmp_path / "resumed", "--max_train_steps", "4", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet.main(argv(parts, tmp_path / "resumed", "--max_train_steps", "7", "--resume_from_checkpoint", "latest",
                         *common))
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    # and the steps after the checkpoint did change the weights (EMA included)
    at_four = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.equal(straight[name], at_four[name]) for name in straight)
    if sampling == "importance":  # the loss history is in the checkpoint, past its warm-up
        history = torch.load(tmp_path / "resumed" / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=True)
        assert (history["counts"] >= 2).all()


def test_unknown_schedule_or_sampling_fails_before_any_work_listing_the_valid_ones(tmp_path, capsys):
    for flag, value in (("--beta_schedule", "cosine"), ("--timestep_sampling", "lognormal")):
        with pytest.raises(SystemExit):
            parse_config(UNetConfig, ["--output_dir", str(tmp_path / "run"), flag, value])
        error = capsys.readouterr().err
        assert f"invalid choice: '{value}'" in error
        assert ("squaredcos_cap_v2" in error) if flag == "--beta_schedule" else ("logit_normal" in error)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ConfigError, match="0 < beta_start < beta_end < 1"):
        parse_config(UNetConfig, ["--beta_start", "0.02", "--beta_end", "0.01"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(parts, tmp_path, openmoji_32):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step"):
        train_unet.main(argv(parts, out, "--max_train_steps", "50", "--checkpointing_steps", "1",
                             "--learning_rate", "1e30", "--max_grad_norm", "0", "--lr_warmup_steps", "0"))
    checkpoints = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert checkpoints and not [name for name in checkpoints if not name.split("-")[1].isdigit()]
    assert os.path.isfile(out / checkpoints[-1] / "model.safetensors")


def test_cross_attention_dim_must_match_the_text_encoder(parts, tmp_path, openmoji_32):
    wrong = tmp_path / "unet.json"
    wrong.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET, "cross_attention_dim": 24}))
    with pytest.raises(ConfigError, match="cross_attention_dim 24 does not match the text encoder's hidden_size 32"):
        train_unet.main(argv(parts, tmp_path / "run", "--unet_config", str(wrong)))


def test_missing_vae_fails_before_work(parts, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train_unet.main(argv(parts, tmp_path / "run", "--pretrained_vae_model_name_or_path", str(tmp_path / "nope")))
    assert not os.path.exists(tmp_path / "run")


def test_two_process_launch(parts, tmp_path, openmoji_32):
    """torchrun (--multi_gpu) with ACCELERATE_USE_CPU starts two CPU processes over gloo;
    `accelerate launch --cpu --num_processes 2` would quietly start one."""
    out = tmp_path / "run"
    launched = run_in_two_processes(7, "train_unet.py", *argv(parts, out, "--max_train_steps", "2",
                                                             "--validation_steps", "100", "--checkpointing_steps", "1"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    # each process saved its own RNG state and data position into the checkpoint
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    assert UNet2DConditionModel.from_pretrained(out / "unet").config.cross_attention_dim == 32


def test_two_process_flow_run(parts, tmp_path, openmoji_32):
    out = tmp_path / "run"
    launched = run_in_two_processes(8, "train_unet.py", *argv(parts, out, "--max_train_steps", "2", *FLOW,
                                                             "--validation_steps", "100", "--checkpointing_steps", "2"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "flow_prediction" and saved["flow_shift"] == 2.5


def test_flow_run_saves_a_flow_pipeline_that_generate_draws(parts, tmp_path, openmoji_32):
    """The saved sampler is DPM-Solver++ on flow sigmas with the training shift; the held-out loss is logged
    and the bound reported as skipped; generate.py draws with it and with flow_euler, and refuses DDIM."""
    out = tmp_path / "run"
    result = train_unet.main(argv(parts, out, "--max_train_steps", "2", "--validation_steps", "1",
                                  "--evaluation_steps", "1", "--validation_loss_samples", "8", *FLOW,
                                  "--weighting_scheme", "cosmap", "--snr_gamma", "0"))
    assert result["global_step"] == 2 and "validation_loss" in result
    assert "flow_prediction model has no beta schedule" in result["latent_bits_per_dim_skipped"]
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler" and saved["use_flow_sigmas"] is True
    assert saved["flow_shift"] == 2.5 and saved["prediction_type"] == "flow_prediction"
    for scheduler in ("dpm++2m", "flow_euler"):
        generated = subprocess.run(
            [sys.executable, "generate.py", "--model", str(out), "--prompt", "red heart", "--num_inference_steps", "2",
             "--scheduler", scheduler, "--output_dir", str(tmp_path / scheduler)], cwd=ROOT, capture_output=True,
            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert generated.returncode == 0, generated.stderr[-2000:]
        assert [name for name in os.listdir(tmp_path / scheduler) if name.endswith(".png")]
    refused = subprocess.run(
        [sys.executable, "generate.py", "--model", str(out), "--prompt", "red heart", "--scheduler", "ddim",
         "--output_dir", str(tmp_path / "ddim")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 2
    assert "'ddim' cannot sample a flow_prediction model; the ones that can: dpm++2m, unipc" in refused.stderr
    assert not os.path.exists(tmp_path / "ddim") or not os.listdir(tmp_path / "ddim")


def test_fine_tuning_a_flow_pipeline_keeps_its_objective_and_shift(parts, tmp_path, openmoji_32):
    """No --prediction_type or --flow_shift: the whole UNet fine-tunes on the base's flow objective and shift,
    which the saved pipeline's scheduler and training_config.yaml then say."""
    base = tmp_path / "base"
    train_unet.main(argv(parts, base, "--max_train_steps", "1", "--validation_steps", "100", *FLOW))
    AcceleratorState._reset_state(reset_partial_state=True)
    tuned = tmp_path / "tuned"
    train_unet.main(argv(parts, tuned, "--max_train_steps", "1", "--validation_steps", "100",
                         "--pretrained_model_name_or_path", str(base), "--text_encoder_name_or_path", str(base)))
    saved = json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["prediction_type"], saved["use_flow_sigmas"], saved["flow_shift"]) == ("flow_prediction", True, 2.5)
    resolved = parse_config(UNetConfig, ["--config", str(tuned / RUN_CONFIG)])
    assert (resolved.prediction_type, resolved.flow_shift) == ("flow_prediction", 2.5)
    assert not all(torch.equal(a, b) for a, b in zip(unet_weights(base).values(), unet_weights(tuned).values()))


@pytest.mark.parametrize("data", ["latents and text cached", "latents cached", "nothing cached"])
def test_loader_workers_give_the_same_batches_as_none(parts, tmp_path, openmoji_32, data):
    """--dataloader_num_workers 2 gives the batches of 0 workers, over two epochs, on each path;
    with the text cache off, only latents come from disk and the captions are tokenized in the step."""
    flags = {"latents and text cached": [], "latents cached": ["--cache_text_embeddings", "false"],
             "nothing cached": ["--cache_latents", "false"]}[data]
    config = parse_config(UNetConfig, argv(parts, tmp_path / "run", "--random_flip", "--text_encoder_name_or_path",
                                           str(parts / "clip"), *flags))
    accelerator = make_accelerator(config)
    vae = load_frozen_vae(config)
    tokenizer, text_encoder = load_text_components(config.text_encoder_name_or_path)
    train_rows = load_splits(config)[0]

    def two_epochs(workers):
        config.dataloader_num_workers = workers
        data = training_data(config, accelerator, train_rows, vae, tokenizer, text_encoder)
        data.loader = accelerator.prepare(data.loader)
        _, batches = data.resume(accelerator, config)
        return [batch for _, (_, batch) in zip(range(6), batches)]  # 20 rows at batch 8: 3 batches an epoch

    plain, workers = two_epochs(0), two_epochs(2)
    for one, other in zip(plain, workers):
        assert one.keys() == other.keys()
        for key, value in one.items():
            assert torch.equal(value, other[key]) if isinstance(value, torch.Tensor) else value == other[key]
    assert ("embeddings" in plain[0]) == (data == "latents and text cached")
    assert ("captions" in plain[0]) == (data != "latents and text cached")
    assert not torch.equal(plain[0]["pixel_values" if data == "nothing cached" else "mean"],
                           plain[3]["pixel_values" if data == "nothing cached" else "mean"])  # reshuffled


def test_two_process_streaming_run_resumes_where_it_stopped(parts, tmp_path, openmoji_32):
    """--streaming over 4 Parquet shards with 2 processes (each reads 2 shards): stopped after its
    checkpoint at step 4 and resumed to 7 (into the second epoch), it ends with the weights of an
    uninterrupted run: every process took the same examples in the same order."""
    write_parquet_shards(tmp_path / "data", shards=4, rows=40)
    common = ["--dataset_name", str(tmp_path / "data"), "--streaming",
              "--checkpointing_steps", "2", "--validation_steps", "100", "--random_flip", "--center_crop", "false",
              "--text_encoder_name_or_path", str(parts / "clip")]

    def launch(output_dir, *extra):
        flags = argv(parts, output_dir, *common, *extra)
        at = flags.index("--max_train_samples")  # a stream is read whole
        del flags[at:at + 2]
        done = run_in_two_processes(len(extra) * 13, "train_unet.py", *flags)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "straight", "--max_train_steps", "7")
    launch(tmp_path / "resumed", "--max_train_steps", "4")
    assert {"stream_state_0.json", "stream_state_1.json"} <= set(os.listdir(tmp_path / "resumed" / "checkpoint-4"))
    launch(tmp_path / "resumed", "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    at_four = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.equal(straight[name], at_four[name]) for name in straight)


def test_fine_tuning_takes_vae_unet_and_text_side_from_one_pipeline(parts, tmp_path, openmoji_32):
    """The Stable Diffusion 1.x layout: --pretrained_model_name_or_path, --pretrained_vae_model_name_or_path
    and --text_encoder_name_or_path all name one pipeline, whose unet/, vae/ and text_encoder/ are used."""
    base = tmp_path / "base"
    train_unet.main(argv(parts, base, "--max_train_steps", "1", "--validation_steps", "100"))
    AcceleratorState._reset_state(reset_partial_state=True)
    tuned = tmp_path / "tuned"
    train_unet.main(argv(parts, tuned, "--max_train_steps", "1", "--validation_steps", "100",
                         "--pretrained_model_name_or_path", str(base), "--pretrained_vae_model_name_or_path", str(base),
                         "--text_encoder_name_or_path", str(base)))
    for frozen in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(base / frozen), load_file(tuned / frozen)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (tuned / "tokenizer" / "tokenizer.json").read_text() == (base / "tokenizer" / "tokenizer.json").read_text()
    unet_before, unet_after = unet_weights(base), unet_weights(tuned)  # the UNet started from base's and trained
    assert unet_before.keys() == unet_after.keys() and not all(torch.equal(unet_before[k], unet_after[k])
                                                               for k in unet_before)
    with pytest.raises(ConfigError, match="holds a UNet2DConditionModel, not a VAE"):
        train_unet.main(argv(parts, tmp_path / "bad", "--pretrained_vae_model_name_or_path", str(base / "unet")))
