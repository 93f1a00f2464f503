"""Stopping on a signal (ldm/training/preemption.py), checkpoints checked before a resume (ldm/training/loop.py),
and the chaos harness of bench/chaos.py: trainers killed at random moments, by SIGTERM or SIGKILL,
some kills inside a save, end with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import train_vae

# chaos as a module of bench/, not with bench/ first on sys.path: there, bench/onnx.py would shadow the
# onnx package that torch.onnx.export imports (and test_onnx.py's exports fail).
from bench import chaos
from ldm.config import ConfigError
from ldm.training.checkpoints import MANIFEST, complete_checkpoints
from tests.test_train_vae import tiny_run, tiny_vae_json, write_imagefolder  # noqa: F401 (a fixture)
from tests.test_training import fresh_accelerator_state  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_signal_is_recorded_a_repeat_within_a_second_is_the_same_request_and_a_later_one_exits_at_once():
    done = run_python("""
        import os, signal, time
        from ldm.training.preemption import StopOnSignal
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGINT)  # as torchrun forwards the terminal's Ctrl-C
            time.sleep(0.01)
            print("recorded", stop.signal.name, stop.exit_code, flush=True)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
    """)
    assert done.returncode == 130, done.stderr
    assert done.stdout.split() == ["recorded", "SIGUSR1", "138"]
    assert "SIGINT again: stopping now, without saving" in done.stderr


def test_handlers_are_restored_after_the_loop_and_off_with_save_on_signal_false():
    done = run_python("""
        import signal
        from ldm.training.preemption import StopOnSignal
        before = signal.getsignal(signal.SIGTERM)
        with StopOnSignal():
            assert signal.getsignal(signal.SIGTERM) != before
        assert signal.getsignal(signal.SIGTERM) == before
        with StopOnSignal(enabled=False):
            assert signal.getsignal(signal.SIGTERM) == before
        print("ok")
    """)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.fixture(scope="module")
def chaos_work(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("chaos"))
    chaos.write_data(os.path.join(work, "data"))
    chaos.write_models(work)
    return work


def test_killed_vae_runs_resume_to_the_uninterrupted_weights(chaos_work):
    """One process, 2 kills (the second inside a checkpoint save): see bench/chaos.py."""
    trial = chaos.run_trial("vae", 1, kills=2, work=chaos_work, seed=0)
    assert len(trial.kills) == 2 and trial.kills[1].during_save
    assert {kill.signal for kill in trial.kills} == {"SIGTERM", "SIGKILL"}
    assert chaos.problems(trial) == []


@pytest.mark.slow
@pytest.mark.parametrize("trainer, processes", [("unet", 1), ("vae", 2), ("unet", 2)])
def test_killed_runs_resume_to_the_uninterrupted_weights(chaos_work, trainer, processes):
    trial = chaos.run_trial(trainer, processes, kills=4, work=chaos_work, seed=1)
    assert len(trial.kills) == 4 and any(kill.during_save for kill in trial.kills)
    assert chaos.problems(trial) == []


def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(chaos_work, tmp_path):
    """SIGUSR1 to one worker only: the other hears of it through the all-reduce, and both save the
    same checkpoint and exit (138 for the one signalled, 143 for the other)."""
    output_dir = str(tmp_path / "run")
    run = chaos.Run(chaos.trainer_command("vae", chaos_work, output_dir, 2, 29500 + (os.getpid() + 611) % 1000),
                    chaos.environment(save_delay=0))
    run.wait_for_training()
    workers = subprocess.run(["pgrep", "-P", str(run.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)
    run.wait(300)
    stops = chaos.STOPPED.findall(run.text)
    assert len(stops) == 2 and stops[0][0] == stops[1][0], run.text[-3000:]
    assert sorted(code for _, code in stops) == ["138", "143"]
    step = int(stops[0][0])
    assert complete_checkpoints(output_dir)[-1].endswith(f"checkpoint-{step}") and step < chaos.STEPS


def test_save_on_signal_false_leaves_sigterm_to_end_the_process(chaos_work, tmp_path):
    output_dir = str(tmp_path / "run")
    command = chaos.trainer_command("vae", chaos_work, output_dir, 1, 0) + ["--save_on_signal", "false"]
    run = chaos.Run(command, chaos.environment(save_delay=0))
    run.wait_for_training()
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(120) == -signal.SIGTERM
    assert not chaos.STOPPED.search(run.text)


# ---------------------------------------------------------------- a damaged checkpoint


@pytest.fixture
def two_checkpoints(tmp_path, tiny_vae_json):
    data = write_imagefolder(tmp_path / "data", count=8)
    output_dir = str(tmp_path / "run")
    train_vae.main(tiny_run(output_dir, data, tiny_vae_json, max_train_steps=2, checkpointing_steps=1))
    return data, output_dir


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


def test_a_damaged_latest_checkpoint_is_passed_over_with_a_warning_naming_the_file(two_checkpoints, tiny_vae_json,
                                                                                  caplog):
    data, output_dir = two_checkpoints
    damaged = os.path.join(output_dir, "checkpoint-2", "model.safetensors")
    truncate(damaged)
    weights = os.path.join(output_dir, "diffusion_pytorch_model.safetensors")
    uninterrupted = load_file(weights)
    os.remove(weights)
    result = train_vae.main(tiny_run(output_dir, data, tiny_vae_json, max_train_steps=2, checkpointing_steps=100,
                                     resume_from_checkpoint="latest"))
    assert f"not resuming from a damaged checkpoint: {damaged} has" in caplog.text
    assert f"using {os.path.join(output_dir, 'checkpoint-1')}" in caplog.text
    # step 2 trained again from checkpoint 1 ends where the uninterrupted run did
    assert result["global_step"] == 2
    final = load_file(weights)
    assert all(torch.equal(final[name], uninterrupted[name]) for name in uninterrupted)


def test_a_damaged_checkpoint_named_or_all_damaged_stops_before_work_naming_the_file(two_checkpoints, tiny_vae_json):
    data, output_dir = two_checkpoints
    for step in (1, 2):
        os.remove(os.path.join(output_dir, f"checkpoint-{step}", "optimizer.bin"))
    named = os.path.join(output_dir, "checkpoint-2")
    with pytest.raises(ConfigError, match=f"{named}' is damaged: {named}/optimizer.bin is missing"):
        train_vae.main(tiny_run(output_dir, data, tiny_vae_json, resume_from_checkpoint=named))
    with pytest.raises(ConfigError, match="every checkpoint in .* is damaged: .*checkpoint-2/optimizer.bin is missing; "
                                          ".*checkpoint-1/optimizer.bin is missing"):
        train_vae.main(tiny_run(output_dir, data, tiny_vae_json, resume_from_checkpoint="latest"))


def test_the_manifest_lists_every_file_of_the_checkpoint_with_its_size(two_checkpoints):
    _, output_dir = two_checkpoints
    folder = os.path.join(output_dir, "checkpoint-2")
    with open(os.path.join(folder, MANIFEST)) as file:
        sizes = json.load(file)
    on_disk = {name for name in os.listdir(folder) if name != MANIFEST}
    assert set(sizes) == on_disk and {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= on_disk
    assert all(os.path.getsize(os.path.join(folder, name)) == size for name, size in sizes.items())


def test_a_trainer_run_from_another_thread_keeps_the_default_handlers():
    done = run_python("""
        import signal, threading
        from ldm.training.preemption import StopOnSignal
        before, seen = signal.getsignal(signal.SIGTERM), []
        def work():
            with StopOnSignal():
                seen.append(signal.getsignal(signal.SIGTERM))
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        print(seen == [before])
    """)
    assert done.stdout.strip() == "True", done.stderr
