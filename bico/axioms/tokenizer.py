"""The fixed-vocabulary tokenizer of the transitivity task: keywords whole, every other word by character.

As in Vashishtha et al. (arXiv 2407.07612; DESIGN.md section 9): `.` and `?` are split off, then the
text is split on whitespace; the words `causes`, `cause`, `Does`, `Yes` and `No` are one token each,
and every other word (a node name) is split into its characters. The vocabulary is fixed, nothing is
trained: `<pad>` = 0, `<unk>` = 1, `.`, `?`, the 5 words, then `0-9`, `A-Z`, `a-z` (71 tokens).

No BOS or EOS token: the model reads one instance and is scored only on the token it predicts after
the final `?` (Yes or No), so nothing has to mark where generation stops, and positions start at the
first token of the premise. Padding goes on the right, so every instance keeps positions 0..L-1 and
its last real position is `attention_mask.sum() - 1`.

A character outside the vocabulary (e.g. `é`, `_`) becomes `<unk>` in the tokenizer itself (the
documented fallback, never another character's id); `encode` refuses it, naming the character and
the text.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .generator import instance_text
from .graphs import ANSWERS, KEYWORDS


PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PUNCTUATION = (".", "?")
# The order fixes the ids: <pad> = 0, <unk> = 1.
VOCAB = (
    PAD_TOKEN, UNK_TOKEN, *PUNCTUATION, *KEYWORDS, *string.digits, *string.ascii_uppercase, *string.ascii_lowercase
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task's tokenizer, e.g. `"EX causes T."` -> `E X causes T .` (ids `[23, 42, 4, 38, 2]`).

    It saves and reloads with `save_pretrained` / `AutoTokenizer.from_pretrained(dir)` unchanged.

    Returns:
        `PreTrainedTokenizerFast`: 71 tokens, `pad_token="<pad>"` (id 0), `unk_token="<unk>"` (id 1),
        no BOS/EOS, `padding_side="right"`, `model_input_names=["input_ids", "attention_mask"]` (no
        `token_type_ids`, which GPT-2 would add to its embeddings).
    """
    keywords = "|".join(KEYWORDS)
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[.?]"), behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            # A whole word that is a keyword stays one piece; any other word falls apart into characters.
            pre_tokenizers.Split(Regex(rf"^(?:{keywords})$|."), behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def answer_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """The ids of the answer tokens `("Yes", "No")`, e.g. `(7, 8)` with `build_tokenizer()`.

    Raises:
        `ValueError`: when `tokenizer` has no single token for an answer.
    """
    ids = tuple(tokenizer.convert_tokens_to_ids(answer) for answer in ANSWERS)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(
            f"`tokenizer` must have the tokens {', '.join(ANSWERS)}; got ids {ids}. Use `build_tokenizer()`."
        )
    return ids


def encode(rows: Iterable[dict], tokenizer: PreTrainedTokenizerFast) -> list[dict]:
    """Tokenize rows for training or evaluation, with the answer token as the label.

    Args:
        rows (`Iterable[dict]`): Rows of `generate_train` / `generate_eval` / `read_jsonl`.
        tokenizer (`PreTrainedTokenizerFast`): `build_tokenizer()` or its reloaded copy.

    Returns:
        `list[dict]`: Per row `{"input_ids": list[int], "label": int, "num_nodes": int, "set": str}`:
        `input_ids` is `instance_text(row)`, unpadded, ending with the `?` id (the position whose
        next-token logits are scored); `label` is the id of `row["label"]` (`answer_ids`).

    Raises:
        `ValueError`: a character outside the vocabulary (named, with the text), a text that does not
        end with `?`, or a label other than Yes/No.
    """
    rows = list(rows)
    texts = [instance_text(row) for row in rows]
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    label_ids = dict(zip(ANSWERS, answer_ids(tokenizer)))
    question_mark_id = tokenizer.convert_tokens_to_ids("?")
    encoded = []
    for index, (row, text, input_ids, offsets) in enumerate(
        zip(rows, texts, encodings["input_ids"], encodings["offset_mapping"])
    ):
        if tokenizer.unk_token_id in input_ids:
            start, end = offsets[input_ids.index(tokenizer.unk_token_id)]
            raise ValueError(
                f"`rows[{index}]` has the character {text[start:end]!r}, which is not in the tokenizer's vocabulary "
                f"(letters, digits, '.', '?'): {text!r}."
            )
        if not input_ids or input_ids[-1] != question_mark_id:
            raise ValueError(f"`rows[{index}]` must end with its question's '?': {text!r}.")
        if row["label"] not in label_ids:
            raise ValueError(f"`rows[{index}]['label']` must be one of {', '.join(ANSWERS)}; got {row['label']!r}.")
        encoded.append(
            {"input_ids": input_ids, "label": label_ids[row["label"]], "num_nodes": row["num_nodes"], "set": row["set"]}
        )
    return encoded
