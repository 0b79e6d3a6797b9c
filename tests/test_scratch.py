import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bico.scratch import build_scratch_model, small_llama_config, train_tokenizer


TEXTS = [
    f"{first} {last} wrote {work}." for first in ["Ada", "Bo", "Cyd"] for last in ["Orr", "Pim"] for work in ["a song", "a map"]
]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


def test_special_token_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.padding_side == "right"
    assert len(tok) == 300


def test_bos_only_and_round_trip(tiny_tokenizer):
    text = "Zyx Qwerty, the maker of \"Odd Things.\" — café 42"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.eos_token_id not in ids
    assert tiny_tokenizer.bos_token_id not in ids[1:]
    # Byte-level: any text, accents and dashes included, survives a round trip; no <unk>.
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tiny_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_right_padding_uses_pad_id(tiny_tokenizer):
    batch = tiny_tokenizer(["a", "a much longer line of text"], padding=True)
    short, long_ = batch["input_ids"]
    n = sum(batch["attention_mask"][0])
    assert len(short) == len(long_) > n
    assert short[n:] == [0] * (len(short) - n)
    assert batch["attention_mask"][0][n:] == [0] * (len(short) - n)


def test_vocab_size_bounds():
    assert len(train_tokenizer(TEXTS, vocab_size=270)) == 270
    # The text runs out of merges long before 4096.
    assert len(train_tokenizer(TEXTS, vocab_size=4096)) < 4096
    with pytest.raises(ValueError, match="`vocab_size`"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="`texts`"):
        train_tokenizer([], vocab_size=300)


def test_tokenizer_deterministic_across_processes(tmp_path):
    # Rust hash maps are seeded per process, so compare two separate processes, not two calls.
    code = (
        "import json, sys; from bico.scratch import train_tokenizer; "
        "texts = json.load(open(sys.argv[1])); "
        "print(train_tokenizer(texts, vocab_size=280).backend_tokenizer.to_str())"
    )
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(TEXTS))
    other_process = subprocess.run(
        [sys.executable, "-c", code, str(texts_file)], capture_output=True, text=True, check=True
    ).stdout
    this_process = train_tokenizer(TEXTS, vocab_size=280).backend_tokenizer.to_str()
    assert other_process == this_process + "\n"
    assert this_process == train_tokenizer(TEXTS, vocab_size=280).backend_tokenizer.to_str()


def test_small_llama_config_matches_tokenizer(tiny_tokenizer):
    config = small_llama_config(tiny_tokenizer, rope_theta=500.0)
    assert config.vocab_size == len(tiny_tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (4, 688, 512)


def test_default_model_size():
    # DESIGN.md section 6: ~4.5M parameters with a ~2.7k vocabulary.
    tok = train_tokenizer(TEXTS, vocab_size=2700)
    config = small_llama_config(tok, vocab_size=2700)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.0e6 < n_params < 5.0e6


def test_build_scratch_model_round_trip(tmp_path):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    out = build_scratch_model(TEXTS, tmp_path / "m1", seed=7, vocab_size=280, **TINY)
    # The caller's RNG is left untouched.
    assert torch.equal(torch.rand(3), before)
    assert out == tmp_path / "m1"
    build_scratch_model(TEXTS, tmp_path / "m2", seed=7, vocab_size=280, **TINY)
    build_scratch_model(TEXTS, tmp_path / "m3", seed=8, vocab_size=280, **TINY)

    tok = AutoTokenizer.from_pretrained(out)
    m1, m2, m3 = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("m1", "m2", "m3"))
    assert isinstance(m1, LlamaForCausalLM)
    assert m1.config.hidden_size == 32 and m1.config.vocab_size == len(tok) == 280
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("Ada")["input_ids"][0] == 1
    w1, w2, w3 = (m.model.embed_tokens.weight for m in (m1, m2, m3))
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, w3)
    ids = torch.tensor([tok("Ada Orr wrote")["input_ids"]])
    assert m1(ids).logits.shape == (1, ids.shape[1], 280)


def test_tiny_model_dir_fixture(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 64, 300)
    assert config.pad_token_id == tok.pad_token_id == 0
