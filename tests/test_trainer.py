"""bico.trainer: BICO inside transformers.Trainer (and TRL's SFTTrainer through the mixin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer,
    TrainingArguments,
)

import bico.patch
import bico.trainer
from bico import BicoCollator, BicoTrainer, BicoTrainerMixin, NtpCollator
from bico.collators import IGNORE_INDEX, encode_rows, row_seed
from bico.data import load_train
from bico.patch import is_patched
from bico.training import objective_loss


REPO_ROOT = Path(__file__).resolve().parent.parent
# transformers 5.24 renamed the argument (the old name warns); 5.0 knows only the old one.
CHECKPOINTING = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _dataset(tokenizer, data_dir, rows=32) -> datasets.Dataset:
    train = load_train(data_dir).select(range(rows))
    examples, _ = encode_rows(train["prompt"], train["completion"], tokenizer, max_length=256)
    return datasets.Dataset.from_dict({"input_ids": [example["input_ids"] for example in examples]})


def _args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
    )
    return TrainingArguments(str(output_dir), **{**options, **overrides})


def _trainer(model, tokenizer, dataset, output_dir, trainer_class=BicoTrainer, bico_options=None, **args):
    return trainer_class(
        model=model, args=_args(output_dir, **args), train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **(bico_options or {}),
    )


def _record_modes(model) -> list[bool]:
    """Whether each forward of `model` ran in bidirectional mode (read from the patch's own state)."""
    modes = []
    config = bico.patch._decoder_stack(model).config
    model.register_forward_pre_hook(lambda module, args: modes.append(bico.patch._ACTIVE[id(config)] > 0))
    return modes


def _step_of(trainer, objective: str) -> int:
    return next(step for step in range(100) if trainer.step_objective(step) == objective)


# --------------------------------------------------------------------------------------------------
# One batch: the adapter and the Accelerate loop build the same batch and the same gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["fixed", "uniform", "span"])
def test_bico_step_equals_the_training_loop_on_one_batch(tmp_path, tiny_model_dir, data_dir, monkeypatch, schedule):
    model, tokenizer = _load(tiny_model_dir)
    train = load_train(data_dir).select(range(6))
    examples, _ = encode_rows(train["prompt"], train["completion"], tokenizer, max_length=256)
    rows = [{**example, "seed": row_seed(0, 0, example["index"])} for example in examples]
    expected = BicoCollator(tokenizer, mask_prob=0.3, schedule=schedule)(rows)  # what bico.training feeds a BICO step

    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path,
                       bico_options={"mask_prob": 0.3, "mask_schedule": schedule})
    monkeypatch.setattr(trainer, "row_seeds", lambda input_ids, attention_mask, step: [row["seed"] for row in rows])
    step = _step_of(trainer, "bico")
    batch = trainer.bico_batch(NtpCollator(tokenizer)(examples), step)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], expected[key]), key

    bico.patch_llama(model)
    model.train()
    trainer.state.global_step = step
    items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    loss.backward()
    adapter_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = objective_loss(model, dict(expected), "bico", Accelerator(cpu=True))
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-6, atol=0)
    for got, want in zip(adapter_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The bidirectional forward matters: the causal forward of the same batch has another loss.
    causal = model(**batch, use_cache=False, num_items_in_batch=items).loss
    assert abs(causal.item() - loss.item()) > 1e-3


def test_masks_respect_the_collators_labels(tmp_path, tiny_model_dir, data_dir):
    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, bico_options={"mask_prob": 1.0})
    train = load_train(data_dir).select(range(8))
    examples, _ = encode_rows(train["prompt"], train["completion"], tokenizer, max_length=256)
    batch = NtpCollator(tokenizer)(examples)
    # A completion-only loss (TRL's `completion_only_loss`): the prompt tokens carry no label.
    for row, prompt in enumerate(train["prompt"]):
        batch["labels"][row, : len(tokenizer(prompt)["input_ids"])] = IGNORE_INDEX
    masked = trainer.bico_batch(batch, step=0)
    targets = masked["labels"] != IGNORE_INDEX
    assert targets.any()
    assert not (targets & (batch["labels"] == IGNORE_INDEX)).any()  # no prompt token is a target
    assert torch.equal(masked["input_ids"][~targets], batch["input_ids"][~targets])  # nor is it masked
    # mask_prob=1: every completion token that is not special is masked (EOS is not).
    completion = (batch["labels"] != IGNORE_INDEX) & (batch["input_ids"] != tokenizer.eos_token_id)
    assert torch.equal(targets, completion)


def test_masks_do_not_depend_on_the_padding_side_or_the_batch(tmp_path, tiny_model_dir, data_dir):
    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path)
    train = load_train(data_dir).select(range(6))
    examples, _ = encode_rows(train["prompt"], train["completion"], tokenizer, max_length=256)
    right = trainer.bico_batch(NtpCollator(tokenizer)(examples), step=3)
    alone = trainer.bico_batch(NtpCollator(tokenizer)(examples[2:3]), step=3)
    length = len(examples[2]["input_ids"])
    assert torch.equal(alone["labels"][0], right["labels"][2, :length])
    left_batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    tokenizer.padding_side = "left"
    left = trainer.bico_batch(left_batch([{"input_ids": e["input_ids"]} for e in examples]), step=3)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert torch.equal(left["labels"][row, -n:], right["labels"][row, :n])
        assert torch.equal(left["attention_mask"][row, -n:], right["attention_mask"][row, :n])
    assert not torch.equal(trainer.bico_batch(NtpCollator(tokenizer)(examples), step=4)["labels"], right["labels"])


def test_entity_masking_finds_the_loops_entities_from_token_ids_and_trains(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from bico.reverse import collect_names

    model, tokenizer = _load(tiny_model_dir)
    train = load_train(data_dir)
    names = collect_names(train["completion"])
    examples, _ = encode_rows(train["prompt"][:24], train["completion"][:24], tokenizer, max_length=256)
    rows = [{**example, "seed": row_seed(0, 0, example["index"])} for example in examples]
    options = {"mask_prob": 0.15, "entity_mask_prob": 0.5, "entity_names": names}
    expected = BicoCollator(tokenizer, **options)(rows)  # the loop's batch: entities found in prompt + completion
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, bico_options={**options, "p_bico": 1.0})
    monkeypatch.setattr(trainer, "row_seeds", lambda input_ids, attention_mask, step: [row["seed"] for row in rows])
    batch = trainer.bico_batch(NtpCollator(tokenizer)(examples), step=0)  # here: decoded from the ids
    assert torch.equal(batch["labels"], expected["labels"]) and trainer.masker.entities.unaligned == 0
    plain = BicoCollator(tokenizer, mask_prob=0.15)(rows)
    assert (expected["labels"] != IGNORE_INDEX).sum() > (plain["labels"] != IGNORE_INDEX).sum()  # entities on top
    monkeypatch.undo()
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 6 and all(loss == loss and loss > 0 for loss in losses)
    assert trainer.masker.entities.unaligned == 0
    with pytest.raises(ValueError, match=r"`entity_mask_prob` must be in \[0, 1\].*got 2"):
        _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, bico_options={"entity_mask_prob": 2})


# --------------------------------------------------------------------------------------------------
# Training: accumulation, logging, mixed precision, checkpointing, resume, saving
# --------------------------------------------------------------------------------------------------


def test_gradient_accumulation_runs_one_objective_per_optimizer_step(tmp_path, tiny_model_dir, data_dir):
    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir, rows=48), tmp_path,
                       gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=8)
    modes = _record_modes(model)
    trainer.train()
    expected = [trainer.step_objective(step) == "bico" for step in range(8) for _ in range(2)]
    assert modes == expected
    assert set(expected) == {True, False}  # both objectives occur
    logs = [record for record in trainer.state.log_history if "loss" in record]
    assert [("loss_bico" in r, "loss_ntp" in r) for r in logs] == [(e, not e) for e in expected[::2]]
    for record in logs:  # one objective per logged step: its loss is the step's loss
        assert record.get("loss_bico", record.get("loss_ntp")) == pytest.approx(record["loss"], abs=1e-4)
    assert not is_patched(model)


def test_bico_and_ntp_batches_are_normalised_by_their_own_labels(tmp_path, tiny_model_dir, data_dir):
    # The Trainer counts labels over the accumulation step; a BICO step must count the masked ones,
    # or its loss would be ~mask_prob times too small.
    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, learning_rate=0.0,
                       bico_options={"p_bico": 1.0})
    trainer.train()
    bico_losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    ntp = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path / "ntp", learning_rate=0.0,
                   bico_options={"p_bico": 0.0})
    ntp.train()
    ntp_losses = [record["loss"] for record in ntp.state.log_history if "loss" in record]
    vocab = len(tokenizer)
    # An untrained model: both are mean per-token cross-entropies near log(vocab).
    for loss in bico_losses + ntp_losses:
        assert abs(loss - torch.log(torch.tensor(vocab)).item()) < 0.5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gradient_checkpointing_and_autocast(tmp_path, tiny_model_dir, data_dir, precision):
    losses = {}
    for checkpointing in (False, True):
        model, tokenizer = _load(tiny_model_dir)
        trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path / str(checkpointing),
                           max_steps=4, **{CHECKPOINTING: checkpointing, precision: True})
        trainer.train()
        losses[checkpointing] = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses[True]) == 4 and all(torch.isfinite(torch.tensor(losses[True])))
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)  # recomputation replays BICO mode


def test_resume_from_a_trainer_checkpoint_repeats_objectives_and_masks(tmp_path, tiny_model_dir, data_dir):
    def run(output_dir, resume=None):
        model, tokenizer = _load(tiny_model_dir)
        trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir, rows=48), output_dir,
                           save_strategy="steps", save_steps=3)
        seen = []
        masker = trainer.bico_batch
        trainer.bico_batch = lambda inputs, step=None: seen.append((trainer.state.global_step, inputs["input_ids"].sum().item())) or masker(inputs, step)
        modes = _record_modes(model)
        trainer.train(resume_from_checkpoint=resume)
        return modes, seen, trainer.state.log_history

    modes, seen, history = run(tmp_path / "whole")
    resumed_modes, resumed_seen, resumed_history = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed_modes == modes[3:]
    assert resumed_seen == [entry for entry in seen if entry[0] >= 3]
    losses = {r["step"]: r["loss"] for r in history if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in resumed_history if "loss" in r and r["step"] > 3}
    assert resumed == pytest.approx({step: losses[step] for step in resumed}, abs=1e-5)
    # A checkpoint is the plain causal model: it loads and runs without bico.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-3")
    assert plain.config._attn_implementation in ("sdpa", "eager")


def test_saved_model_is_the_plain_causal_model(tmp_path, tiny_model_dir, data_dir):
    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path)
    trainer.train()
    assert not is_patched(model)
    trainer.save_model(str(tmp_path / "saved"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not is_patched(saved) and saved.config.bico_objective == "bico"
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    assert torch.equal(saved(ids).logits, model(ids).logits)
    assert "bico" not in json.loads((tmp_path / "saved" / "config.json").read_text()).get("_attn_implementation", "")


def test_lora_adapters_merged_when_asked(tmp_path, tiny_model_dir, data_dir):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, learning_rate=1e-2,
                       bico_options={"merge_adapters": True})
    modes = _record_modes(model)
    trainer.train()
    assert True in modes  # BICO ran through the peft wrapper
    trainer.save_model(str(tmp_path / "merged"))
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    model.eval()
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter did train
    trainer.merge_adapters = False
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input_is_a_value_error_before_training(tmp_path, tiny_model_dir, data_dir):
    model, tokenizer = _load(tiny_model_dir)
    dataset = _dataset(tokenizer, data_dir)
    with pytest.raises(ValueError, match=r"`p_bico` must be in \[0, 1\], got 1.5"):
        _trainer(model, tokenizer, dataset, tmp_path, bico_options={"p_bico": 1.5})
    with pytest.raises(ValueError, match="`mask_prob` must be in"):
        _trainer(model, tokenizer, dataset, tmp_path, bico_options={"mask_prob": 0.0})
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        _trainer(model, tokenizer, dataset, tmp_path, bico_options={"mask_schedule": "zigzag"})
    with pytest.raises(ValueError, match="pass `processing_class=tokenizer`"):
        BicoTrainer(model=model, args=_args(tmp_path), train_dataset=dataset,
                    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="no decoder with rotary embeddings"):
        _trainer(gpt2, tokenizer, dataset, tmp_path)

    def no_attention_mask(features):
        batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(features)
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    before = [p.clone() for p in model.parameters()]
    trainer = BicoTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer,
                          data_collator=no_attention_mask)
    with pytest.raises(ValueError, match="no attention_mask"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was trained
    assert not is_patched(model)


def test_the_mixin_composes_with_another_trainer_class(tmp_path, tiny_model_dir, data_dir):
    class LoggingTrainer(Trainer):
        calls = 0

        def compute_loss(self, *args, **kwargs):
            LoggingTrainer.calls += 1
            return super().compute_loss(*args, **kwargs)

    class BicoLoggingTrainer(BicoTrainerMixin, LoggingTrainer):
        pass

    model, tokenizer = _load(tiny_model_dir)
    trainer = _trainer(model, tokenizer, _dataset(tokenizer, data_dir), tmp_path, trainer_class=BicoLoggingTrainer,
                       max_steps=4)
    modes = _record_modes(model)
    trainer.train()
    assert LoggingTrainer.calls == 4 and modes == [trainer.step_objective(step) == "bico" for step in range(4)]


def _unmet_requirements(dist: str) -> list[str]:
    """`dist`'s declared requirements (no extras) that the installed packages do not satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{req} (installed {installed})")
    return unmet


def test_trl_sft_trainer_with_completion_only_loss(tmp_path, tiny_model_dir, data_dir):
    trl = pytest.importorskip("trl")
    # A TRL left over beside older pins (e.g. the lowest-releases leg) fails inside TRL, not in bico.
    if unmet := _unmet_requirements("trl"):
        pytest.skip(f"the installed trl {trl.__version__} needs {', '.join(unmet)}")

    class BicoSFTTrainer(BicoTrainerMixin, trl.SFTTrainer):
        pass

    model, tokenizer = _load(tiny_model_dir)
    train = load_train(data_dir).select(range(32))
    dataset = datasets.Dataset.from_dict({"prompt": train["prompt"], "completion": train["completion"]})
    config = trl.SFTConfig(
        str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, completion_only_loss=True,
    )
    trainer = BicoSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, p_bico=1.0)
    batches = []
    masker = trainer.bico_batch
    trainer.bico_batch = lambda inputs, step=None: batches.append((inputs["labels"].clone(), masker(inputs, step))) or batches[-1][1]
    modes = _record_modes(model)
    trainer.train()
    assert modes and all(modes)
    for labels, masked in batches:
        targets = masked["labels"] != IGNORE_INDEX
        assert targets.any() and not (targets & (labels == IGNORE_INDEX)).any()  # prompts never targets
    assert all("loss_bico" in r for r in trainer.state.log_history if "loss" in r)


# --------------------------------------------------------------------------------------------------
# Processes and the README
# --------------------------------------------------------------------------------------------------


DRIVER = """
import json, os, sys
import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments
import bico.patch
from bico import BicoTrainer
model_dir, rows, output_dir, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
dataset = datasets.Dataset.from_dict(json.loads(open(rows).read()))
args = TrainingArguments(output_dir, max_steps=6, per_device_train_batch_size=batch, learning_rate=1e-3, logging_steps=1,
                         report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
trainer = BicoTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
modes, config = [], model.config
model.register_forward_pre_hook(lambda module, args: modes.append(bico.patch._ACTIVE[id(config)] > 0))
trainer.train()
with open(f"{output_dir}/modes_{trainer.args.process_index}.json", "w") as f:
    json.dump({"modes": modes, "logged": [r for r in trainer.state.log_history if "loss" in r]}, f)
trainer.accelerator.end_training()  # a gloo group left to interpreter exit aborted one run in four at teardown
# Still, at the lowest pins (transformers 5.0, accelerate 1.8) about one run in six aborted in interpreter
# finalization (C++ terminate, no Python frame; 0 of 8 at the newest releases): the files are written, so skip it.
os._exit(0)
"""


@pytest.mark.slow
def test_two_processes_choose_the_objectives_of_one(tmp_path, tiny_model_dir, data_dir, free_port):
    _, tokenizer = _load(tiny_model_dir)
    rows = str(tmp_path / "rows.json")
    Path(rows).write_text(json.dumps(_dataset(tokenizer, data_dir).to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run([sys.executable, str(driver), str(tiny_model_dir), rows, str(tmp_path / "one"), "8"], env=env, check=True,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port)]
    completed = subprocess.run(launch + [str(driver), str(tiny_model_dir), rows, str(tmp_path / "two"), "4"], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "modes_0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"modes_{rank}.json").read_text()) for rank in (0, 1)]
    assert one["modes"] == ranks[0]["modes"] == ranks[1]["modes"]  # the forward of each step, on each process
    assert len(one["modes"]) == 6 and set(one["modes"]) == {True, False}
    for log in (one, *ranks):  # the per-objective loss follows the step's objective
        assert [("loss_bico" in r) for r in log["logged"]] == one["modes"]


def test_readme_trainer_example_runs(tmp_path, monkeypatch, capsys):
    import re

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use BICO in your Trainer script", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"loss_bico", out) and re.search(r"loss_ntp", out)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bico-trainer-out" / "final").config.bico_objective == "bico"
