"""`make demo` (ldm/demo.py): its stage commands, its failure handling, its summary and its speed probe."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ldm import demo
from ldm.config import UNetConfig, VAEConfig, parse_config
from ldm.generate import parse_args, read_prompts

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


def test_the_matmul_probe_runs_for_the_time_asked_and_counts_its_flops():
    start = time.perf_counter()
    gflops = demo.matmul_gflops(torch.float32, seconds=0.3, size=256)
    elapsed = time.perf_counter() - start
    assert 0.3 <= elapsed < 2.0
    # one 256×256 matmul is 2·256³ ≈ 0.034 GFLOP; a CPU does at least a few of them in 0.3 s
    assert 0.5 < gflops < 100_000
