"""Chaos: a trainer killed at random moments, by SIGTERM or SIGKILL, some kills landing inside a
checkpoint save, and resumed with `--resume_from_checkpoint latest` after each, must end with the
weights of an uninterrupted run, bit for bit.

    .venv/bin/python bench/chaos.py [--kills 6] [--processes 1 2] [--trainers vae unet] [--seed 0]

For each trainer and process count it trains tiny models on a tiny image folder, first straight
through, then with the kills, and prints: kills (SIGTERM / SIGKILL), kills during a save, the steps
re-done after each kill (the last step finished before it, minus the step its resume started from),
and whether the final weights are equal. Every resume must start from a complete checkpoint, every
SIGTERM must leave a checkpoint at the last finished step (0 steps re-done) and exit 143, and a
SIGKILL may cost at most --checkpointing_steps steps. tests/test_preemption.py runs it too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ldm.training.checkpoints import CHECKPOINT, PARTIAL_SUFFIX, SAVE_DELAY_VARIABLE, damage, newest_intact  # noqa: E402
from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE  # noqa: E402 (the test suite's tiny models)

STEPS, CHECKPOINTING_STEPS = 40, 4
PROGRESS = re.compile(r"train_(?:vae|unet): +\d+%\|[^|]*\| (\d+)/\d+ \[")  # the trainer's tqdm bar
STOPPED = re.compile(r"stopped on .+? after step (\d+), exit code (\d+)")


@dataclass
class Kill:
    signal: str
    during_save: bool
    last_step: int  # the last optimizer step the run had finished
    resumed_from: int  # the step of the checkpoint the next run started from
    exit_codes: list[int]  # of each training process: the launcher's, or those the workers announced

    @property
    def redone(self) -> int:
        return self.last_step - self.resumed_from


@dataclass
class Trial:
    trainer: str
    processes: int
    kills: list[Kill] = field(default_factory=list)
    equal: bool = False


def write_data(folder: str, count: int = 24, size: int = 16) -> None:
    """`count` coloured squares on white with a caption each: an imagefolder both trainers read."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        array = np.full((size, size, 3), 255, np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        array[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(array).save(os.path.join(folder, f"{i:02d}.png"))
        rows.append({"file_name": f"{i:02d}.png", "text": f"square {i % 6} {'red green blue'.split()[i % 3]}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)


def write_models(folder: str) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL.from_config({**TINY_VAE, "scaling_factor": 0.8}).save_pretrained(os.path.join(folder, "vae"))
    for name, config in (("vae.json", {"_class_name": "AutoencoderKL", **TINY_VAE}),
                         ("unet.json", {"_class_name": "UNet2DConditionModel", **TINY_UNET}),
                         ("text_encoder.json", TINY_TEXT_ENCODER)):
        with open(os.path.join(folder, name), "w") as file:
            json.dump(config, file)


def trainer_command(trainer: str, work: str, output_dir: str, processes: int, port: int) -> list[str]:
    common = ["--train_data_dir", os.path.join(work, "data"), "--output_dir", output_dir, "--resolution", "16",
              "--train_batch_size", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps",
              str(CHECKPOINTING_STEPS), "--validation_steps", "1000", "--report_to", "none", "--use_ema",
              "--ema_decay", "0.9", "--learning_rate", "1e-3", "--random_flip", "--resume_from_checkpoint", "latest"]
    if trainer == "vae":
        script = ["train_vae.py", "--vae_config", os.path.join(work, "vae.json"), "--validation_fraction", "0.25",
                  "--num_validation_images", "0", "--use_discriminator", "--disc_start", "5", "--disc_layers", "2",
                  "--disc_channels", "8", "--scale_batches", "1"]
    else:
        script = ["train_unet.py", "--pretrained_vae_model_name_or_path", os.path.join(work, "vae"),
                  "--unet_config", os.path.join(work, "unet.json"), "--text_encoder_config",
                  os.path.join(work, "text_encoder.json"), "--tokenizer_vocab_size", "300",
                  "--tokenizer_max_length", "16", "--cache_dir", os.path.join(work, "cache"),
                  "--validation_prompts", "square 1 red", "--validation_inference_steps", "2"]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    return [*launcher, *script, *common]


def environment(save_delay: float) -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", SAVE_DELAY_VARIABLE: str(save_delay),
            # every optimizer step on the progress bar, so the last one finished before a kill is known
            "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}


class Run:
    """A trainer process, its output read as it comes (tqdm's \\r-separated bar included)."""

    def __init__(self, command: list[str], env: dict):
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.text = ""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        for chunk in iter(lambda: self.process.stderr.read1(65536), b""):
            self.text += chunk.decode(errors="replace")

    @property
    def steps(self) -> list[int]:
        """The step counts the progress bar has shown, the resumed step it starts at first."""
        return [int(step) for step in PROGRESS.findall(self.text)]

    @property
    def training(self) -> bool:
        """Whether it has finished a step of its own (the bar starts at the step it resumed at)."""
        return len(set(self.steps)) > 1

    def wait_for_training(self, timeout: float = 300) -> None:
        """Until it has finished a step of its own, or exited."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and not self.training:
            if time.monotonic() > deadline:
                kill(self, "SIGKILL")
                raise TimeoutError(f"no training step in {timeout} s:\n{self.text[-3000:]}")
            time.sleep(0.01)

    @property
    def last_step(self) -> int:
        stopped = STOPPED.findall(self.text)
        return int(stopped[-1][0]) if stopped else max(self.steps, default=0)

    @property
    def worker_exit_codes(self) -> list[int]:
        """The exit codes the processes that stopped on a signal announced (torchrun's own is 1 then)."""
        return [int(code) for _, code in STOPPED.findall(self.text)]

    def wait(self, timeout: float = 600) -> int:
        """The exit code; a run still going after `timeout` seconds is killed, with its workers."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(self, "SIGKILL")
            raise
        self.reader.join(10)
        return code


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (torchrun starts its workers in sessions of their own,
    out of reach of a signal to the launcher's process group)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as file:
                parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone already
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill(run: Run, name: str) -> None:
    """SIGTERM to the launcher (torchrun forwards it to its workers, as SLURM's to a job step);
    SIGKILL to the launcher and every worker at once, as a node that vanishes."""
    if name == "SIGKILL":
        for pid in [run.process.pid, *descendants(run.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    else:
        run.process.send_signal(signal.SIGTERM)


def one_kill(run: Run, output_dir: str, rng: random.Random, name: str, in_save: bool) -> bool | None:
    """Kill `run` once it has trained: at a random moment, or inside its next checkpoint save.
    Returns whether a save was under way at the kill, or None when the run finished first."""
    run.wait_for_training()
    deadline = time.monotonic() + (30 if in_save else rng.uniform(0.0, 1.0))
    while run.process.poll() is None and time.monotonic() < deadline:
        if in_save and saving(output_dir):
            time.sleep(rng.uniform(0.0, 0.1))  # within the save, which the delay holds open for longer
            break
        time.sleep(0.005)
    if run.process.poll() is not None:
        return None
    during_save = saving(output_dir)
    kill(run, name)
    return during_save


def saving(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and any(name.endswith(PARTIAL_SUFFIX) for name in os.listdir(output_dir))


def checkpoint_step(path: str | None) -> int:
    return int(CHECKPOINT.fullmatch(os.path.basename(path)).group(1)) if path else 0


def final_weights(trainer: str, output_dir: str) -> dict[str, torch.Tensor]:
    name = "diffusion_pytorch_model.safetensors"
    return load_file(os.path.join(output_dir, name) if trainer == "vae" else os.path.join(output_dir, "unet", name))


def run_trial(trainer: str, processes: int, kills: int, work: str, seed: int, save_delay: float = 0.2) -> Trial:
    """The uninterrupted run, then the run killed `kills` times (every second kill inside a save), each
    kill followed by a resume, then resumed to the end. Fewer kills are made if the run gets through
    its last step first."""
    rng = random.Random(f"{seed}/{trainer}/{processes}")
    port = 29500 + (os.getpid() + 97 * processes + (0 if trainer == "vae" else 7)) % 900
    env = environment(save_delay)
    straight = os.path.join(work, f"{trainer}-{processes}-straight")
    done = Run(trainer_command(trainer, work, straight, processes, port), env)
    if done.wait() != 0:
        raise RuntimeError(f"the uninterrupted {trainer} run failed:\n{done.text[-3000:]}")
    trial, chaotic = Trial(trainer, processes), os.path.join(work, f"{trainer}-{processes}-chaos")
    while len(trial.kills) < kills:
        run = Run(trainer_command(trainer, work, chaotic, processes, port + 1 + len(trial.kills)), env)
        name = rng.choice(["SIGTERM", "SIGKILL"])
        during_save = one_kill(run, chaotic, rng, name, in_save=len(trial.kills) % 2 == 1)
        code = run.wait()
        if during_save is None and code != 0:
            raise RuntimeError(f"the {trainer} run failed before kill {len(trial.kills) + 1}:\n{run.text[-3000:]}")
        if during_save is None or run.last_step == STEPS:
            break  # it finished training before the kill, which then met the final save: no more kills
        resume = newest_intact(chaotic)  # what the next run will start from; a .partial is never one
        assert resume is None or damage(resume) is None
        codes = [code] if processes == 1 or name == "SIGKILL" else run.worker_exit_codes
        trial.kills.append(Kill(name, during_save, run.last_step, checkpoint_step(resume), codes))
    run = Run(trainer_command(trainer, work, chaotic, processes, port + 1 + len(trial.kills)), env)
    if run.wait() != 0:
        raise RuntimeError(f"the resumed {trainer} run failed:\n{run.text[-3000:]}")
    first, second = final_weights(trainer, straight), final_weights(trainer, chaotic)
    trial.equal = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    return trial


def problems(trial: Trial) -> list[str]:
    """What the trial broke of the promises in this file's docstring."""
    found = [] if trial.equal else ["the final weights differ from the uninterrupted run's"]
    for number, kill in enumerate(trial.kills, 1):
        if kill.signal == "SIGTERM" and (kill.redone != 0 or kill.exit_codes != [143] * trial.processes):
            found.append(f"kill {number} (SIGTERM): {kill.redone} steps re-done, exit codes {kill.exit_codes}")
        if kill.signal == "SIGKILL" and not 0 <= kill.redone <= CHECKPOINTING_STEPS:
            found.append(f"kill {number} (SIGKILL): {kill.redone} steps re-done")
    return found


def table(trials: list[Trial]) -> str:
    lines = ["| trainer | processes | kills (SIGTERM / SIGKILL) | kills during a save | steps re-done after "
             "SIGTERM | exit codes after SIGTERM | steps re-done after SIGKILL | final weights equal |",
             "|---|---:|---|---:|---|---|---|---|"]
    for trial in trials:
        terms = [k.redone for k in trial.kills if k.signal == "SIGTERM"]
        kills = [k.redone for k in trial.kills if k.signal == "SIGKILL"]
        lines.append(f"| {trial.trainer} | {trial.processes} | {len(trial.kills)} ({len(terms)} / {len(kills)}) | "
                     f"{sum(k.during_save for k in trial.kills)} | {terms} | "
                     f"{sorted({c for k in trial.kills if k.signal == 'SIGTERM' for c in k.exit_codes})} | {kills} | "
                     f"{'yes, bit for bit' if trial.equal else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trainers", nargs="+", choices=["vae", "unet"], default=["vae", "unet"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as work:
        write_data(os.path.join(work, "data"))
        write_models(work)
        trials = [run_trial(trainer, processes, args.kills, work, args.seed)
                  for trainer in args.trainers for processes in args.processes]
    print(table(trials))
    broken = [f"{t.trainer}, {t.processes} process(es): {problem}" for t in trials for problem in problems(t)]
    print("\n".join(broken) or f"\nevery promise kept ({STEPS} steps, checkpoint every {CHECKPOINTING_STEPS})")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
