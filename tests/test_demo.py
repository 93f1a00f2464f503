"""`make demo` (ldm/demo.py): its stage commands, its failure handling, its summary and its speed probe;
`make lora-demo` (ldm/lora_demo.py): its concept and its config."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldm import demo, lora_demo
from ldm.config import parse_config
from ldm.data.openmoji import load_openmoji
from ldm.generation.config import parse_args, read_prompts
from ldm.training.unet_config import UNetConfig
from ldm.training.vae_config import VAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_stage_command_parses_with_the_repository_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = dict(demo.stages("python"))
    vae = parse_config(VAEConfig, commands["VAE"][2:])
    unet = parse_config(UNetConfig, commands["UNet"][2:])
    samples = parse_args(commands["samples"][2:])
    assert vae.output_dir == unet.pretrained_vae_model_name_or_path == demo.VAE_DIR
    assert samples.model == unet.output_dir == demo.UNET_DIR
    assert len(read_prompts(samples)) == 16


def test_a_failing_stage_stops_the_demo_with_its_exit_status():
    with pytest.raises(subprocess.CalledProcessError) as failure:
        demo.run_timed("failing", [sys.executable, "-c", "raise SystemExit(3)"])
    assert failure.value.returncode == 3


def test_the_summary_reports_each_stage_the_runs_metrics_and_the_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder, metrics in ((demo.VAE_DIR, {"psnr": 26.144, "global_step": 2500}),
                            (demo.UNET_DIR, {"global_step": 1234})):
        os.makedirs(folder)
        json.dump(metrics, open(os.path.join(folder, "metrics.json"), "w"))
    table = demo.summary({"VAE": 2.75, "UNet": 4.0}, fp32=180.4, bf16=301.6)
    assert "| VAE (minutes) | 2.8 |" in table and "| UNet (minutes) | 4.0 |" in table
    assert "| total (minutes) | 6.8 |" in table
    assert "| VAE held-out PSNR (dB) | 26.14 |" in table and "| UNet steps | 1234 |" in table
    assert "| matmul fp32 (GFLOP/s) | 180 |" in table and "| matmul bf16 (GFLOP/s) | 302 |" in table
    assert "held-out" not in table.replace("VAE held-out", "")  # a run that measured none shows none


def test_the_summary_shows_the_unets_held_out_loss_and_bound(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unet = {"global_step": 1200, "validation_loss": 0.0912, "best_validation_loss": 0.0905,
            "best_validation_step": 1000, "latent_bits_per_dim": 1.2345, "latent_bits_per_dim_se": 0.0123}
    for folder, metrics in ((demo.VAE_DIR, {"psnr": 24.4, "global_step": 1500}), (demo.UNET_DIR, unet)):
        os.makedirs(folder)
        json.dump(metrics, open(os.path.join(folder, "metrics.json"), "w"))
    table = demo.summary({"UNet": 5.5}, fp32=200, bf16=900)
    assert "| UNet held-out loss (best 0.0905 at step 1000) | 0.0912 |" in table
    assert "| UNet latent bits/dim | 1.234 ± 0.012 |" in table


def test_the_summary_of_a_flow_model_shows_its_held_out_loss_and_no_bound(tmp_path, monkeypatch):
    """A flow model (the demo's objective) has a held-out loss but no DDPM bound in its metrics."""
    monkeypatch.chdir(tmp_path)
    unet = {"global_step": 1200, "validation_loss": 0.4012, "best_validation_loss": 0.4012,
            "best_validation_step": 1200}
    for folder, metrics in ((demo.VAE_DIR, {"psnr": 24.4, "global_step": 1500}), (demo.UNET_DIR, unet)):
        os.makedirs(folder)
        json.dump(metrics, open(os.path.join(folder, "metrics.json"), "w"))
    table = demo.summary({"UNet": 5.5}, fp32=200, bf16=900)
    assert "| UNet held-out loss (best 0.4012 at step 1200) | 0.4012 |" in table and "bits/dim" not in table


def test_the_matmul_probe_runs_for_the_time_asked_and_counts_its_flops():
    start = time.perf_counter()
    gflops = demo.matmul_gflops(torch.float32, seconds=0.3, size=256)
    elapsed = time.perf_counter() - start
    assert 0.3 <= elapsed < 2.0
    # one 256×256 matmul is 2·256³ ≈ 0.034 GFLOP; a CPU does at least a few of them in 0.3 s
    assert 0.5 < gflops < 100_000


# ---------------------------------------------------------------- make lora-demo


def test_the_lora_demo_concept_is_inverted_training_emoji_under_the_new_word(openmoji_32, tmp_path):
    count = lora_demo.write_concept(str(tmp_path / "concept"))
    rows = [json.loads(line) for line in open(tmp_path / "concept" / "metadata.jsonl", encoding="utf-8")]
    train = load_openmoji(32)["train"]
    assert 2 * count == len(rows) and count == len(range(0, len(train), lora_demo.EVERY))
    first = train[0]
    assert [row["text"] for row in rows[:2]] == [f"{first['text']} inverted", first["text"]]  # styled, then prior
    styled, plain = (np.asarray(Image.open(tmp_path / "concept" / row["file_name"]), dtype=int) for row in rows[:2])
    assert (styled == 255 - np.asarray(first["image"].convert("RGB"), dtype=int)).all()
    assert (plain == np.asarray(first["image"].convert("RGB"), dtype=int)).all()
    assert not any("inverted" in caption.split() for caption in train["text"])  # a word the model never saw


def test_the_lora_demo_config_adapts_the_demo_model(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    with open("configs/unet/lora_demo.yaml", encoding="utf-8") as file:
        assert yaml.safe_load(file)["train_data_dir"] == lora_demo.DATA_DIR  # made by the demo before training
    config = parse_config(UNetConfig, ["--config", "configs/unet/lora_demo.yaml", "--train_data_dir", str(tmp_path)])
    assert config.pretrained_model_name_or_path == demo.UNET_DIR and config.lora_rank
    assert config.output_dir == lora_demo.LORA_DIR and config.train_text_encoder_lora
    assert all(line.endswith(" inverted") for line in open(lora_demo.PROMPTS, encoding="utf-8").read().splitlines())


def test_a_stage_stopped_by_a_signal_stops_the_demo_with_the_stage_s_code_after_it_has_exited(tmp_path):
    """SIGTERM sent to the demo alone reaches the stage; the demo waits for it, then exits 143."""
    saved = tmp_path / "saved"
    stage = textwrap.dedent(f"""
        import signal, sys, time
        def save_and_exit(number, frame):
            time.sleep(0.5)
            open({str(saved)!r}, "w").write("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, save_and_exit)
        print("ready", flush=True)
        time.sleep(60)
    """)
    script = textwrap.dedent(f"""
        import sys
        from ldm import demo
        try:
            demo.run_timed("stage", [sys.executable, "-c", {stage!r}])
        except demo.Interrupted as stop:
            print("interrupted", stop.code, flush=True)
            raise
    """)
    running = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in running.stdout:
        if line.strip() == "ready":
            break
    running.send_signal(signal.SIGTERM)
    out, _ = running.communicate(timeout=30)
    assert running.returncode == 143 and "interrupted 143" in out
    assert saved.read_text() == "saved"  # the demo waited for the stage to finish saving


def test_an_interrupted_demo_continues_after_its_finished_stages_and_a_changed_one_starts_over(tmp_path,
                                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("steps: 1\n")
    commands = [("one", ["python", "one"]), ("two", ["python", "two"])]
    key = demo.fingerprint(commands)
    demo.write_state(key, {"one": 1.5})
    assert demo.read_state(key) == {"one": 1.5}
    (tmp_path / "configs" / "a.yaml").write_text("steps: 2\n")
    assert demo.fingerprint(commands) != key and demo.read_state(demo.fingerprint(commands)) == {}
    assert demo.fingerprint(commands[:1]) != key
