"""A pre-trained causal LM asked the transitivity questions zero-shot: prompts, answers, batching, the CLI."""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from bico.axioms.cli import main
from bico.axioms.generator import generate_eval, write_jsonl
from bico.axioms.zero_shot import answer_tokens, encode_prompts, evaluate_zero_shot, prompt_text

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def rows():
    return generate_eval("reversed", 10, seed=0) + generate_eval("length-sequential", 8, seed=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def brute_force(model, tokenizer, rows) -> list[bool]:
    """Right or wrong per row, from one unpadded full forward per row."""
    prefix = "" if tokenizer.chat_template else " "
    yes_ids, no_ids = (tokenizer(prefix + answer, add_special_tokens=False)["input_ids"] for answer in ("Yes", "No"))
    shared = next(i for i, (a, b) in enumerate(zip(yes_ids, no_ids)) if a != b)
    yes, no = yes_ids[shared], no_ids[shared]
    right = []
    for row in rows:
        prompt = tokenizer(prompt_text(row, tokenizer), add_special_tokens=not tokenizer.chat_template)["input_ids"]
        ids = torch.tensor([prompt + yes_ids[:shared]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        right.append(("Yes" if logits[yes] > logits[no] else "No") == row["label"])
    return right


@pytest.mark.parametrize("chat", [False, True])
def test_answers_match_one_unpadded_forward_per_row_in_any_batch(model_and_tokenizer, rows, chat):
    model, tokenizer = model_and_tokenizer
    if chat:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE
    right = brute_force(model, tokenizer, rows)
    assert 0 < sum(right) < len(rows)  # a random model: both outcomes occur, so a wrong pairing would show
    for batch_size in (1, 4, 64):
        results = evaluate_zero_shot(model, tokenizer, rows, batch_size)
        assert results["count"] == len(rows) and results["accuracy"] == pytest.approx(sum(right) / len(rows))
        assert results["sets"]["reversed"]["accuracy"] == pytest.approx(sum(right[:10]) / 10)
        lengths = results["sets"]["length-sequential"]["by_num_nodes"]
        assert sum(v["count"] for v in lengths.values()) == 8


def test_prompt_and_answer_tokens_with_and_without_a_chat_template(tiny_tokenizer, rows):
    plain = tiny_tokenizer
    assert prompt_text(rows[0], plain).endswith("? Answer with Yes or No.\nAnswer:")
    shared, (yes, no) = answer_tokens(plain)
    assert yes != no and plain.decode(shared) in ("", " ")  # the tiny BPE splits " Yes" as " ", "Y", "es"
    assert " Yes".startswith(plain.decode(shared + [yes])) and " No".startswith(plain.decode(shared + [no]))
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    text = prompt_text(rows[0], chat)
    assert text.startswith("<user>" + rows[0]["premise"]) and text.endswith("Answer with Yes or No.\n<assistant>")
    shared, answers = answer_tokens(chat)
    assert shared == [] and "Yes".startswith(chat.decode([answers[0]])) and "No".startswith(chat.decode([answers[1]]))
    examples = encode_prompts(rows, chat)
    assert [example["label"] for example in examples] == [answers[row["label"] == "No"] for row in rows]
    assert all(example["input_ids"][len(example["input_ids"]) - len(shared):] == shared for example in examples)
    with pytest.raises(ValueError, match="must be one of Yes, No; got 'maybe'"):
        encode_prompts([{**rows[0], "label": "maybe"}], chat)


def test_smollm2_chat_prompt_answers_are_distinct_single_tokens(smollm2_tokenizer, rows):
    text = prompt_text(rows[0], smollm2_tokenizer)
    assert text.rstrip().endswith("<|im_start|>assistant") and rows[0]["question"] in text
    shared, (yes, no) = answer_tokens(smollm2_tokenizer)
    assert shared == [] and smollm2_tokenizer.decode([yes]) == "Yes" and smollm2_tokenizer.decode([no]) == "No"


def test_cli_eval_pretrained_writes_a_zero_shot_column(capsys, tiny_model_dir, rows, tmp_path):
    data_dir = tmp_path / "data"
    for name in ("reversed", "length-sequential"):
        write_jsonl([row for row in rows if row["set"] == name], data_dir / f"{name}.jsonl")
    assert main(["eval", "--pretrained", str(tiny_model_dir), "--data_dir", str(data_dir), "--sets", "reversed",
                 "length-sequential", "--output_dir", str(tmp_path / "out"), "--no_plot"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (label,) = results
    assert label == f"{tiny_model_dir.name} (zero-shot)" and results[label]["count"] == len(rows)
    capsys.readouterr()
    assert main(["eval", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "r")]) == 2
    assert "give at least one --model" in capsys.readouterr().err
