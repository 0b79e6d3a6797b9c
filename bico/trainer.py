"""BICO inside `transformers.Trainer` (and any Trainer subclass, such as TRL's `SFTTrainer`).

Two lines turn a causal-LM Trainer script into BICO fine-tuning:

    >>> from bico import BicoTrainer
    >>> trainer = BicoTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, p_bico=0.5)

or, for another Trainer class, `class BicoSFTTrainer(BicoTrainerMixin, SFTTrainer): pass`.

What the mixin adds to the Trainer it is mixed into:
    * the model is patched (`bico.patch_llama`, through a peft wrapper too) while `train()` runs, and
      unpatched after it and in everything `save_model` writes;
    * each optimizer step is BICO with probability `p_bico`, else NTP, from `(seed, global_step)` alone
      (`bico.objectives.step_objective`), so every micro-batch of an accumulation step, every process
      and a resumed run agree;
    * a BICO step masks the ordinary causal-LM batch the user's collator made (`input_ids`,
      `attention_mask`, `labels`): tokens become placeholders hidden from every query and their labels
      the only targets, with the masks of `bico.BicoCollator`. A token the collator labelled -100
      (padding, or a prompt under a completion-only loss) is never masked. With `entity_mask_prob`,
      whole entities are masked on top; the batch holds ids only, so each row is decoded and
      tokenized again with offsets to find them (`bico.entities`). A row whose ids do not come back
      (ids that are not the tokenizer's own tokenization of their text) gets the schedule's mask
      only; `trainer.masker.entities.unaligned` counts such rows and the first logs a warning;
    * the BICO forward runs inside `bico.bidirectional(model)`, and the Trainer's loss normalisation
      (`num_items_in_batch`, over the accumulation step and the processes) counts the masked labels;
    * `loss_bico` and `loss_ntp` are logged beside `loss`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Iterable, Iterator

import torch
from transformers import Trainer

from .collators import DEFAULT_MASK_PROB, BicoCollator, row_seed
from .masking import check_schedule
from .objectives import objective_mode, step_objective
from .patch import is_patched, patch_llama, unpatch_llama


__all__ = ["BicoTrainerMixin", "BicoTrainer"]

OBJECTIVE = "bico"  # the objective mixed with NTP; ABI needs its own batch layout, not a causal-LM batch
LOGGED = ("bico", "ntp")


class BicoTrainerMixin:
    """Adds BICO/NTP mixing to a `transformers.Trainer` subclass; put it first among the bases.

    Args (keyword-only, besides the Trainer's own):
        p_bico (`float`, *optional*, defaults to 0.5): Probability that an optimizer step is BICO.
        mask_prob (`float`, *optional*, defaults to 0.15): Masking rate of a BICO step (`fixed` and `span`).
        mask_schedule (`str`, *optional*, defaults to `"fixed"`): `"fixed"`, `"uniform"` (a rate per row
            from U(`mask_min`, `mask_max`)) or `"span"` (whole words); see `bico.masking`.
        mask_min (`float`, *optional*, defaults to 0.0), mask_max (`float`, *optional*, defaults to 1.0):
            The range of the `uniform` rate.
        entity_mask_prob (`float`, *optional*, defaults to 0.0): Probability of masking each entity of a
            row whole on top of the schedule (see above; needs a fast tokenizer); 0 keeps the masks as they were.
        entity_names (`Iterable[str]`, *optional*): Names that are entities wherever they occur, e.g.
            `bico.reverse.collect_names(completions)`; runs of capitalised words are entities anyway.
        placeholder_id (`int`, *optional*): Written over masked tokens; defaults to the tokenizer's
            (`processing_class`, required) pad, else unk, else eos id.
        bico_seed (`int`, *optional*): Seeds the objective of each step and the masks; defaults to `args.seed`.
        merge_adapters (`bool`, *optional*, defaults to `False`): `save_model()` of a peft model writes the
            merged plain model instead of the adapter (checkpoints keep the adapter, to resume from).

    Raises:
        ValueError: `p_bico` or a masking argument out of range, no tokenizer (`processing_class`), or a
            model that `bico.patch_llama` cannot patch (no rotary embeddings, or a rope type that cannot
            be conjugated).
    """

    def __init__(
        self,
        *args,
        p_bico: float = 0.5,
        mask_prob: float = DEFAULT_MASK_PROB,
        mask_schedule: str = "fixed",
        mask_min: float = 0.0,
        mask_max: float = 1.0,
        entity_mask_prob: float = 0.0,
        entity_names: Iterable[str] = (),
        placeholder_id: int | None = None,
        bico_seed: int | None = None,
        merge_adapters: bool = False,
        **kwargs,
    ):
        if not 0.0 <= p_bico <= 1.0:
            raise ValueError(f"`p_bico` must be in [0, 1], got {p_bico}.")
        check_schedule(mask_schedule, mask_prob, mask_min, mask_max, entity_mask_prob)
        super().__init__(*args, **kwargs)
        _check_patchable(self.model)
        self.p_bico = p_bico
        self.bico_seed = self.args.seed if bico_seed is None else bico_seed
        self.merge_adapters = merge_adapters
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor wraps one
        if not hasattr(tokenizer, "all_special_ids"):
            raise ValueError("BicoTrainer needs the tokenizer (its special ids are never masked): pass `processing_class=tokenizer`.")
        self.masker = BicoCollator(
            tokenizer, mask_prob, placeholder_id, self.bico_seed, schedule=mask_schedule, mask_min=mask_min, mask_max=mask_max,
            entity_mask_prob=entity_mask_prob, entity_names=entity_names,
        )
        self._objective_losses = {name: [0.0, set()] for name in LOGGED}  # loss sum, steps

    # -- the objective of a step ------------------------------------------------------------------

    def step_objective(self, step: int | None = None) -> str:
        """`"bico"` or `"ntp"` for optimizer step `step` (default: the step being computed)."""
        step = self.state.global_step if step is None else step
        return step_objective(OBJECTIVE, self.bico_seed, step, self.p_bico)

    def row_seeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int) -> list[int]:
        """One mask seed per row, keyed on (seed, step, the row's tokens).

        Not on the row's place in the batch, so the masks do not depend on the batch size, the
        padding side or the number of processes, and a resumed run draws them again.
        """
        seeds = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            tokens = [token for token, keep in zip(ids, mask) if keep]
            key = int.from_bytes(hashlib.blake2b(str(tokens).encode(), digest_size=8).digest(), "little")
            seeds.append(row_seed(self.bico_seed, step, key))
        return seeds

    def bico_batch(self, inputs: dict, step: int | None = None) -> dict:
        """The BICO version of a causal-LM batch: placeholders, their attention hidden, labels only there.

        Args:
            inputs (`dict`): The collator's batch with `input_ids`, `attention_mask` and `labels`, each
                (B, L); other entries are kept.
            step (`int`, *optional*): The optimizer step the masks are keyed on (default: the current one).

        Returns:
            `dict`: `inputs` with `input_ids`, `attention_mask` and `labels` replaced, (B, L) each.
        """
        _check_batch(inputs)
        step = self.state.global_step if step is None else step
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        generators = [torch.Generator().manual_seed(seed) for seed in self.row_seeds(input_ids, attention_mask, step)]
        masked = self.masker.mask_batch(input_ids, attention_mask, inputs["labels"], generators)
        return {**inputs, **masked}

    # -- Trainer hooks ----------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        patch_llama(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:
            unpatch_llama(self.model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The objective is known before the step's micro-batches run, so a BICO step's batches are
        # masked here and the Trainer's label count (loss normalisation) counts the masked labels.
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            _check_batch(batch)
        if self.step_objective() == "bico":
            batches = [self.bico_batch(batch) for batch in batches]
            num_items = self._get_num_items_in_batch(batches, device)
        return batches, num_items

    def compute_loss(self, model, inputs, *args, **kwargs):
        objective = self.step_objective() if model.training else "ntp"
        with objective_mode(model, objective):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        objective = self.step_objective()
        loss = super().training_step(model, inputs, *args, **kwargs)
        total, steps = self._objective_losses[objective]
        self._objective_losses[objective] = [total + loss.detach().float(), steps | {self.state.global_step}]
        return loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:  # a training log: every process calls it at the same step
            names = [name for name in LOGGED if self._objective_losses[name][1]]
            if names:
                totals = torch.stack([torch.as_tensor(self._objective_losses[name][0], dtype=torch.float32) for name in names])
                totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="mean").tolist()
                for name, total in zip(names, totals):
                    logs[f"loss_{name}"] = round(total / len(self._objective_losses[name][1]), 4)
            self._objective_losses = {name: [0.0, set()] for name in LOGGED}
        return super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        model = self.accelerator.unwrap_model(self.model)
        model.config.bico_objective = OBJECTIVE if self.p_bico > 0 else "ntp"  # recorded for bico-eval; inference stays causal
        with _unpatched(self.model):
            if self.merge_adapters and not _internal_call and hasattr(model, "merge_and_unload"):
                return self._save_merged(model, output_dir or self.args.output_dir)
            return super().save_model(output_dir, _internal_call)

    def _save_merged(self, model, output_dir: str) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "`merge_adapters` needs the whole model in one process; under FSDP or DeepSpeed save the adapter "
                "(merge_adapters=False) and merge it afterwards with peft's `merge_and_unload`."
            )
        if self.args.should_save:
            merged = copy.deepcopy(model).merge_and_unload()  # the trained model keeps its adapter
            os.makedirs(output_dir, exist_ok=True)
            merged.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()


class BicoTrainer(BicoTrainerMixin, Trainer):
    """`transformers.Trainer` with BICO/NTP mixing; see `BicoTrainerMixin` for the extra arguments."""


@contextlib.contextmanager
def _unpatched(model: torch.nn.Module) -> Iterator[None]:
    """Unpatch for the block (what is saved is the plain causal model), re-patch afterwards if it was."""
    was_patched = is_patched(model)
    if was_patched:
        unpatch_llama(model)
    try:
        yield
    finally:
        if was_patched:
            patch_llama(model)


def _check_patchable(model: torch.nn.Module) -> None:
    try:
        was_patched = is_patched(model)
        patch_llama(model)
    except (TypeError, ValueError) as error:  # no rotary embeddings; a rope type that cannot be conjugated
        raise ValueError(f"BicoTrainer cannot use this model: {error}") from None
    if not was_patched:
        unpatch_llama(model)


def _check_batch(batch: dict) -> None:
    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in batch]
    if missing:
        raise ValueError(
            f"BicoTrainer needs the collator's batches to hold input_ids, attention_mask and labels; this one has no "
            f"{', '.join(missing)} (keys: {', '.join(batch)}). BICO hides masked tokens through `attention_mask`: use a "
            "padding collator such as DataCollatorForLanguageModeling(tokenizer, mlm=False), not a padding-free one."
        )
