"""Processes: the `Accelerator` of a run, its CPU threads, and the process group of a launch.

One `accelerate launch` can run several trainings in a row (`scripts/compare_objectives.py`), so the
process group outlives each `train` and `end_processes()` ends it after the last.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env, set_seed

from .checkpoints import start_output_dir
from .config import TrainConfig


__all__ = ["make_accelerator", "start_run", "end_run", "process_state", "end_processes", "cpu_threads", "check_sharding"]

logger = get_logger(__name__)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's `Accelerator`: accumulation, mixed precision, trackers, and a seeded data order.

    `config` is a `TrainConfig` or any config with the same `output_dir`, `gradient_accumulation_steps`,
    `mixed_precision`, `report_to` and `seed` fields (`bico.axioms.training.AxiomConfig`).
    """
    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The shuffling order of epoch e comes from seed + e, the same on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def start_run(config: TrainConfig) -> tuple[Accelerator, Path]:
    """Start a training run: its `Accelerator`, the seed, the CPU threads, and its output directory.

    `config` is a `TrainConfig` or any config `make_accelerator` and `start_output_dir` take (plus
    `cpu_threads`). Returns `(accelerator, output_dir)`.
    """
    accelerator = make_accelerator(config)
    check_sharding(accelerator)
    set_seed(config.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads))
    return accelerator, start_output_dir(config, accelerator)


def end_run(accelerator: Accelerator) -> None:
    """Free what the run's `Accelerator` holds and finish its trackers; the process group stays up.

    The caller first drops its own references to the prepared objects (`del model, optimizer, ...`):
    nothing wrapped by DDP may outlive the run (see `bico.training.train`).
    """
    accelerator.free_memory()
    gc.collect()
    for tracker in accelerator.trackers:
        tracker.finish()


def process_state() -> PartialState:
    """Accelerate's process state, set up as `Accelerator()` sets it up (it honours `ACCELERATE_USE_CPU=1`).

    A bare `PartialState()` before the first `Accelerator` ignores `ACCELERATE_USE_CPU`: on a CPU launch of
    several processes each would then take itself for the only one.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def end_processes() -> None:
    """Destroy the process group of a multi-process launch, after the last `train` of the process."""
    process_state().destroy_process_group()


def cpu_threads(requested: int | None) -> int:
    """Threads for this process: `requested`, else OMP_NUM_THREADS unless it is 1, else cores / local processes.

    `accelerate launch` without a config file exports OMP_NUM_THREADS=1, which leaves a one-process CPU
    run on one core (measured: the default run takes 1.6x longer on 2 cores); a value above 1 was set
    on purpose and is kept.
    """
    if requested is not None:
        return requested
    from_env = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if from_env > 1:
        return from_env
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_sharding(accelerator: Accelerator) -> None:
    """Warn when `accelerate launch` asked for FSDP or DeepSpeed and Accelerate runs something else.

    Accelerate 1.15 uses neither on CPU (measured): with ACCELERATE_USE_CPU=1 it runs plain DDP over gloo
    (MULTI_CPU), so every process holds the whole model and optimizer state, and checkpoints are not sharded.
    """
    for flag, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(flag, "false").lower() == "true" and accelerator.distributed_type != kind:
            logger.warning(
                f"`accelerate launch` asked for {kind.value} but Accelerate runs {accelerator.distributed_type.value} "
                "(it uses neither FSDP nor DeepSpeed on CPU): nothing is sharded."
            )
