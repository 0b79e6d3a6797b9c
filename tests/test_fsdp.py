"""Sharded training on 2 CPU processes: FSDP2 (and DeepSpeed ZeRO-2 when installed), SIGKILL, resume, 1 process.

Accelerate 1.15 uses neither FSDP nor DeepSpeed on CPU (measured): with ACCELERATE_USE_CPU=1 and
`configs/accelerate_fsdp.yaml` (or `--use_fsdp`, or the DeepSpeed config) it quietly runs plain DDP over gloo
(`distributed_type` MULTI_CPU, whole-model `model.safetensors` checkpoints); without the flag DeepSpeed sees
2 ranks while Accelerate sees 1 and stops ("train_batch_size is not equal to micro_batch_per_gpu *
gradient_acc_step * world_size 4 != 4 * 1 * 2"). torch's FSDP2 and DeepSpeed's ZeRO themselves run over
gloo, so LAUNCHER below sets the process group up the way Accelerate does on a GPU and then runs
`scripts/finetune_bico.py` unchanged; each test checks from the checkpoint's files that the run was sharded.
"""

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bico.checkpoints import _accelerate_version, find_latest_checkpoint


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "finetune_bico.py"
BATCH, STEPS, CHECKPOINT_EVERY = 4, 24, 4  # per process; the 1-process reference uses 2 * BATCH
# Measured here (2 CPU cores, float32, 24 steps): max |weights - 1 process| 1.2e-7 for FSDP2 and for ZeRO-2.
WEIGHT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5

LAUNCHER = '''
"""Run the script in argv[1:] as FSDP2 (ACCELERATE_USE_FSDP) or DeepSpeed on CPU processes (gloo)."""
import os, runpy, sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType

if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None  # a 2-minute C++ build, used only by inference all-reduce
    PartialState(backend="gloo")  # without a GPU Accelerate finds no backend and runs each process alone
else:
    state = PartialState(cpu=True)  # gloo, MULTI_CPU
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # AcceleratorState then picks FSDP
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

BACKENDS = {
    # config file, environment, files that only a sharded checkpoint has
    "fsdp": ("accelerate_fsdp.yaml", {"ACCELERATE_USE_CPU": "1"},
             ["pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"]),
    "deepspeed": ("accelerate_deepspeed_zero2.yaml", {},
                  ["pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
}
NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_args(model_dir, data_dir, run_dir, batch, *extra, steps=STEPS) -> list[str]:
    return [str(SCRIPT), "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(run_dir),
            "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--learning_rate", "3e-3",
            "--checkpointing_steps", str(CHECKPOINT_EVERY), "--eval_tasks", "none",
            "--report_to", "tensorboard", "--logging_steps", "1", *extra]


def _launch(tmp_path, backend) -> tuple[list[str], dict]:
    """`accelerate launch` with the shipped config for `backend` on 2 CPU processes, and its environment."""
    config_file, env, _ = BACKENDS[backend]
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / config_file),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(launcher)]
    return command, {**os.environ, "OMP_NUM_THREADS": "1", **env}


def _kill_job(launcher: subprocess.Popen) -> None:
    """SIGKILL `accelerate launch` and its workers.

    torch's elastic agent starts every worker in a session of its own, so `os.killpg` on the launcher's
    group alone leaves both workers training (measured): kill the workers by their ids, then the launcher.
    """
    workers = []
    if launcher.poll() is None:
        workers = psutil.Process(launcher.pid).children(recursive=True)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signal.SIGKILL)
        os.killpg(launcher.pid, signal.SIGKILL)  # its own group: started with start_new_session=True
    launcher.wait()
    deadline = time.monotonic() + 30
    while alive := [worker for worker in workers if _running(worker)]:
        assert time.monotonic() < deadline, f"workers still running: {alive}"
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a killed orphan may wait for a parent to reap it
    except psutil.NoSuchProcess:
        return False


def _logged_steps(run_dir) -> dict[int, tuple[str, float]]:
    """`{step: (objective, loss)}` from the run's TensorBoard files; a resumed run's values win over the killed run's."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    runs = []
    for path in (Path(run_dir) / "logs").rglob("events.out.tfevents*"):
        events = list(EventFileLoader(str(path)).Load())
        runs.append((events[0].wall_time, events))
    steps = {}
    for _, events in sorted(runs, key=lambda run: run[0]):
        for event in events:
            for value in event.summary.value:
                if value.tag.startswith("train/loss_"):
                    steps[event.step] = (value.tag.removeprefix("train/loss_"), make_ndarray(value.tensor).item())
    return steps


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, small_data_dir):
    """The reference: plain `python scripts/finetune_bico.py`, 1 process, batch 2 * BATCH (the same global batch)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    command = [sys.executable, *_script_args(tiny_model_dir, small_data_dir, run_dir, 2 * BATCH)]
    completed = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.skipif(
    NO_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)"))])
def test_sigkill_and_resume_on_two_sharded_processes_match_one_process(tmp_path, tiny_model_dir, small_data_dir,
                                                                        one_process_run, backend):
    """Train on 2 sharded processes, SIGKILL the job after its first checkpoint, resume: 1 process's run, step by step."""
    launch, env = _launch(tmp_path, backend)
    run_dir = tmp_path / "run"
    script = _script_args(tiny_model_dir, small_data_dir, run_dir, BATCH)
    with open(tmp_path / "killed.log", "w") as log:
        launcher = subprocess.Popen(launch + script, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while find_latest_checkpoint(run_dir) is None:
                assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 180 s"
                time.sleep(0.02)
        finally:
            _kill_job(launcher)
    assert launcher.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists()  # killed mid-training, not after it
    checkpoint = find_latest_checkpoint(run_dir)
    for name in BACKENDS[backend][2]:  # sharded: one file per rank, no whole-model model.safetensors
        assert (checkpoint / name).is_file(), sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*"))
    assert not (checkpoint / "model.safetensors").exists()

    completed = subprocess.run(launch + script + ["--resume_from_checkpoint", "latest"], env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {checkpoint.name.removeprefix('step_')}" in completed.stdout
    assert f"2 process(es) x batch {BATCH}" in completed.stdout
    assert "nothing is sharded" not in completed.stderr  # bico.processes' warning when Accelerate drops FSDP/DeepSpeed

    # Step by step the same objective and loss as 1 process with the same global batch, then the same weights.
    sharded, single = _logged_steps(run_dir), _logged_steps(one_process_run)
    assert sorted(sharded) == sorted(single) == list(range(1, STEPS + 1))
    assert [sharded[step][0] for step in sharded] == [single[step][0] for step in sharded]
    assert {objective for objective, _ in sharded.values()} == {"bico", "ntp"}
    off = {step: (sharded[step][1], single[step][1]) for step in single if abs(sharded[step][1] - single[step][1]) >= LOSS_TOLERANCE}
    if off and backend == "fsdp" and _accelerate_version() < (1, 15):
        # Measured with accelerate 1.8: steps 1-5 match, the later resumed ones drift (1.10, 1.13, 1.14
        # drifted too before bico.training re-set the epoch of the skipping loader); exact with 1.15.
        # bico.training warns on such a resume.
        assert min(off) > int(checkpoint.name.removeprefix("step_")) and "drifting" in completed.stderr
        pytest.xfail(f"accelerate {accelerate.__version__} < 1.15 does not resume FSDP2 exactly: {sorted(off)[:3]}...")
    assert not off, f"steps whose loss differs (sharded, 1 process): {off}"
    weights, reference = _weights(run_dir), _weights(one_process_run)
    assert weights.keys() == reference.keys()
    difference = max((weights[key] - reference[key]).abs().max().item() for key in weights)
    assert difference < WEIGHT_TOLERANCE, difference
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max((weights[key] - base[key]).abs().max().item() for key in base) > 100 * WEIGHT_TOLERANCE  # it trained

    # The gathered final save is the plain causal model.
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert not str(config.get("_attn_implementation")).startswith("bico")
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert final.config.bico_objective == "bico" and not final.config._attn_implementation.startswith("bico")


@pytest.mark.slow
def test_fsdp_final_save_rebuilds_lora_and_abi_models(tmp_path, tiny_model_dir, small_data_dir):
    """Under FSDP save_final_model rebuilds the model on the main process: abi's added tokens, peft merged there."""
    launch, env = _launch(tmp_path, "fsdp")
    script = _script_args(tiny_model_dir, small_data_dir, tmp_path / "run", BATCH, "--report_to", "none",
                          "--objective", "abi", "--lora_r", "4", steps=6)
    completed = subprocess.run(launch + script, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (find_latest_checkpoint(tmp_path / "run") / BACKENDS["fsdp"][2][0]).is_file()  # it really ran FSDP
    weights, base = _weights(tmp_path / "run"), load_file(Path(tiny_model_dir) / "model.safetensors")
    assert weights.keys() == base.keys()  # no lora_A / lora_B left
    assert all(torch.isfinite(weight).all() for weight in weights.values())
    vocab = base["model.embed_tokens.weight"].shape[0]
    assert weights["model.embed_tokens.weight"].shape[0] == vocab + 3  # abi's [MASK] [START] [END]
    changed = {key for key in base if "embed" not in key and "lm_head" not in key and not torch.equal(weights[key], base[key])}
    assert changed and all("proj" in key for key in changed)  # the all-linear adapters, merged
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.bico_objective == "abi" and final.config.vocab_size == vocab + 3
