import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bico.axioms.generator import EVAL_SETS, generate_eval, generate_train, instance_text
from bico.axioms.tokenizer import ANSWERS, answer_ids, build_tokenizer, encode


KEYWORDS = {"causes", "cause", "Does", "Yes", "No"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return generate_train("TS1", 60, seed=1) + [row for name in EVAL_SETS for row in generate_eval(name, 20, seed=1)]


def expected_tokens(text):
    # The rule written out by hand: . and ? alone, keywords whole, any other word letter by letter.
    tokens = []
    for word in text.replace(".", " . ").replace("?", " ? ").split():
        tokens += [word] if word in KEYWORDS | {".", "?"} else list(word)
    return tokens


def test_vocabulary(tokenizer):
    assert len(tokenizer) == 71
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 1)
    assert tokenizer.bos_token is None and tokenizer.eos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer("EX causes T.")["input_ids"] == [23, 42, 4, 38, 2]
    tokens = tokenizer.tokenize("No causes Now. Does causesX cause 9? Yes")
    assert tokens == ["No", "causes", "N", "o", "w", ".", "Does", *"causesX", "cause", "9", "?", "Yes"]


def test_every_set_tokenizes_by_the_rule(tokenizer, rows):
    for row in rows:
        text = instance_text(row)
        assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == expected_tokens(text)


def test_save_and_reload_give_identical_encodings(tmp_path, tokenizer, rows):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [instance_text(row) for row in rows] + ["Noé x_y?"]
    assert reloaded(texts, padding=True) == tokenizer(texts, padding=True)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.pad_token_id, reloaded.unk_token_id, reloaded.padding_side) == (0, 1, "right")
    assert reloaded.model_input_names == ["input_ids", "attention_mask"]
    assert encode(rows, reloaded) == encode(rows, tokenizer)


def test_encode(tokenizer, rows):
    yes, no = answer_ids(tokenizer)
    assert (yes, no) == tuple(tokenizer.convert_tokens_to_ids(list(ANSWERS))) and yes != no
    encoded = encode(rows, tokenizer)
    assert len(encoded) == len(rows)
    for row, item in zip(rows, encoded):
        assert set(item) == {"input_ids", "label", "num_nodes", "set"}
        assert item["input_ids"] == tokenizer(instance_text(row))["input_ids"]  # no BOS, no EOS, no padding
        assert tokenizer.convert_ids_to_tokens(item["input_ids"][-1]) == "?"
        assert item["label"] == (yes if row["label"] == "Yes" else no)
        assert (item["num_nodes"], item["set"]) == (row["num_nodes"], row["set"])
        assert yes not in item["input_ids"] and no not in item["input_ids"]  # the answer is never in the input


@pytest.mark.parametrize("character", ["é", "_", "-"])
def test_unseen_character_is_unk_and_encode_names_it(tokenizer, character):
    row = generate_eval("reversed", 2)[0]
    text = instance_text(row)
    row = {**row, "premise": row["premise"].replace(" causes ", f"{character} causes ", 1)}
    assert tokenizer.unk_token_id in tokenizer(instance_text(row))["input_ids"]
    with pytest.raises(ValueError) as info:
        encode([row], tokenizer)
    message = str(info.value)
    assert f"character {character!r}" in message and repr(instance_text(row)) in message and text != instance_text(row)


def test_encode_rejects_bad_rows_and_tokenizers(tokenizer):
    row = generate_eval("reversed", 2)[0]
    with pytest.raises(ValueError, match="must end with its question's '\\?'"):
        encode([{**row, "question": row["question"][:-1]}], tokenizer)
    with pytest.raises(ValueError, match="`rows\\[0\\]\\['label'\\]` must be one of Yes, No; got 'yes'"):
        encode([{**row, "label": "yes"}], tokenizer)
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "Yes": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="`tokenizer` must have the tokens Yes, No"):
        answer_ids(other)
