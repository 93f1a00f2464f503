"""Atomic checkpoints and exact resume.

A checkpoint is written into `checkpoint-<step>.partial` and renamed only once complete, with a
manifest of its files' sizes written last, so a run killed at any moment resumes from its last
complete checkpoint, and a damaged one is passed over with a warning.

Exact resume rests on four things: the shuffle order of epoch e depends on (seed, e) only
(`make_accelerator`), so do a row's random crop and flip (ldm.data.dataset's EpochDataset, told the
epoch by `resumed_batches`), the noise of a batch depends on (seed, process, batch) only
(`batch_generator`), and `resume_state` returns how many batches of the resumed epoch were seen.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable

from accelerate import Accelerator
from accelerate.logging import get_logger

from ldm.config import RUN_CONFIG, ConfigError, save_config
from ldm.training.config import TrainConfig

logger = get_logger(__name__)
plain_logger = logging.getLogger(__name__)  # for what runs before the Accelerator exists

CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # a complete checkpoint; anything else in output_dir is not one
PARTIAL_SUFFIX = ".partial"  # being written; renamed to checkpoint-<step> only once complete
MANIFEST = "checkpoint_files.json"  # each file of a checkpoint and its size, written last
# Test-only: seconds each process waits inside `save_checkpoint` with its files written but the
# checkpoint not yet complete, so that tests/test_preemption.py can kill a run in the middle of a save.
SAVE_DELAY_VARIABLE = "LDM_TEST_SAVE_DELAY"


def save_run_config(config: TrainConfig, output_dir: str) -> str:
    """The resolved settings beside the outputs, as YAML that `--config` reads back."""
    path = os.path.join(output_dir, RUN_CONFIG)
    save_config(config, path)
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None = None,
                    config: TrainConfig | None = None, add_files: Callable[[str], None] | None = None) -> str:
    """Everything `resume_state` needs, in `output_dir/checkpoint-<step>`, written atomically.

    It is written under a temporary name and renamed once complete, so a run killed at any
    moment leaves either a whole checkpoint or a `.partial` folder that nothing reads. Only then,
    and only on the main process, are the oldest checkpoints beyond `total_limit` removed.
    `add_files(folder)`, called on every process, writes what else a resumed run needs (a stream's
    position) into the checkpoint before it is complete. The size of every file goes into
    `MANIFEST` last, so that a file damaged later (a full disk, a copy cut short) is found before
    resuming from it (`damage`).
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + PARTIAL_SUFFIX
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a run killed while writing it
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)  # every process writes its own RNG state into it
    if config is not None and accelerator.is_main_process:
        save_run_config(config, partial)
    if add_files is not None:
        add_files(partial)
    time.sleep(float(os.environ.get(SAVE_DELAY_VARIABLE, 0)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(partial)
        replace_folder(partial, final)
        if total_limit is not None:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def replace_folder(source: str, target: str) -> None:
    """Rename `source` to `target`; an existing `target` (a rerun of the same step) goes only after."""
    if not os.path.exists(target):
        os.rename(source, target)
        return
    stale = target + ".replaced"
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(target, stale)
    os.rename(source, target)
    shutil.rmtree(stale)


def write_manifest(folder: str) -> None:
    sizes = {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names}
    with open(os.path.join(folder, MANIFEST), "w") as file:
        json.dump(sizes, file, indent=1, sort_keys=True)


def damage(checkpoint: str) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when each has the size it was saved
    with. (A checkpoint written before manifests existed is taken as it is.)"""
    manifest = os.path.join(checkpoint, MANIFEST)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as file:
            sizes = json.load(file)
    except (OSError, ValueError) as error:
        return f"{manifest} cannot be read ({error})"
    for name, size in sizes.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, but {size} were saved"
    return None


def newest_intact(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir` whose files are whole; a damaged newer one is
    passed over with a warning naming the file. Raises ConfigError when every one is damaged."""
    checkpoints = complete_checkpoints(output_dir)
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = damage(checkpoint)
        if problem is None:
            for earlier in problems:
                plain_logger.warning(f"not resuming from a damaged checkpoint: {earlier}; using {checkpoint}")
            return checkpoint
        problems.append(problem)
    if problems:
        raise ConfigError("every checkpoint in " + output_dir + " is damaged: " + "; ".join(problems)
                          + ". Delete them to start again, or restore the files")
    return None


def complete_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(match.group(1)) for name in os.listdir(output_dir)
                   if (match := CHECKPOINT.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name)))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """The folder `--resume_from_checkpoint` names: 'latest' in `output_dir` (None when there is
    none yet, so a preemptible job can always pass it), or a path to a complete checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return newest_intact(output_dir)
    path = os.path.normpath(resume_from_checkpoint)
    if not (CHECKPOINT.fullmatch(os.path.basename(path)) and os.path.isdir(path)):
        choices = ", ".join(os.path.basename(p) for p in complete_checkpoints(output_dir)) or "none yet"
        raise ConfigError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder "
                          f"(checkpoint-<step>); use 'latest' or one in {output_dir}: {choices}")
    problem = damage(path)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint {resume_from_checkpoint!r} is damaged: {problem}")
    return path


def resumed_batches(accelerator: Accelerator, loader, first_epoch: int, batches_to_skip: int):
    """(batch number, batch) from where `resume_state` left off, epoch after epoch without end:
    the loop stops when it has taken its steps. Each epoch is reshuffled. The batch number,
    epoch × batches per epoch + position, seeds the batch's noise (`batch_generator`)."""
    if len(loader) == 0:
        raise ConfigError("the training set is empty: there is nothing to train on")
    for epoch in itertools.count(first_epoch):
        loader.set_epoch(epoch)  # the shuffle...
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)  # ...and the random crops and flips
        skip = batches_to_skip if epoch == first_epoch else 0
        for position, batch in enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader, skip):
            yield epoch * len(loader) + position, batch


def load_checkpoint(accelerator: Accelerator, config: TrainConfig) -> tuple[int, str | None]:
    """Load the checkpoint `config.resume_from_checkpoint` names, if any: (the optimizer steps it
    had taken, its folder), or (0, None). Call it after `accelerator.prepare` and
    `register_for_checkpointing`."""
    path = find_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if path is None:
        if config.resume_from_checkpoint is not None:
            logger.info(f"no checkpoint in {config.output_dir} yet: starting a new run")
        return 0, None
    logger.info(f"resuming from {path}")
    accelerator.load_state(path)
    return int(CHECKPOINT.fullmatch(os.path.basename(path)).group(1)), path


def resume_state(accelerator: Accelerator, config: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """`load_checkpoint`, then (global_step, first_epoch, batches_to_skip): the optimizer steps
    already taken, the epoch they stopped in, and how many of its batches were seen (for
    `skip_first_batches`)."""
    global_step, _ = load_checkpoint(accelerator, config)
    first_epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return global_step, first_epoch, steps_into_epoch * config.gradient_accumulation_steps
