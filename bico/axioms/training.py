"""Axiomatic training: a decoder from scratch learns to answer Yes/No to transitivity questions.

Vashishtha et al. (arXiv 2407.07612, section 3; DESIGN.md section 9) train a GPT-2-style decoder on
rows `premise + question` and score only the answer: the loss is the cross-entropy of the Yes or No
token at the last input position (the `?`); nothing else in the row is a target. Their code uses
AdamW at lr 1e-4, batch 128, 100 epochs on ~175k rows (`configs/axioms_paper.yaml`); the defaults here
are a CPU-sized model with the paper's loss. `configs/axioms_cpu.yaml` adds what the CPU run needed to
learn at all: an auxiliary next-token loss on the row (`premise_lm_weight`), batch 32, 20,000 steps.

`train(AxiomConfig(...))` runs, in order: Accelerator, seed, data, tokenizer, model, optimizer,
scheduler, one `prepare()`, the loop, the final save. It reuses the project's training machinery:
`bico.processes` (Accelerator, threads), `bico.checkpoints` (atomic checkpoints, resume),
`bico.config` (flags and YAML from the dataclass), `bico.training` (AdamW groups, schedule).

Reproducibility: the rows depend on (mix, num_instances, data_seed) or the file, the model on
`seed`, the data order on (seed, epoch); a run resumed from a checkpoint (model, optimizer,
scheduler, RNG states, position in the epoch) ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import math
from functools import partial
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import SchedulerType

from ..checkpoints import progress_state, resume_checkpoint, save_checkpoint
from ..config import MIXED_PRECISION_CHOICES, check_choice, parse_config
from ..collators import BicoCollator, choose_objective
from ..patch import patch_llama, unpatch_llama
from ..processes import end_run, start_run
from ..training import make_optimizer, make_scheduler, tracker_config
from .generator import EVAL_SETS, TRAIN_MIXES, generate_eval, generate_train, read_jsonl
from .denoising import denoising_loss, step_generator
from .models import ARCHITECTURES, build_model, check_architecture, check_position_encoding, collate, gather_last
from .tokenizer import answer_ids, build_tokenizer, encode


__all__ = ["AxiomConfig", "parse_axiom_config", "generate_split", "train", "answer_loss"]

DEFAULT_OUTPUT_ROOT = "outputs/axioms"
# Fields that may differ between a run and its resumption without changing the trained weights.
RESUME_MAY_CHANGE = {
    "resume_from_checkpoint", "output_dir", "report_to", "logging_steps", "checkpointing_steps", "checkpoints_total_limit",
    "cpu_threads",
}


@dataclass
class AxiomConfig:
    """Every option of an axiomatic training run; each field is a flag of `bico-axioms train`."""

    # Data
    train_file: str | None = field(default=None, metadata={
        "help": "training rows as JSONL (bico-axioms generate); None = generate them from mix, num_instances, data_seed"})
    mix: str = field(default="TS2", metadata={"help": f"training mix when generating: {', '.join(TRAIN_MIXES)}"})
    num_instances: int = field(default=20_000, metadata={"help": "rows to generate (the paper: ~175,000)"})
    data_seed: int = field(default=0, metadata={
        "help": "seed of the generated rows; the same as `bico-axioms generate --seed`, so they avoid its evaluation premises"})

    # Model
    position_encoding: str = field(default="none", metadata={"help": "none, learned, sinusoidal or rope (bico.axioms.models)"})
    architecture: str = field(default="gpt", metadata={
        "help": f"{' or '.join(ARCHITECTURES)}: GPT-2 / GPT-NeoX as in the paper, or a RoPE Llama (needed by bico_prob)"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks (the paper: 12)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (the paper: 8)"})
    n_embd: int = field(default=128, metadata={"help": "width (the paper: 512)"})
    max_positions: int = field(default=256, metadata={
        "help": "longest input in tokens (GPT-2's position table); the evaluation sets reach ~200"})
    dropout: float = field(default=0.0, metadata={"help": "every dropout rate of the model"})
    premise_lm_weight: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary next-token loss on the premise and question tokens; 0 = the paper's answer-only loss"})
    bico_prob: float = field(default=0.0, metadata={
        "help": "probability of a BICO denoising step on the premises (bico.axioms.denoising; architecture llama); 0 = none"})
    bico_mask_prob: float = field(default=0.15, metadata={"help": "premise tokens masked per BICO step (at least one per row)"})
    seed: int = field(default=0, metadata={"help": "seeds the model init, the data order and the BICO steps and masks"})

    # Optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (the paper: 1e-4)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices (not norms, biases, frozen tables)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 turns it off"})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "any transformers.get_scheduler name"})
    min_lr_rate: float = field(default=0.1, metadata={"help": "floor of the *_with_min_lr schedules, as a fraction of the peak"})
    warmup_ratio: float = field(default=0.02, metadata={"help": "warm-up as a fraction of the steps"})
    warmup_steps: int = field(default=0, metadata={"help": "warm-up steps; overrides warmup_ratio when > 0"})
    num_train_epochs: float = field(default=20.0, metadata={"help": "epochs over the rows (the paper: 100)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; wins over num_train_epochs"})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "rows per process per micro-batch (the paper: 128)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, fp16, bf16 or fp8; None = the accelerate launch setting"})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch threads per process on CPU; None = physical cores / local processes"})

    # Output, checkpoints, logging
    output_dir: str | None = field(default=None, metadata={
        "help": f"checkpoints/, final/ (model + tokenizer) and train_config.yaml; None = {DEFAULT_OUTPUT_ROOT}/<position_encoding>"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save the training state every N steps; 0 = never"})
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest N checkpoints; None = all"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint directory, or latest (starts fresh if none)"})
    report_to: str | None = field(default=None, metadata={"help": "tracker for accelerator.init_trackers, e.g. tensorboard"})
    logging_steps: int = field(default=20, metadata={"help": "log loss, accuracy and learning rate to the tracker every N steps"})

    def __post_init__(self):
        check_position_encoding(self.position_encoding)
        check_architecture(self.architecture, self.position_encoding)
        if not 0.0 <= self.bico_prob <= 1.0 or not 0.0 < self.bico_mask_prob <= 1.0:
            raise ValueError(f"`bico_prob` must be in [0, 1] and `bico_mask_prob` in (0, 1]; got {self.bico_prob}, {self.bico_mask_prob}.")
        if self.bico_prob > 0 and self.architecture != "llama":
            raise ValueError("`bico_prob` > 0 needs `architecture` llama (the model bico.patch_llama patches) and `position_encoding` rope.")
        if self.train_file is None:
            check_choice("mix", self.mix, list(TRAIN_MIXES))
        check_choice("lr_scheduler_type", self.lr_scheduler_type, [s.value for s in SchedulerType])
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        positive = ["num_instances", "n_layer", "n_head", "n_embd", "max_positions", "num_train_epochs",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"]
        positive += [name for name in ("max_steps", "checkpoints_total_limit", "cpu_threads") if getattr(self, name) is not None]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "warmup_ratio", "checkpointing_steps", "premise_lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if self.output_dir is None:
            self.output_dir = f"{DEFAULT_OUTPUT_ROOT}/{self.position_encoding}"


def parse_axiom_config(argv=None, parser=None) -> AxiomConfig:
    """An `AxiomConfig` from its defaults, then `--config file.yaml`, then the flags given (`bico.config`)."""
    return parse_config(argv, AxiomConfig, parser)


# --------------------------------------------------------------------------------------------------
# Data and loss
# --------------------------------------------------------------------------------------------------


def generate_split(mix: str, num_instances: int, seed: int, eval_instances: int = 500) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training rows and every evaluation set of `EVAL_SETS` from one seed, no training premise in them.

    Returns:
        `tuple`: `(train_rows, {set name: rows})`; `bico-axioms generate` writes exactly these, and
        `train` without `train_file` trains on exactly these training rows.
    """
    eval_sets = {name: generate_eval(name, eval_instances, seed=seed) for name in EVAL_SETS}
    excluded = [row for rows in eval_sets.values() for row in rows]
    return generate_train(mix, num_instances, seed=seed, exclude=excluded), eval_sets


def _training_rows(config: AxiomConfig) -> list[dict]:
    if config.train_file is not None:
        return read_jsonl(config.train_file)  # DataError (a ValueError): path:line: what is wrong
    return generate_split(config.mix, config.num_instances, config.data_seed)[0]


def answer_loss(
    model, batch: dict, accelerator: Accelerator, answer_token_ids: torch.Tensor, premise_lm_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer token at each row's last real position, and the rows answered right.

    The loss sums over the micro-batch and divides by the rows of every process (and by the number of
    processes, which DDP averages over), so P processes x batch b give the gradient of 1 x batch P*b.
    With `premise_lm_weight` w > 0 it adds w times the mean next-token cross-entropy over the row's own
    tokens (every real token after the first, normalised by the real tokens of every process): a
    deviation from the paper, whose single answer bit per row gives a small model little to start from.

    Args:
        batch (`dict`): `collate`'s `input_ids`, `attention_mask` (B, L) and `answer_ids` (B,).
        answer_token_ids (`torch.Tensor`): (2,) the Yes and No ids; the prediction is the larger logit of the two.
        premise_lm_weight (`float`): weight of the auxiliary next-token loss; 0 leaves the paper's loss.

    Returns:
        `tuple`: the scalar loss (float32) and the count of rows whose prediction is right (int64, local).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L, V)
    answer_logits = gather_last(logits, attention_mask).float()  # (B, V)
    rows = torch.tensor(batch["answer_ids"].shape[0], device=logits.device)
    global_rows = accelerator.reduce(rows, reduction="sum")
    loss = F.cross_entropy(answer_logits, batch["answer_ids"], reduction="sum") * accelerator.num_processes / global_rows
    if premise_lm_weight > 0:
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, L-1)
        global_tokens = accelerator.reduce((targets != -100).sum(), reduction="sum")
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        loss = loss + premise_lm_weight * lm_loss * accelerator.num_processes / global_tokens
    predictions = answer_token_ids[answer_logits[:, answer_token_ids].argmax(dim=-1)]  # (B,)
    return loss, (predictions == batch["answer_ids"]).sum()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _batches_from(dataloader, epoch: int, batches_done: int):
    """Yield `(epoch, batches_done, batch)` without end, starting `batches_done` batches into `epoch`."""
    while True:
        dataloader.set_epoch(epoch)
        batches = dataloader
        if batches_done:
            batches = skip_first_batches(dataloader, batches_done)
            batches.set_epoch(epoch)  # accelerate 1.8-1.14 start the new loader at epoch 0 (bico.training)
        for batch in batches:
            batches_done += 1
            yield epoch, batches_done, batch
        epoch, batches_done = epoch + 1, 0


def train(config: AxiomConfig) -> dict:
    """Train a decoder with `config.position_encoding` on the transitivity rows; save `output_dir/final`.

    Args:
        config (`AxiomConfig`): The run.

    Returns:
        `dict`: `global_step`; `loss` and `accuracy` (training loss and Yes/No accuracy of the last step);
        `losses` (per step run in this call); `final_dir`; `num_rows`; `num_parameters` (trainable);
        `loop_seconds` and `rows_seen` (wall time and rows of the steps run in this call, all processes).
    """
    accelerator, output_dir = start_run(config)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"`bico-axioms train` runs one or more DDP processes, not {accelerator.distributed_type.value}: "
                         "the models are small enough to hold whole on every device.")

    # Data, tokenizer, model
    tokenizer = build_tokenizer()
    examples = encode(_training_rows(config), tokenizer)
    longest = max(len(example["input_ids"]) for example in examples)
    if config.position_encoding != "rope" and longest > config.max_positions:
        raise ValueError(f"`max_positions` {config.max_positions} is shorter than the longest training row ({longest} tokens).")
    model = build_model(
        config.position_encoding, len(tokenizer), n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        max_positions=config.max_positions, pad_token_id=tokenizer.pad_token_id, seed=config.seed, dropout=config.dropout,
        architecture=config.architecture,
    )
    collator = None
    if config.bico_prob > 0:
        patch_llama(model)
        collator = BicoCollator(tokenizer, mask_prob=config.bico_mask_prob, seed=config.seed)
    does_id = tokenizer.convert_tokens_to_ids("Does")
    # A generator of its own: each new iterator (every epoch, and skip_first_batches on resume) draws a base
    # seed from it, not from the global RNG, which would then give a resumed run other dropout masks.
    dataloader = DataLoader(examples, batch_size=config.per_device_train_batch_size, shuffle=True,
                            collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
                            generator=torch.Generator().manual_seed(config.seed))
    optimizer = make_optimizer(model, config)
    processes = accelerator.num_processes
    # len(dataloader) is still the single-process length here; prepare() shards it.
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / processes) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or math.ceil(config.num_train_epochs * steps_per_epoch)
    scheduler = make_scheduler(config, optimizer, total_steps, processes)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if config.report_to:
        accelerator.init_trackers("bico-axioms", config=tracker_config(config))
    answer_token_ids = torch.tensor(answer_ids(tokenizer), device=accelerator.device)

    global_step, epoch, batches_done = 0, 0, 0
    state = resume_checkpoint(accelerator, config, output_dir, RESUME_MAY_CHANGE)
    if state is not None:
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(
        f"training {config.position_encoding} ({num_parameters:,} parameters) on {len(examples):,} rows: {total_steps} steps "
        f"({steps_per_epoch} per epoch), {processes} process(es) x batch {config.per_device_train_batch_size} "
        f"x accumulation {config.gradient_accumulation_steps}"
    )
    name = config.position_encoding + (f" {config.architecture}" if config.architecture != "gpt" else "")
    name += f" +bico {config.bico_prob:g}" if config.bico_prob else ""
    bar = tqdm(total=total_steps, initial=global_step, desc=f"train {name}",
               disable=not accelerator.is_local_main_process)
    losses, last_loss, last_accuracy, last_bico_loss = [], float("nan"), float("nan"), float("nan")
    step_loss, step_correct, step_rows, micro_batches = 0.0, 0, 0, 0
    rows_seen, start = 0, time.perf_counter()
    model.train()
    for epoch, batches_done, batch in _batches_from(dataloader, epoch, batches_done):
        if global_step >= total_steps:
            break
        objective = choose_objective(config.seed, global_step, config.bico_prob)  # "bico" or "ntp": the answer loss
        with accelerator.accumulate(model):
            if objective == "bico":
                generator = step_generator(config.seed, global_step, accelerator.process_index, micro_batches)
                loss = denoising_loss(model, batch, accelerator, collator, does_id, generator)
                correct = torch.zeros((), dtype=torch.long, device=loss.device)
            else:
                loss, correct = answer_loss(model, batch, accelerator, answer_token_ids, config.premise_lm_weight)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        answered = 0 if objective == "bico" else len(batch["answer_ids"])
        counts = accelerator.reduce(torch.tensor([correct.item(), answered, len(batch["input_ids"])], device=correct.device), "sum")
        step_loss += loss.detach()
        step_correct, step_rows, micro_batches = step_correct + counts[0].item(), step_rows + counts[1].item(), micro_batches + 1
        rows_seen += counts[2].item()
        if not accelerator.sync_gradients:
            continue

        # One optimizer step done.
        step_mean = accelerator.reduce(step_loss / micro_batches, reduction="mean").item()
        losses.append(step_mean)
        if objective == "bico":
            last_bico_loss = step_mean
        else:
            last_loss, last_accuracy = step_mean, step_correct / step_rows
        step_loss, step_correct, step_rows, micro_batches = 0.0, 0, 0, 0
        global_step += 1
        postfix = {"loss": f"{last_loss:.3f}", "acc": f"{last_accuracy:.2f}"}
        bar.set_postfix(postfix | ({"bico": f"{last_bico_loss:.3f}"} if config.bico_prob else {}), refresh=False)
        bar.update(1)
        if config.report_to and global_step % config.logging_steps == 0:
            accelerator.log({"train/loss": last_loss, "train/accuracy": last_accuracy, "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": epoch} | ({"train/loss_bico": last_bico_loss} if config.bico_prob else {}),
                            step=global_step)
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, progress_state(config, global_step, epoch, batches_done),
                            config.checkpoints_total_limit)
    loop_seconds = time.perf_counter() - start
    bar.close()

    final_dir = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        if collator is not None:
            unpatch_llama(final_model)  # saved as the plain causal Llama
        final_model.config.use_cache = True
        final_model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    accelerator.wait_for_everyone()
    del model, optimizer, dataloader, scheduler  # nothing wrapped by DDP may outlive train() (bico.training.train)
    end_run(accelerator)
    return {
        "global_step": global_step, "loss": last_loss, "accuracy": last_accuracy, "losses": losses,
        "final_dir": str(final_dir), "num_rows": len(examples), "num_parameters": num_parameters,
        "loop_seconds": loop_seconds, "rows_seen": rows_seen,
    }
