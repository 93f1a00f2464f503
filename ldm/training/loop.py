"""The pieces of every training loop that are not the loop itself: the Accelerator, optimizer and LR
schedule, EMA, the NaN guard, per-batch noise, a throughput meter and the progress bar, checkpointing
or stopping after each step, and the end of a run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ldm.data.dataset import SkipCounter
from ldm.hub.files import METRICS, HubError
from ldm.hub.push import push
from ldm.training.checkpoints import save_checkpoint
from ldm.training.config import TrainConfig
from ldm.training.preemption import StopOnSignal, TrainingInterrupted

logger = get_logger(__name__)
plain_logger = logging.getLogger(__name__)  # for what runs before the Accelerator exists

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



def finish_run(config: TrainConfig, metrics: dict) -> None:
    """A trainer's last step, on the main process: metrics.json beside the model (the model card reports
    it), then, with --push_to_hub, the upload of output_dir."""
    with open(os.path.join(config.output_dir, METRICS), "w") as file:
        # Numbers only: lists (such as the unreadable rows) stay in the training log.
        json.dump({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, file, indent=2)
    if not config.push_to_hub:
        return
    try:
        url = push(config.output_dir, config.hub_repo_id(), config.hub_credentials(), config.hub_private,
                   config.hub_license)
    except HubError as error:
        raise HubError(f"{error}. The model is saved in {config.output_dir}; push it again with "
                       f"`python -m ldm.hub push {config.output_dir} {config.hub_repo_id()}`") from None
    logger.info(f"pushed {config.output_dir} to {url}")


