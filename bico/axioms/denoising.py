"""BICO's denoising mixed into axiomatic training: does a bidirectional objective help with reversed chains?

Axiomatic training (Vashishtha et al., arXiv 2407.07612) scores a decoder on transitivity questions
whose chains are reversed or shuffled at test time. BICO (Lv et al., arXiv 2311.07468) trains a causal
LM to read text in both directions: placeholders replace some tokens, attention is bidirectional with
the conjugate RoPE rotation for keys ahead of the query (`bico.patch_llama`), and output i predicts
the masked token at i + 1. Here a step is a BICO step with probability `bico_prob`
(`bico.collators.choose_objective`, the same draw as BICO's 50/50 mix with NTP), on a `rope` Llama
(`architecture="llama"`); every other step is the ordinary answer loss (`answer_loss`).

Only premise tokens are masked (never position 0, never the question), at rate `bico_mask_prob`, at
least one per row (`bico.collators.BicoCollator`); the placeholder is `<pad>`. A question is never
answered in BICO mode: evaluation and the answer steps use the causal model, which `bico.patch_llama`
leaves unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..collators import BicoCollator, row_seed
from ..masking import IGNORE_INDEX
from ..patch import bidirectional


__all__ = ["premise_labels", "denoising_loss", "step_generator"]


def premise_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, does_id: int) -> torch.Tensor:
    """The premise tokens of each row, as labels: the token before the question's `Does`, -100 from it on.

    Args:
        input_ids, attention_mask (`torch.Tensor` of shape (B, L)): A right-padded batch (`collate`); each
            row holds one question, which starts with the `Does` token.
        does_id (`int`): The id of `Does`.

    Returns:
        `torch.Tensor` of shape (B, L), int64: `input_ids` on premise tokens, -100 on the question and padding.
    """
    in_question = torch.cumsum(input_ids == does_id, dim=1) > 0  # (B, L)
    premise = ~in_question & (attention_mask == 1)
    return input_ids.masked_fill(~premise, IGNORE_INDEX)


def step_generator(seed: int, step: int, process_index: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's masks: keyed on the step, so a resumed run draws the same masks."""
    return torch.Generator().manual_seed(row_seed(seed, step, process_index * 1_000_003 + micro_batch))


def denoising_loss(model, batch: dict, accelerator: Accelerator, collator: BicoCollator, does_id: int,
                   generator: torch.Generator) -> torch.Tensor:
    """BICO's autoregressive denoising loss on the premises of a batch, in bidirectional mode.

    The loss sums the cross-entropy of every masked token (predicted by the output one position
    before it) and divides by the masked tokens of every process times the number of processes, which
    DDP averages over, as `answer_loss` does for rows.

    Args:
        model: A `bico.patch_llama`-patched Llama (possibly wrapped by DDP).
        batch (`dict`): `collate`'s `input_ids` and `attention_mask` (B, L).
        collator (`BicoCollator`): Its `mask_batch` draws the placeholders.
        does_id (`int`): Where each question starts (`premise_labels`).
        generator (`torch.Generator`): Draws the masks of every row of the batch (`step_generator`).

    Returns:
        `torch.Tensor`: the scalar loss, float32.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = premise_labels(input_ids, attention_mask, does_id)
    masked = collator.mask_batch(input_ids.cpu(), attention_mask.cpu(), labels.cpu(), [generator] * len(input_ids))
    masked = {name: tensor.to(input_ids.device) for name, tensor in masked.items()}
    with bidirectional(model):
        logits = model(input_ids=masked["input_ids"], attention_mask=masked["attention_mask"], use_cache=False).logits  # (B, L, V)
    targets = masked["labels"][:, 1:]  # (B, L-1): output i predicts the masked token at i + 1
    global_targets = accelerator.reduce((targets != IGNORE_INDEX).sum(), reduction="sum")
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss * accelerator.num_processes / global_targets
