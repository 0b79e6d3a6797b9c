"""Processes: the CPU thread count of a run and the warning when Accelerate drops FSDP or DeepSpeed.

Several processes in earnest (gloo, DDP, FSDP) are in test_training.py, test_fsdp.py and test_compare.py.
"""

import logging
import os
from types import SimpleNamespace

import psutil
import pytest
from accelerate.utils import DistributedType

import bico.processes
from bico.config import TrainConfig
from bico.processes import check_sharding, cpu_threads


def test_cpu_threads_undoes_accelerates_single_thread_default(monkeypatch):
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` exports by default
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert cpu_threads(None) == 1  # never below one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set on purpose: kept
    assert cpu_threads(None) == 3
    assert cpu_threads(5) == 5  # --cpu_threads wins
    with pytest.raises(ValueError, match="`cpu_threads` must be positive"):
        TrainConfig(cpu_threads=0)


def test_a_dropped_fsdp_or_deepspeed_is_reported(monkeypatch, caplog):
    """What `accelerate launch --use_fsdp` (or DeepSpeed) with ACCELERATE_USE_CPU=1 gets: DDP, and a warning."""
    monkeypatch.setattr(bico.processes, "logger", logging.getLogger("bico.processes"))  # no Accelerate state needed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_sharding(SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert "nothing is sharded" not in caplog.text
    check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    assert "asked for FSDP but Accelerate runs MULTI_CPU" in caplog.text
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    assert "asked for DEEPSPEED but Accelerate runs MULTI_CPU" in caplog.text
