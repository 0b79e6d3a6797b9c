"""Training objectives: the registry, the objective of each optimizer step, and the forward that runs it.

BICO (Lv et al., arXiv 2311.07468, section 4.3) mixes two objectives: each optimizer step is, with
probability `p_bico`, a placeholder-mask denoising step run with bidirectional-RoPE attention, and
otherwise an ordinary next-token-prediction (NTP) step. The baselines are mixed with NTP the same
way: GLM blank infilling (`abi`), reverse training (`reverse`, Golovneva et al. 2024: NTP on the
row reversed word by word, with names and completions kept in their own order) and masked
fine-tuning of the causal model (`demask`, Pan et al., arXiv 2510.09885: read a masked copy of the
row, then write the row; `bico.demask`).

Both training front ends use this module: the Accelerate loop (`bico.training`) and the
`transformers.Trainer` adapter (`bico.trainer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .abi import AbiCollator, prepare_abi_model
from .collators import BicoCollator, NtpCollator, choose_objective
from .data import load_train
from .demask import DemaskCollator
from .patch import bidirectional
from .reverse import ReverseCollator, collect_names


@dataclass(frozen=True)
class Objective:
    """How one training objective makes its batches.

    Args:
        make_collator: `(tokenizer, config) -> collator`; `config` is a `bico.TrainConfig`. The
            collator maps a list of examples (`{"input_ids", "index", "seed"}`) to the model's keyword
            arguments (with `labels`).
        bidirectional: Run the forward inside `bico.bidirectional(model)`.
        setup: Optional `(model, tokenizer, config) -> None`, called once after loading and before
            LoRA and `prepare()` (e.g. to add special tokens and resize the embeddings).
    """

    make_collator: Callable[[PreTrainedTokenizerBase, object], Callable[[list[dict]], dict]]
    bidirectional: bool
    setup: Callable | None = None


def _answer_names(config) -> list[str]:
    """The names the training file answers with: `collect_names` over all its completions."""
    return collect_names(load_train(config.data_dir, config.train_file)["completion"])


def _masking_options(config) -> dict:
    """The masking keyword arguments of `BicoCollator` and `DemaskCollator` from a `TrainConfig`."""
    return dict(schedule=config.mask_schedule, mask_min=config.mask_min, mask_max=config.mask_max,
                entity_mask_prob=config.entity_mask_prob,
                entity_names=_answer_names(config) if config.entity_mask_prob > 0 else ())


# Objective name -> how to build its batches. `--objective X` mixes X with "ntp" by `p_bico`.
OBJECTIVES: dict[str, Objective] = {
    "ntp": Objective(lambda tokenizer, config: NtpCollator(tokenizer), bidirectional=False),
    "bico": Objective(
        lambda tokenizer, config: BicoCollator(
            tokenizer, config.mask_prob, config.placeholder_id, config.seed, **_masking_options(config),
        ),
        bidirectional=True,
    ),
    # Reverse training (bico.reverse): NTP on each row reversed word by word, names and completions kept whole.
    "reverse": Objective(
        lambda tokenizer, config: ReverseCollator(tokenizer, config.max_length, names=_answer_names(config),
                                                  marker=config.reverse_marker),
        bidirectional=False,
    ),
    # Masked fine-tuning (bico.demask): masked copy, separator, the row; causal attention, loss on the row.
    "demask": Objective(
        lambda tokenizer, config: DemaskCollator(
            tokenizer, config.max_length, config.mask_prob, config.seed, marker=config.demask_marker,
            separator=config.demask_separator, invert_prob=config.demask_invert_prob, **_masking_options(config),
        ),
        bidirectional=False,
    ),
    # GLM blank infilling (bico.abi): adds [MASK]/[START]/[END] and records bico_objective="abi".
    "abi": Objective(
        lambda tokenizer, config: AbiCollator(tokenizer, seed=config.seed),
        bidirectional=True,
        setup=lambda model, tokenizer, config: prepare_abi_model(model, tokenizer),
    ),
}


def step_objective(objective: str, seed: int, step: int, p_bico: float) -> str:
    """The objective of optimizer step `step` of a run whose objective is `objective`.

    `"ntp"` runs are NTP at every step; any other objective is mixed with NTP by `p_bico`, from an
    RNG keyed on `(seed, step)` alone (`choose_objective`): every micro-batch of an accumulation step,
    every process and a resumed run agree without communicating.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; registered: {', '.join(OBJECTIVES)}.")
    return objective if objective == "ntp" else choose_objective(seed, step, p_bico, objective)


def objective_mode(model: torch.nn.Module, objective: str) -> contextlib.AbstractContextManager:
    """The context a forward of `objective` runs in: `bico.bidirectional(model)` or nothing."""
    return bidirectional(model) if OBJECTIVES[objective].bidirectional else contextlib.nullcontext()
