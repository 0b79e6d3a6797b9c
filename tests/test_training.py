"""The training loop: options, a few steps, LoRA merge, exact resume, atomic checkpoints, 2 processes, SIGKILL."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bico.collators import choose_objective
from bico.checkpoints import TRAINER_STATE, find_latest_checkpoint, save_checkpoint
from bico.config import VARIANT_FIELDS, TrainConfig, parse_config
from bico.training import train


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "finetune_bico.py"


def _config(tmp_path, model_dir, data_dir, name="run", **overrides) -> TrainConfig:
    options = dict(
        model_name_or_path=str(model_dir), data_dir=str(data_dir), output_dir=str(tmp_path / name),
        max_train_samples=64, per_device_train_batch_size=8, max_steps=12, learning_rate=3e-3,
        checkpointing_steps=0, eval_tasks="none",
    )
    options.update(overrides)
    return TrainConfig(**options)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "model.safetensors")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def test_parse_config_defaults_yaml_then_flags(tmp_path):
    assert parse_config([]) == TrainConfig()
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump({"objective": "ntp", "learning_rate": 2e-5, "lora_r": 32, "seed": 3}))
    config = parse_config(["--config", str(config_file), "--seed", "5", "--gradient_checkpointing", "--report_to", "none"])
    assert (config.objective, config.learning_rate, config.lora_r) == ("ntp", 2e-5, 32)  # from the file
    assert config.seed == 5 and config.gradient_checkpointing is True and config.report_to is None  # flags win
    assert parse_config(["--gradient_checkpointing", "false"]).gradient_checkpointing is False


def test_shipped_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(REPO_ROOT / "configs" / f"accelerate_{name}.yaml")).distributed_type
             for name in ("cpu", "multi_gpu", "fsdp", "deepspeed_zero2")}
    assert [str(kind).split(".")[-1] for kind in kinds.values()] == ["NO", "MULTI_GPU", "FSDP", "DEEPSPEED"]
    config = parse_config(["--config", str(REPO_ROOT / "configs" / "train_llama2_lora.yaml")])
    assert (config.lora_r, config.lora_alpha, config.learning_rate, config.objective) == (32, 16, 2e-5, "bico")
    smollm2 = REPO_ROOT / "configs" / "smollm2_berglund.yaml"
    config = parse_config(["--config", str(smollm2)])
    assert (config.lora_r, config.learning_rate, config.train_file, config.objective) == (0, 1e-4, "p2d_prompts_train.jsonl", "bico")
    from bico.compare import parse_args

    compare = parse_args(["--config", str(smollm2), "--objectives", "ntp", "bico:mask_prob=0.3"])  # sets no per-run field
    assert compare.train_overrides["num_train_epochs"] == 10


def test_bad_options_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="`objective` must be one of ntp, bico"):
        TrainConfig(objective="mlm")
    with pytest.raises(ValueError, match="`p_bico`"):
        TrainConfig(p_bico=1.5)
    with pytest.raises(ValueError, match="`eval_tasks`.*'n2x'"):
        TrainConfig(eval_tasks="n2d,n2x")
    with pytest.raises(ValueError, match="`lr_scheduler_type`"):
        TrainConfig(lr_scheduler_type="exp")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown field `learning_rat`"):
        parse_config(["--config", str(bad_yaml)])


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------


def test_train_mixes_objectives_learns_and_saves(tmp_path, tiny_model_dir, small_data_dir):
    config = _config(tmp_path, tiny_model_dir, small_data_dir, max_steps=30, max_train_samples=None,
                     eval_tasks="n2d-reverse", eval_every=15, eval_every_tasks="n2d-reverse,d2n-reverse", report_to="tensorboard")
    result = train(config)
    assert result["global_step"] == 30
    assert [step for step, _ in result["objectives"]] == list(range(30))
    assert {name for _, name in result["objectives"]} == {"bico", "ntp"}
    ntp_losses = [loss for (_, name), loss in zip(result["objectives"], result["losses"]) if name == "ntp"]
    assert ntp_losses[-1] < ntp_losses[0] - 0.2, ntp_losses
    run = Path(config.output_dir)
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final.config.bico_objective == "bico"
    assert final.config._attn_implementation != "bico_fused"  # saved unpatched: the plain causal model
    assert (run / "final" / "tokenizer.json").is_file()
    # At the last step only what the final evaluation leaves out: it evaluates n2d-reverse itself.
    assert [(record["step"], sorted(record["tasks"])) for record in result["eval_history"]] == [
        (15, ["d2n-reverse", "n2d-reverse"]), (30, ["d2n-reverse"])]
    assert len((run / "eval_history.jsonl").read_text().splitlines()) == 2
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"]["n2d-reverse"]["count"] == 24 and results["model"] == str(run / "final")
    recorded = {key: value for key, value in results["training"].items() if key != "steps"}
    assert recorded == {key: getattr(config, key) for key in recorded} and results["training"]["steps"] == 30
    assert {"objective", *itertools.chain(*VARIANT_FIELDS.values())} <= set(results["training"])  # names every variant
    assert list((run / "logs").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("objective, options", [
    ("reverse", {}),
    ("bico", {"mask_schedule": "span", "mask_prob": 0.3}),
    ("bico", {"mask_schedule": "uniform", "mask_min": 0.2, "mask_max": 0.8}),
    ("bico", {"entity_mask_prob": 0.5}),
    ("demask", {"mask_prob": 0.5}),
    ("demask", {"mask_schedule": "uniform", "entity_mask_prob": 0.5}),
    ("demask", {"entity_mask_prob": 1.0, "demask_invert_prob": 0.5}),
])
def test_every_objective_and_schedule_trains_through_the_loop(tmp_path, tiny_model_dir, small_data_dir, objective, options, monkeypatch):
    import bico.objectives

    seen = []
    make = bico.objectives.OBJECTIVES[objective].make_collator

    def spying(tokenizer, config):
        collator = make(tokenizer, config)
        return lambda rows: seen.append(rows) or collator(rows)

    monkeypatch.setitem(bico.objectives.OBJECTIVES, objective, bico.objectives.Objective(
        spying, bico.objectives.OBJECTIVES[objective].bidirectional, bico.objectives.OBJECTIVES[objective].setup))
    config = _config(tmp_path, tiny_model_dir, small_data_dir, max_steps=4, p_bico=1.0, objective=objective, **options)
    result = train(config)
    assert [name for _, name in result["objectives"]] == [objective] * 4
    assert len(seen) == 4 and all({"prompt", "completion", "seed", "input_ids"} <= set(row) for row in seen[0])
    assert all(loss == loss and loss > 0 for loss in result["losses"])  # finite, positive
    final = AutoModelForCausalLM.from_pretrained(Path(config.output_dir) / "final")
    assert final.config.bico_objective == objective


def test_lora_adapters_are_merged(tmp_path, tiny_model_dir, small_data_dir):
    config = _config(tmp_path, tiny_model_dir, small_data_dir, lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj",
                     gradient_checkpointing=True, max_steps=6)
    train(config)
    weights = _weights(config.output_dir)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert weights.keys() == base.keys()  # no lora_A / lora_B left
    changed = {key for key in base if not torch.equal(weights[key], base[key])}
    assert changed and all(("q_proj" in key or "v_proj" in key) for key in changed)


@pytest.mark.parametrize("objective", ["bico", "abi"])
def test_evaluations_during_training_leave_the_weights_alone(tmp_path, tiny_model_dir, small_data_dir, objective):
    """What lets a comparison treat `eval_every` as a non-result option (bico.compare.NON_RESULT_FIELDS)."""
    plain = train(_config(tmp_path, tiny_model_dir, small_data_dir, name="plain", objective=objective, max_steps=6))
    watched = train(_config(tmp_path, tiny_model_dir, small_data_dir, name="watched", objective=objective, max_steps=6,
                            eval_every=2, eval_every_tasks="n2d-reverse"))
    assert [record["step"] for record in watched["eval_history"]] == [2, 4, 6]
    assert watched["objectives"] == plain["objectives"] and watched["losses"] == plain["losses"]
    plain_weights, watched_weights = _weights(tmp_path / "plain"), _weights(tmp_path / "watched")
    assert all(torch.equal(plain_weights[key], watched_weights[key]) for key in plain_weights)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, small_data_dir):
    # 60 rows / batch 8 = 8 micro-batches per epoch (the last one short), accumulation 2: the checkpoint
    # at step 6 sits in the middle of the second epoch.
    options = dict(max_train_samples=60, gradient_accumulation_steps=2, max_steps=14, checkpointing_steps=6,
                   checkpoints_total_limit=None)
    full = train(_config(tmp_path, tiny_model_dir, small_data_dir, name="full", **options))
    assert find_latest_checkpoint(tmp_path / "full").name == "step_12"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_6", tmp_path / "resumed" / "checkpoints" / "step_6")
    resumed = train(_config(tmp_path, tiny_model_dir, small_data_dir, name="resumed", resume_from_checkpoint="latest", **options))
    assert resumed["objectives"] == full["objectives"][6:]
    assert resumed["losses"] == full["losses"][6:]
    assert _max_difference(_weights(tmp_path / "full"), _weights(tmp_path / "resumed")) == 0.0


def test_checkpoint_rotation_keeps_newest(tmp_path, tiny_model_dir, small_data_dir):
    config = _config(tmp_path, tiny_model_dir, small_data_dir, max_steps=8, checkpointing_steps=2, checkpoints_total_limit=2)
    train(config)
    assert sorted(p.name for p in (Path(config.output_dir) / "checkpoints").iterdir()) == ["step_6", "step_8"]
    # A new run into the same directory would mix its checkpoints with these: refused, not mixed.
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume_from_checkpoint latest"):
        train(config)


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, {"global_step": 2, "epoch": 0, "batches_done": 2}, total_limit=None)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"

    def save_half_then_die(output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # stands in for a kill in the middle of writing

    monkeypatch.setattr(accelerator, "save_state", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, {"global_step": 4, "epoch": 0, "batches_done": 4}, total_limit=None)
    assert not (tmp_path / "checkpoints" / "step_4").exists()
    assert (tmp_path / "checkpoints" / "step_4.tmp").exists()
    # Also a directory named like a checkpoint but without trainer_state.json is not one.
    (tmp_path / "checkpoints" / "step_9").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert json.loads((tmp_path / "checkpoints" / "step_2" / TRAINER_STATE).read_text())["global_step"] == 2


# --------------------------------------------------------------------------------------------------
# Processes: 2 gloo processes, SIGKILL and resume
# --------------------------------------------------------------------------------------------------


DRIVER = """
import gc, json, sys
import torch
from accelerate import PartialState
from bico.processes import end_processes
from bico.training import TrainConfig, train

# A DDP wrapper still alive when the group is destroyed frees its reducer later, in gloo's destructor,
# which can deadlock; record, per call, any that is.
destroy, alive = torch.distributed.destroy_process_group, []
def checked_destroy(*args, **kwargs):
    alive.append([type(o).__name__ for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)])
    return destroy(*args, **kwargs)
torch.distributed.destroy_process_group = checked_destroy

config = TrainConfig(**json.loads(sys.argv[1]))
result = train(config)
end_processes()  # as bico-train does after train()
with open(f"{config.output_dir}/objectives_{PartialState().process_index}.json", "w") as f:
    json.dump({"objectives": result["objectives"], "ddp_alive_at_destroy": alive}, f)
"""


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, small_data_dir, free_port):
    options = dict(max_train_samples=64, max_steps=8, p_bico=0.5)
    single = train(_config(tmp_path, tiny_model_dir, small_data_dir, name="one", per_device_train_batch_size=8, **options))

    two = _config(tmp_path, tiny_model_dir, small_data_dir, name="two", per_device_train_batch_size=4, **options)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port), str(driver), json.dumps(two.__dict__)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 process(es) x batch 4" in completed.stdout

    rank0, rank1 = (json.loads((tmp_path / "two" / f"objectives_{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["ddp_alive_at_destroy"] == rank1["ddp_alive_at_destroy"] == [[]]  # destroyed once, nothing wrapped alive
    rank0, rank1 = rank0["objectives"], rank1["objectives"]
    assert rank0 == rank1 == single["objectives"]
    assert {name for _, name in rank0} == {"bico", "ntp"}
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, small_data_dir):
    def command(run_dir):
        return [sys.executable, str(SCRIPT), "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(small_data_dir),
                "--output_dir", str(run_dir), "--max_train_samples", "64", "--per_device_train_batch_size", "8",
                "--max_steps", "200", "--checkpointing_steps", "25", "--eval_tasks", "none"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command(killed), env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step_25" / TRAINER_STATE).exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()  # killed mid-training, not after it

    subprocess.run(command(killed) + ["--resume_from_checkpoint", "latest"], env=env, check=True, capture_output=True)
    # The reference run also checks the script under `accelerate launch` with the shipped CPU config.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / "accelerate_cpu.yaml")]
    subprocess.run(launch + command(tmp_path / "whole")[1:], env=env, check=True, capture_output=True)
    assert not list((killed / "checkpoints").glob("*.tmp"))
    assert _max_difference(_weights(killed), _weights(tmp_path / "whole")) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("objective, precision", [("bico", ["launcher", "bf16"]), ("abi", ["script", "bf16"]),
                                                  ("bico", ["script", "fp16"]), ("bico", ["weights", "bfloat16"])])
def test_mixed_precision_and_bf16_weights_under_accelerate_launch(tmp_path, tiny_model_dir, small_data_dir, objective, precision):
    """`accelerate launch` with bf16/fp16 autocast (as a launcher or a script flag) and pure bf16 weights."""
    where, dtype = precision
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / "accelerate_cpu.yaml")]
    script = [str(SCRIPT), "--model_name_or_path", str(tiny_model_dir), "--data_dir", str(small_data_dir),
              "--output_dir", str(tmp_path / "run"), "--objective", objective, "--max_train_samples", "32",
              "--per_device_train_batch_size", "8", "--max_steps", "6", "--checkpointing_steps", "3",
              "--eval_tasks", "n2d-reverse", "--eval_max_new_tokens", "4"]
    if where == "launcher":
        launch += ["--mixed_precision", dtype]
    elif where == "script":
        script += ["--mixed_precision", dtype]
    else:
        script += ["--model_dtype", dtype]
    completed = subprocess.run(launch + script, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert objective in {choose_objective(0, step, 0.5, objective) for step in range(6)}  # seed 0 draws it
    weights = _weights(tmp_path / "run")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    expected = torch.bfloat16 if where == "weights" else torch.float32  # autocast keeps float32 master weights
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == expected
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks"]["n2d-reverse"]["count"] == 24


@pytest.mark.slow
def test_accelerate_launch_of_the_module_equals_the_script(tmp_path, tiny_model_dir, small_data_dir):
    """`accelerate launch -m bico.train` (what `bico-train` installs) and `scripts/finetune_bico.py` train alike."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "configs" / "accelerate_cpu.yaml")]
    options = ["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(small_data_dir), "--max_train_samples", "16",
               "--per_device_train_batch_size", "8", "--max_steps", "3", "--checkpointing_steps", "0", "--eval_tasks", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, target in (("module", ["-m", "bico.train"]), ("script", [str(SCRIPT)])):
        completed = subprocess.run(launch + target + options + ["--output_dir", str(tmp_path / name)], env=env,
                                   capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert _max_difference(_weights(tmp_path / "module"), _weights(tmp_path / "script")) == 0.0
