"""The BICO fine-tuning loop: Accelerate, a 50/50 BICO/NTP mix per step, atomic checkpoints, LoRA merge.

BICO (Lv et al., arXiv 2311.07468, section 4.3) fine-tunes a causal LM where each optimizer step is,
with probability `p_bico`, a placeholder-mask denoising step run with bidirectional-RoPE attention
(`bico.bidirectional(model)`), and otherwise an ordinary next-token-prediction step. Nothing changes
at inference: the saved model is the plain causal model (LoRA adapters merged).

`train(TrainConfig(...))` runs, in order: Accelerator, seed, data, model (+ peft LoRA +
`patch_llama`), optimizer, scheduler, one `prepare()`, the loop, the final save and evaluation.
The options live in `bico.config`, the objectives in `bico.objectives`, checkpoints in
`bico.checkpoints`, the Accelerator and the process group in `bico.processes`;
`scripts/finetune_bico.py` and `bico-train` are the command line.

Reproducibility: the data order is keyed on (seed, epoch), the objective on (seed, step) and each
row's mask on (seed, epoch, row), so a run resumed from a checkpoint, or spread over more processes
with the same global batch, repeats the same sequence of batches, objectives and masks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from .checkpoints import progress_state, read_history, resume_checkpoint, save_checkpoint
from .collators import IGNORE_INDEX, encode_rows, row_seed
from .compat import enable_activation_checkpointing
from .config import DEFAULT_MAX_STEPS, VARIANT_FIELDS, TrainConfig, parse_config
from .data import load_train
from .objectives import OBJECTIVES, objective_mode, step_objective
from .patch import patch_llama, unpatch_llama
from .pretrained import is_gguf, resolve_model_path
from .processes import end_processes, end_run, start_run


__all__ = ["TrainConfig", "parse_config", "train", "save_final_model", "end_processes"]

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# Model, data, evaluation
# --------------------------------------------------------------------------------------------------


def _training_texts(config: TrainConfig) -> tuple[list[str], list[str]]:
    dataset = load_train(config.data_dir, config.train_file)
    if config.max_train_samples is not None:
        dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    return dataset["prompt"], dataset["completion"]


def _model_dir(config: TrainConfig, accelerator: Accelerator, texts: list[str]) -> Path:
    """The model to fine-tune; builds the default scratch model (atomically) when none is given."""
    if config.model_name_or_path is not None:
        path = Path(config.model_name_or_path)
        if is_gguf(path):
            # Converted once into the cache (bico.pretrained); the other processes wait for it.
            if accelerator.is_main_process:
                resolve_model_path(path)
            accelerator.wait_for_everyone()
            return resolve_model_path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"`model_name_or_path` {str(path)!r} is not a model directory (no config.json); pass a local "
                "directory written by save_pretrained or a .gguf file, or omit it to build the small scratch model."
            )
        return path
    from .scratch import build_scratch_model

    base = Path(config.output_dir) / "base"
    if accelerator.is_main_process and not (base / "config.json").is_file():
        staging = base.with_name("base.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        build_scratch_model(texts, staging, seed=config.seed)
        os.replace(staging, base)
    accelerator.wait_for_everyone()
    return base


def _load_model(config: TrainConfig, model_dir: Path):
    dtype = config.model_dtype if config.model_dtype == "auto" else getattr(torch, config.model_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    setup = OBJECTIVES[config.objective].setup
    if setup is not None:
        setup(model, tokenizer, config)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_target_modules
        targets = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    patch_llama(model)
    return model, tokenizer


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW at `config.learning_rate` over the trainable parameters only.

    Matrices and embeddings decay by `config.weight_decay`, norms and biases do not (as in nanoGPT).
    Frozen parameters (`requires_grad=False`) are left out, so no decay ever reaches them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _keep_examples(examples: list[dict]) -> list[dict]:
    # The objective is chosen per step, so collation happens in the loop, not in the DataLoader.
    return examples


def _evaluate(model, tokenizer, tasks: list[str], config: TrainConfig, accelerator: Accelerator, show_progress: bool):
    """The one place training calls the evaluation: greedy decoding and ranking on the causal model."""
    from .evaluation import evaluate

    return evaluate(
        model, tokenizer, tasks, data_dir=config.data_dir, batch_size=config.eval_batch_size,
        max_new_tokens=config.eval_max_new_tokens, accelerator=accelerator, show_progress=show_progress,
    )


def _flat_metrics(results, prefix: str) -> dict[str, float]:
    """`{task: {metric: number}}` (nested dicts allowed) -> `{"prefix/task/metric": number}`."""
    flat = {}

    def visit(value, key):
        if isinstance(value, dict):
            for name, inner in value.items():
                visit(inner, f"{key}/{name}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)

    visit(results, prefix)
    return flat


def tracker_config(config: TrainConfig) -> dict:
    """The config as `init_trackers` takes it: TensorBoard's hparams accept only numbers, strings and booleans."""
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value)) for key, value in asdict(config).items()}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.num_train_epochs is not None:
        return math.ceil(config.num_train_epochs * steps_per_epoch)
    return DEFAULT_MAX_STEPS


def make_scheduler(config: TrainConfig, optimizer, total_steps: int, processes: int):
    """`config.lr_scheduler_type` over `total_steps` optimizer steps, with `warmup_steps` (or `warmup_ratio`)."""
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    scheduler_kwargs = {"min_lr_rate": config.min_lr_rate} if config.lr_scheduler_type.endswith("with_min_lr") else None
    # A prepared scheduler steps once per process at every optimizer step, hence the * processes.
    return get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=warmup * processes,
        num_training_steps=total_steps * processes, scheduler_specific_kwargs=scheduler_kwargs,
    )


def objective_loss(model, batch: dict, objective: str, accelerator: Accelerator) -> torch.Tensor:
    """One micro-batch's loss under `objective`, normalised by the label count of the global batch.

    Dividing by the labels of every process (and by the number of processes, which DDP averages
    over) makes P processes x batch b give the gradient of 1 process x batch P*b.
    """
    local_items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    global_items = accelerator.reduce(local_items, reduction="sum").clamp(min=1)
    with objective_mode(model, objective):
        return model(**batch, use_cache=False, num_items_in_batch=global_items / accelerator.num_processes).loss


def train(config: TrainConfig) -> dict:
    """Fine-tune with `config.objective` mixed with NTP, save `output_dir/final`, evaluate.

    Args:
        config (`TrainConfig`): The run.

    Returns:
        `dict`: `global_step`; `loss` (mean training loss of the last step); `objectives` and
        `losses` (objective and mean loss of each step run in this call; `objectives` holds
        `[step, name]` pairs); `final_dir`; `eval_history` (evaluations during training);
        `results` (the final evaluation, or None).

    Several runs can follow one another in a process: the process group of a multi-process launch stays
    up, and `end_processes()` ends it after the last.
    """
    accelerator, output_dir = start_run(config)

    # Data and model
    prompts, completions = _training_texts(config)
    model_dir = _model_dir(config, accelerator, [p + c for p, c in zip(prompts, completions)])
    model, tokenizer = _load_model(config, model_dir)
    examples, truncated = encode_rows(prompts, completions, tokenizer, config.max_length)
    if truncated:
        logger.warning(f"{truncated} of {len(examples)} training rows are longer than `max_length`={config.max_length} and were cut.")
    collators = {name: OBJECTIVES[name].make_collator(tokenizer, config) for name in dict.fromkeys(["ntp", config.objective])}
    dataloader = DataLoader(examples, batch_size=config.per_device_train_batch_size, shuffle=True, collate_fn=_keep_examples)

    optimizer = make_optimizer(model, config)
    # len(dataloader) is still the single-process length here; prepare() shards it.
    processes = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / processes) / config.gradient_accumulation_steps)
    total_steps = _total_steps(config, steps_per_epoch)
    scheduler = make_scheduler(config, optimizer, total_steps, processes)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if config.report_to:
        accelerator.init_trackers("bico", config=tracker_config(config))

    global_step, epoch, batches_done = 0, 0, 0
    state = resume_checkpoint(accelerator, config, output_dir)
    if state is not None:
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
        if batches_done >= len(dataloader):
            epoch, batches_done = epoch + 1, 0
    history_file = output_dir / "eval_history.jsonl"
    eval_history = read_history(history_file, global_step) if accelerator.is_main_process else []

    accelerator.print(
        f"training {total_steps} steps ({steps_per_epoch} per epoch), objective {config.objective}"
        f"{f' mixed with ntp at p_bico={config.p_bico}' if config.objective != 'ntp' else ''}, "
        f"{accelerator.num_processes} process(es) x batch {config.per_device_train_batch_size} "
        f"x accumulation {config.gradient_accumulation_steps}"
    )
    bar = tqdm(total=total_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    objectives_run, losses, last_loss = [], [], float("nan")
    step_loss, micro_batches = torch.zeros((), device=accelerator.device), 0
    model.train()
    while global_step < total_steps:
        dataloader.set_epoch(epoch)
        batches = dataloader
        if batches_done:
            batches = skip_first_batches(dataloader, batches_done)
            # accelerate 1.8-1.14 start the new loader at epoch 0, i.e. with another data order (measured).
            batches.set_epoch(epoch)
        for raw in batches:
            batches_done += 1
            objective = step_objective(config.objective, config.seed, global_step, config.p_bico)
            rows = [{**row, "seed": row_seed(config.seed, epoch, row["index"])} for row in raw]
            with accelerator.accumulate(model):
                batch = {key: value.to(accelerator.device) for key, value in collators[objective](rows).items()}
                loss = objective_loss(model, batch, objective, accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            last_loss = accelerator.reduce(step_loss / micro_batches, reduction="mean").item()
            step_loss.zero_()
            micro_batches = 0
            objectives_run.append([global_step, objective])
            losses.append(last_loss)
            global_step += 1
            bar.set_postfix(loss=f"{last_loss:.3f}", objective=objective, refresh=False)
            bar.update(1)
            if config.report_to and global_step % config.logging_steps == 0:
                accelerator.log(
                    {"train/loss": last_loss, f"train/loss_{objective}": last_loss,
                     "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch},
                    step=global_step,
                )
            if config.eval_every and global_step % config.eval_every == 0:
                tasks = config.eval_every_task_list()
                if global_step == total_steps:  # the final evaluation follows; only what it leaves out
                    tasks = [task for task in tasks if task not in config.eval_task_list()]
                if tasks:
                    eval_history.append(_evaluate_during_training(model, tokenizer, tasks, config, accelerator, global_step, history_file))
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                progress = progress_state(config, global_step, epoch, batches_done)
                save_checkpoint(accelerator, output_dir, progress, config.checkpoints_total_limit)
            if global_step >= total_steps:
                break
        else:  # the epoch ran out before the steps did
            epoch, batches_done = epoch + 1, 0
    bar.close()

    # Final model: the plain causal model, adapters merged, objective recorded for bico-eval.
    final_dir = output_dir / "final"
    final_model = save_final_model(accelerator, model, tokenizer, config, model_dir, final_dir)
    results = _final_evaluation(final_model, tokenizer, config, accelerator, final_dir, global_step)
    # DDP's reducer holds the process group: freed after the group is destroyed, it runs gloo's destructor,
    # which joins gloo's threads while holding the GIL and can deadlock (seen with 2 processes on a busy
    # 2-core machine). So nothing wrapped outlives train(); the group stays up for the next run.
    del model, optimizer, dataloader, scheduler
    end_run(accelerator)
    return {
        "global_step": global_step,
        "loss": last_loss,
        "objectives": objectives_run,
        "losses": losses,
        "final_dir": str(final_dir),
        "eval_history": eval_history,
        "results": results,
    }


def _evaluate_during_training(model, tokenizer, tasks: list[str], config: TrainConfig, accelerator: Accelerator, step: int,
                              history_file: Path) -> dict:
    results, _ = _evaluate(model, tokenizer, tasks, config, accelerator, False)
    record = {"step": step, "objective": config.objective, "tasks": results["tasks"]}
    if accelerator.is_main_process:
        with open(history_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if config.report_to:
        accelerator.log(_flat_metrics(results["tasks"], "eval"), step=step)
    return record


def _final_evaluation(model, tokenizer, config: TrainConfig, accelerator: Accelerator, final_dir: Path, steps: int) -> dict | None:
    if not config.eval_task_list():
        return None
    from .evaluation import format_table, write_predictions, write_results

    results, predictions = _evaluate(model, tokenizer, config.eval_task_list(), config, accelerator, True)
    results["model"] = str(final_dir)
    # Every option that makes any objective's variants differ, so results.json names the run.
    variant_options = dict.fromkeys(itertools.chain(*VARIANT_FIELDS.values()))
    results["training"] = {"objective": config.objective, **{key: getattr(config, key) for key in variant_options},
                           "steps": steps, "seed": config.seed}
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        write_results(results, output_dir / "results.json")
        write_predictions(predictions, output_dir / "predictions.jsonl")
        print(format_table(results))
    if config.report_to:
        accelerator.log(_flat_metrics(results["tasks"], "final"), step=steps)
    return results


def save_final_model(accelerator: Accelerator, model, tokenizer, config: TrainConfig, model_dir: Path, final_dir: Path):
    """Save the trained model as a plain causal LM (LoRA merged, unpatched) with its tokenizer.

    `config.json` records `bico_objective`. Returns the saved model on every process, ready for
    evaluation; under FSDP, whose parameters are sharded, it is loaded back from `final_dir`.
    """
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.FSDP:
        state_dict = accelerator.get_state_dict(model)  # gathered on the main process
        if accelerator.is_main_process:
            # Rebuild the model on the CPU as training built it (dtype, the objective's setup such as
            # abi's resized embeddings, peft around a fresh base), load the gathered weights, merge there.
            unsharded, _ = _load_model(config, model_dir)
            unsharded.load_state_dict(state_dict)
            if config.lora_r > 0:
                unsharded = unsharded.merge_and_unload()
            _write_final(unpatch_llama(unsharded), tokenizer, config, final_dir)
        accelerator.wait_for_everyone()
        return AutoModelForCausalLM.from_pretrained(final_dir).to(accelerator.device)
    final_model = accelerator.unwrap_model(model)
    if config.lora_r > 0:
        final_model = final_model.merge_and_unload()
    unpatch_llama(final_model)
    if accelerator.is_main_process:
        _write_final(final_model, tokenizer, config, final_dir)
    accelerator.wait_for_everyone()
    return final_model


def _write_final(model, tokenizer, config: TrainConfig, final_dir: Path) -> None:
    model.config.bico_objective = config.objective  # bico-eval picks the inference mode from it
    model.config.use_cache = True
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)

