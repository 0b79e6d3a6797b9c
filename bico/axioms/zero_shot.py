"""A pre-trained language model on the transitivity evaluation sets, without training (zero-shot).

Vashishtha et al. (arXiv 2407.07612) set their small models beside large pre-trained ones prompted
with the same questions (GPT-4, Gemini Pro, Phi-3). `evaluate_zero_shot` measures any Hugging Face
causal LM the same way as `bico.axioms.evaluate` measures a trained one: the answer is the more
likely of Yes and No as the next token, accuracy is per set and per chain length, chance is 0.5.

The question is asked as one user turn through the tokenizer's chat template (`PROMPT`, e.g. "EX
causes T. T causes 9. Does EX cause 9? Answer with Yes or No."), so the answer is the assistant's
first token, `Yes` or `No`. A tokenizer without a chat template gets the same text followed by
`"\\nAnswer:"`, and the answers ` Yes` and ` No` (with their leading space). The answers are compared
at the first token where they differ (`answer_tokens`).
"""

from __future__ import annotations

import torch

from .evaluation import predict, summarize
from .generator import instance_text
from .tokenizer import ANSWERS


__all__ = ["PROMPT", "prompt_text", "answer_tokens", "encode_prompts", "evaluate_zero_shot"]

PROMPT = "{instance} Answer with Yes or No."


def prompt_text(row: dict, tokenizer) -> str:
    """The text a pre-trained model reads for `row`, ending where its answer starts."""
    content = PROMPT.format(instance=instance_text(row))
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return content + "\nAnswer:"


def answer_tokens(tokenizer) -> tuple[list[int], tuple[int, int]]:
    """How the answers (Yes, No) start after `prompt_text`: their shared first tokens, then the two that differ.

    With a byte-level tokenizer that has no ` Yes` token, ` Yes` and ` No` both start with the space
    token: it goes into the prompt (the first list), and the answer is read at the next token.

    Raises:
        `ValueError`: when one answer's tokens are a prefix of the other's.
    """
    prefix = "" if tokenizer.chat_template else " "
    yes, no = (tokenizer(prefix + answer, add_special_tokens=False)["input_ids"] for answer in ANSWERS)
    shared = 0
    while shared < min(len(yes), len(no)) and yes[shared] == no[shared]:
        shared += 1
    if shared == min(len(yes), len(no)):
        raise ValueError(f"the answers {' and '.join(ANSWERS)} tokenize as {yes} and {no}; they cannot be told apart.")
    return yes[:shared], (yes[shared], no[shared])


def encode_prompts(rows: list[dict], tokenizer) -> list[dict]:
    """Tokenize rows as `prompt_text` (and the answers' shared first tokens) for a pre-trained tokenizer.

    Returns:
        `list[dict]`: Per row `{"input_ids", "label", "num_nodes", "set"}` as `bico.axioms.encode` gives,
        with `label` the token where the right answer parts from the other (`answer_tokens`).
    """
    shared, answers = answer_tokens(tokenizer)
    label_ids = dict(zip(ANSWERS, answers))
    texts = [prompt_text(row, tokenizer) for row in rows]
    # The chat template writes the special tokens itself; a plain prompt gets the tokenizer's own (e.g. BOS).
    encodings = tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    encoded = []
    for index, (row, input_ids) in enumerate(zip(rows, encodings)):
        if row["label"] not in label_ids:
            raise ValueError(f"`rows[{index}]['label']` must be one of {', '.join(ANSWERS)}; got {row['label']!r}.")
        encoded.append({"input_ids": input_ids + shared, "label": label_ids[row["label"]], "num_nodes": row["num_nodes"],
                        "set": row["set"]})
    return encoded


def evaluate_zero_shot(model, tokenizer, rows: list[dict], batch_size: int = 16, desc: str | None = None) -> dict:
    """Accuracy of a pre-trained causal LM on `rows`, overall, per set and per chain length.

    Args:
        model: A Hugging Face causal LM with `get_decoder()` and `get_output_embeddings()` (e.g.
            `LlamaForCausalLM`); put in eval mode here.
        tokenizer: Its tokenizer; pads with its pad token, else EOS.
        rows (`list[dict]`): Rows of `generate_eval` / `read_jsonl`, any mix of sets.
        batch_size (`int`, *optional*, defaults to 16): Rows per forward pass; the answers do not depend on it.
        desc (`str`, *optional*): Show a progress bar with this title; none when None.

    Returns:
        `dict`: As `bico.axioms.evaluate` returns.
    """
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    examples = encode_prompts(rows, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Only the last real position is read: project it alone instead of (B, L, V) logits.
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1).to(device) - 1  # (B,)
        return head(hidden[torch.arange(hidden.shape[0], device=device), last])  # (B, V)

    model.eval()
    answers = answer_tokens(tokenizer)[1]
    predicted = predict(examples, answers, pad_token_id, batch_size, logits_fn, desc)
    return summarize(examples, predicted, yes_id=answers[ANSWERS.index("Yes")])
