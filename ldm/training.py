"""What both trainers share and what is not the training loop: the Accelerator, optimizer and LR
schedule, atomic checkpoints and exact resume, EMA, the NaN guard, a throughput meter, per-batch
noise, and evaluation split across processes.

Exact resume rests on four things: the shuffle order of epoch e depends on (seed, e) only
(`make_accelerator`), so do a row's random crop and flip (ldm.data's EpochDataset, told the epoch
by `resumed_batches`), the noise of a batch depends on (seed, process, batch) only
(`batch_generator`), and `resume_state` returns how many batches of the resumed epoch were seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from ldm.config import RUN_CONFIG, ConfigError, TrainConfig, save_config
from ldm.data import SkipCounter
from ldm.preemption import StopOnSignal, TrainingInterrupted

logger = get_logger(__name__)
plain_logger = logging.getLogger(__name__)  # for what runs before the Accelerator exists

CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # a complete checkpoint; anything else in output_dir is not one
PARTIAL_SUFFIX = ".partial"  # being written; renamed to checkpoint-<step> only once complete
MANIFEST = "checkpoint_files.json"  # each file of a checkpoint and its size, written last
# Test-only: seconds each process waits inside `save_checkpoint` with its files written but the
# checkpoint not yet complete, so that tests/test_preemption.py can kill a run in the middle of a save.
SAVE_DELAY_VARIABLE = "LDM_TEST_SAVE_DELAY"
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel for float32 weights


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training diverged."""


def make_accelerator(config: TrainConfig, run_name: str = "train") -> Accelerator:
    """An Accelerator for `config`, its trackers started and every RNG seeded."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if config.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, config.logging_dir)),
        # Epoch e is shuffled by a generator seeded with seed + e, not by the global RNG, so a
        # resumed run replays the same order and can skip the batches it has already seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: "
                           "each would train alone and overwrite the others' files. On CPU, set "
                           "ACCELERATE_USE_CPU=true (with accelerate launch --multi_gpu --num_processes N)")
    set_seed(config.seed)
    # TensorBoard's hparams take scalars only.
    hparams = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (bool, int, float, str))}
    accelerator.init_trackers(run_name, config=hparams)
    return accelerator


def make_optimizer(parameters, config: TrainConfig, accelerator: Accelerator, learning_rate: float | None = None,
                   training_steps: int | None = None, optimizer_class: type = torch.optim.AdamW):
    """AdamW (or another Adam-like `optimizer_class`) and the configured LR schedule (warmup,
    decay) from diffusers.optimization."""
    options = {"lr": learning_rate or config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2),
               "weight_decay": config.adam_weight_decay}
    if optimizer_class is torch.optim.AdamW and accelerator.device.type in FUSED_ADAM_DEVICES:
        # One kernel over all parameters instead of a loop of small ops per tensor: the same update
        # (tests/test_training.py), and on CPU 5x faster (the demo VAE: 5.2 -> 1.0 ms a step).
        options["fused"] = True
    optimizer = optimizer_class(parameters, **options)
    # A prepared scheduler steps once per process for each optimizer step (AcceleratedScheduler),
    # so its lengths are counted in those units.
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=(training_steps or config.max_train_steps) * accelerator.num_processes)
    return optimizer, scheduler


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights that train: all of a model trained whole, only the adapters of a LoRA-adapted one."""
    return [p for p in model.parameters() if p.requires_grad]


def make_ema(model: torch.nn.Module, config: TrainConfig, accelerator: Accelerator,
             constant: bool = False) -> EMAModel | None:
    """An exponential moving average of `model`'s trainable weights, saved and restored with every
    checkpoint (for a LoRA-adapted model, its adapters: a frozen weight has nothing to average). Its
    decay warms up to `ema_decay` over the first steps, unless `constant`."""
    if not config.use_ema:
        return None
    ema = EMAModel(trainable_parameters(model), decay=config.ema_decay,
                   min_decay=config.ema_decay if constant else 0.0, model_cls=type(model), model_config=model.config)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, model: torch.nn.Module):
    """Inside, `model` holds the EMA weights (when there is an EMA); its own come back after."""
    if ema is None:
        yield model
        return
    averaged = trainable_parameters(model)
    ema.store(averaged)
    ema.copy_to(averaged)
    try:
        yield model
    finally:
        ema.restore(averaged)


def apply_gradients(accelerator: Accelerator, loss: torch.Tensor, parameters: list, optimizer, scheduler,
                    max_grad_norm: float) -> None:
    """Backward, clip the norm (0: no clipping) on the micro-batch that syncs gradients, then step
    the optimizer and its LR schedule. The prepared optimizer skips its step until then."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop at the first NaN or infinite loss, before it reaches the weights or a checkpoint."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"the loss is {loss.detach().float().cpu().tolist()} at step {step}: training diverged. It stopped "
            "before that step's update, so the last checkpoint is intact; resume from it with a lower "
            "learning_rate (or max_grad_norm), or check the data")


def batch_generator(seed: int, process_index: int, batch_number: int, device: torch.device) -> torch.Generator:
    """A generator for one batch's noise, seeded by (seed, process, batch) alone.

    The global RNG is also drawn on by things a resumed run does differently (each DataLoader
    iterator takes a seed from it), so noise from it could not be replayed exactly.
    """
    digest = hashlib.sha256(f"{seed}/{process_index}/{batch_number}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def unreadable_rows(skipped: SkipCounter, length: int, accelerator: Accelerator) -> list[int]:
    """The rows that any process found unreadable, each once. A tensor reduce, not gather_object,
    whose pending gloo work can deadlock the process group's shutdown on CPU."""
    seen = torch.zeros(length, device=accelerator.device)
    seen[sorted(skipped.rows)] = 1.0
    return accelerator.reduce(seen, "sum").nonzero().flatten().tolist()


def shard(dataset: torch.utils.data.Dataset, accelerator: Accelerator) -> torch.utils.data.Subset:
    """This process's share of `dataset` for evaluation: every row exactly once over all processes
    (a prepared loader would pad the last batch with repeats)."""
    return torch.utils.data.Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))


class Throughput:
    """Images per second over the last `window` optimizer steps, all processes together."""

    def __init__(self, window: int = 20):
        self.marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self.restart()

    def restart(self) -> None:
        """Forget the past, e.g. after a pause for validation or a checkpoint."""
        self.marks.clear()
        self.marks.append((time.perf_counter(), 0))

    def update(self, images: int) -> None:
        self.marks.append((time.perf_counter(), self.marks[-1][1] + images))

    @property
    def rate(self) -> float:
        (start, first), (end, last) = self.marks[0], self.marks[-1]
        return (last - first) / (end - start) if end > start else 0.0


def report_step(accelerator: Accelerator, progress, meter: Throughput, loss: float, learning_rate: float,
                step: int) -> None:
    """A finished optimizer step to the trackers (loss, learning rate, images/s) and the progress bar."""
    accelerator.log({"train/loss": loss, "train/learning_rate": learning_rate,
                     "train/images_per_second": meter.rate}, step=step)
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4g}", img_s=f"{meter.rate:.0f}")


def save_validation_grid(grid, output_dir: str, accelerator: Accelerator, step: int, tag: str) -> str:
    """A validation image grid (HWC uint8) as `output_dir/validation/step-<step>.png`, and in TensorBoard."""
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"validation/{tag}": grid[None]}, step=step, dataformats="NHWC")
    return path


def finish_training(accelerator: Accelerator, *models: torch.nn.Module) -> None:
    """Close the trackers and the process group, after a barrier (no process leaves while another
    is still in a collective). `models`: the prepared ones.

    On CPU (gloo) the group's destructor joins gloo's worker threads, and a worker can still hold
    the last reference to an earlier collective's tensors: a barrier keeps the collectives that
    were in flight when it was queued until the barrier itself is freed, on the worker. Freeing a
    tensor that Python has seen takes the GIL. Dropped from Python, the group releases the GIL
    before its destructor runs; dropped by a DDP wrapper's reducer, when the trainer returns and
    its prepared models go, it keeps the GIL, and the two threads wait for each other forever. So
    the reducers let go of the group here (the prepared models cannot train after this), and the
    last reference to it is a Python one.
    """
    accelerator.wait_for_everyone()
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    for model in models:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.__dict__.pop("logger", None)  # holds the reducer
            model.__dict__.pop("reducer", None)  # holds the group, in C++
    accelerator.end_training()
    del group  # if the last reference, the group's destructor runs here, without the GIL


def checkpoint_or_stop(accelerator: Accelerator, config: TrainConfig, step: int, stop: StopOnSignal,
                       meter: Throughput, add_files: Callable[[str], None] | None = None) -> bool:
    """After each optimizer step: save a checkpoint every `checkpointing_steps`, and after the step
    a stop signal came in (asked of every process, so that all stop after the same step). Returns
    whether to stop now."""
    stopping = stop.agreed(accelerator)
    if step % config.checkpointing_steps == 0 or stopping:
        save_checkpoint(accelerator, config.output_dir, step, config.checkpoints_total_limit, config, add_files)
        meter.restart()
    return stopping


def stop_on_signal(accelerator: Accelerator, stop: StopOnSignal, step: int, output_dir: str,
                   *models: torch.nn.Module) -> None:
    """After a stop signal and its checkpoint: close the trackers and the process group (see
    finish_training; `models`: the prepared ones), and exit with 128 + the signal's number."""
    cause = stop.signal.name if stop.signal else "another process's signal"
    logger.warning(f"process {accelerator.process_index} stopped on {cause} after step {step}, exit code "
                   f"{stop.exit_code}; saved checkpoint-{step} in {output_dir}: continue with "
                   "--resume_from_checkpoint latest", main_process_only=False)
    finish_training(accelerator, *models)
    raise TrainingInterrupted(stop.exit_code)


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
