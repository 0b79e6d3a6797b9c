"""Checkpoints of a training run: atomic saves, rotation, finding the newest, resuming, evaluation history.

A checkpoint is `output_dir/checkpoints/step_N`: Accelerate's `save_state` (model, optimizer,
scheduler, every process's RNG states) plus `trainer_state.json` (step, epoch, batches done in the
epoch, the run's config), written last. Only a directory holding that file counts as complete, so a
run killed at any moment resumes from the newest complete checkpoint (`--resume_from_checkpoint latest`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

import accelerate
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType

from .config import RESUME_MAY_CHANGE, TrainConfig


logger = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint; its presence marks it complete
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint `output_dir/checkpoints/step_N` with the largest N, or None."""
    complete = []
    for path in (Path(output_dir) / "checkpoints").glob("step_*"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and (path / TRAINER_STATE).is_file():
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def _fsync_tree(directory: Path) -> None:
    # Flush file contents and directory entries, so the rename below publishes finished files.
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, total_limit: int | None) -> Path:
    """`save_state` into `checkpoints/step_N.tmp`, then rename it to `checkpoints/step_N` (atomic).

    A kill at any moment leaves either no `step_N` or a complete one: `trainer_state.json` is written
    last and the rename happens after everything is on disk. Older checkpoints beyond `total_limit`
    are renamed away before they are deleted, so a half-deleted one never looks complete.
    """
    checkpoints = output_dir / "checkpoints"
    final = checkpoints / f"step_{progress['global_step']}"
    staging = checkpoints / f"{final.name}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / TRAINER_STATE).write_text(json.dumps(progress, indent=2))
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(checkpoints)
        if total_limit is not None:
            steps = sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))
            for step in steps[:-total_limit]:
                doomed = checkpoints / f"step_{step}.deleting"
                os.replace(checkpoints / f"step_{step}", doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def clean_partial_checkpoints(output_dir: Path) -> None:
    for path in (output_dir / "checkpoints").glob("step_*"):
        if path.is_dir() and (path.name.endswith((".tmp", ".deleting")) or not (path / TRAINER_STATE).exists()):
            shutil.rmtree(path)


def read_history(history_file: Path, up_to_step: int) -> list[dict]:
    """Evaluations recorded before a resume; drops those after the checkpoint (they are redone)."""
    if not history_file.is_file():
        return []
    records = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
    records = [record for record in records if record["step"] <= up_to_step]
    history_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def start_output_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Refuse another run's checkpoints, drop half-written ones, record the config in `train_config.yaml`.

    `config` is any dataclass config with `output_dir` and `resume_from_checkpoint` (`TrainConfig`,
    `bico.axioms.training.AxiomConfig`).
    """
    output_dir = Path(config.output_dir)
    stale = find_latest_checkpoint(output_dir) if config.resume_from_checkpoint is None else None
    if stale is not None:
        # Checkpoints of another run would mix with this run's (rotation keeps the highest steps).
        raise ValueError(
            f"`output_dir` {str(output_dir)!r} already holds checkpoints of a run ({stale.name}); pass "
            "`--resume_from_checkpoint latest` to continue it, or choose another `--output_dir`."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_checkpoints(output_dir)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    return output_dir


def resume_checkpoint(accelerator: Accelerator, config: TrainConfig, output_dir: Path,
                      may_change: Collection[str] = RESUME_MAY_CHANGE) -> dict | None:
    """Load the checkpoint `config.resume_from_checkpoint` names into the prepared objects.

    `latest` means the newest complete checkpoint of `output_dir`, and starts fresh when there is none.
    Warns when the checkpoint was written with other training settings (`may_change` lists the config
    fields that may differ; `RESUME_MAY_CHANGE` is `TrainConfig`'s).

    Returns:
        `dict | None`: the checkpoint's `trainer_state.json` (`global_step`, `epoch`, `batches_done`,
        `config`), or None when starting fresh.
    """
    checkpoint = config.resume_from_checkpoint
    if checkpoint == "latest":
        checkpoint = find_latest_checkpoint(output_dir)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if checkpoint is None:
        return None
    checkpoint = Path(checkpoint)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise ValueError(f"`resume_from_checkpoint` {str(checkpoint)!r} is not a complete checkpoint (no {TRAINER_STATE}).")
    if accelerator.distributed_type == DistributedType.FSDP and _accelerate_version() < (1, 15):
        logger.warning(
            f"resuming an FSDP run with accelerate {accelerate.__version__}: bico's tests found the resumed run "
            "drifting from an uninterrupted one with accelerate < 1.15 (exact from 1.15 on); upgrade accelerate."
        )
    accelerator.load_state(checkpoint)
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    changed = [key for key, value in state.get("config", {}).items()
               if key not in may_change and getattr(config, key, value) != value]
    if changed:
        logger.warning(f"resuming with other settings than the checkpoint's ({', '.join(changed)}): "
                       "the run will not repeat the original one.")
    accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}")
    return state


def progress_state(config: TrainConfig, global_step: int, epoch: int, batches_done: int) -> dict:
    """What `trainer_state.json` records: where the loop stands, and the run's settings."""
    return {"global_step": global_step, "epoch": epoch, "batches_done": batches_done, "config": asdict(config)}


def _accelerate_version() -> tuple[int, int]:
    return tuple(int(part) for part in accelerate.__version__.split(".")[:2])
