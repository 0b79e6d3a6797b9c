"""The four positional encodings: what each model can see of order, frozen tables, save/load, batches."""

import pytest
import torch

from bico.axioms.models import (
    POSITION_ENCODINGS, build_model, check_vocabulary, collate, last_position_logits, load_model, neox_config,
    read_position_encoding, sinusoidal_table,
)
from bico.axioms.tokenizer import build_tokenizer, encode
from bico.training import make_optimizer


VOCAB_SIZE = 71
TINY = dict(n_head=2, n_embd=16, max_positions=32, pad_token_id=0)


def _model(encoding, n_layer=1, seed=0):
    return build_model(encoding, VOCAB_SIZE, n_layer=n_layer, seed=seed, **TINY).double().eval()


def _last_output(model, input_ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids).logits[:, -1]  # (B, V)


def _permuted_prefix(seed=0, length=12):
    """A random row and the same row with every token but the last permuted."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB_SIZE, (1, length), generator=generator)
    order = torch.randperm(length - 1, generator=generator)
    return input_ids, torch.cat([input_ids[:, :-1][:, order], input_ids[:, -1:]], dim=1)


@pytest.mark.parametrize("encoding", POSITION_ENCODINGS)
def test_only_none_ignores_order_in_one_layer(encoding):
    torch.manual_seed(0)
    model = _model(encoding)
    input_ids, permuted = _permuted_prefix()
    difference = (_last_output(model, input_ids) - _last_output(model, permuted)).abs().max().item()
    if encoding == "none":
        assert difference < 1e-12
    else:
        assert difference > 1e-8  # small at initialisation (near-uniform attention), yet far from float64 noise


def test_none_sees_order_through_the_causal_mask_from_two_layers_on():
    # The docstring's argument: depth plus the causal mask recover order, so invariance is a one-layer property.
    input_ids, permuted = _permuted_prefix()
    model = _model("none", n_layer=2)
    assert (_last_output(model, input_ids) - _last_output(model, permuted)).abs().max().item() > 1e-8


@pytest.mark.parametrize("n_layer", [1, 3])
def test_none_ignores_position_ids_at_any_depth_others_do_not(n_layer):
    input_ids = torch.randint(2, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(1))
    shifted = torch.arange(10)[None].expand(2, -1) + 7  # (B, L)
    for encoding in POSITION_ENCODINGS:
        model = _model(encoding, n_layer=n_layer)
        difference = (_last_output(model, input_ids) - _last_output(model, input_ids, shifted)).abs().max().item()
        if encoding == "none":
            assert difference < 1e-12
        elif encoding == "rope":  # relative: a shift of every position changes nothing either
            assert difference < 1e-10
            reordered = torch.randperm(10, generator=torch.Generator().manual_seed(0))[None].expand(2, -1)
            assert (_last_output(model, input_ids) - _last_output(model, input_ids, reordered)).abs().max().item() > 1e-8
        else:
            assert difference > 1e-8, encoding


def test_neox_without_rotary_dims_is_also_blind_to_order():
    """GPT-NeoX with rotary_pct=0.0, the other NoPE of DESIGN.md section 9: the same invariance as `none`."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(neox_config(VOCAB_SIZE, n_layer=1, rotary_pct=0.0, **TINY)).double().eval()
    input_ids, permuted = _permuted_prefix(seed=3)
    assert (_last_output(model, input_ids) - _last_output(model, permuted)).abs().max().item() < 1e-12


def test_models_differ_only_in_the_position_encoding():
    sizes = {}
    for encoding in POSITION_ENCODINGS:
        model = build_model(encoding, VOCAB_SIZE, n_layer=2, seed=0, **TINY)
        assert read_position_encoding(model) == encoding
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sizes[encoding] = trainable
    table = TINY["max_positions"] * TINY["n_embd"]
    assert sizes["learned"] == sizes["none"] + table == sizes["sinusoidal"] + table
    assert sizes["rope"] == sizes["none"]  # NeoX matches GPT-2's blocks parameter for parameter
    assert torch.equal(build_model("none", VOCAB_SIZE, n_layer=1, seed=4, **TINY).lm_head.weight,
                       build_model("none", VOCAB_SIZE, n_layer=1, seed=4, **TINY).lm_head.weight)  # seeded


def test_unknown_encoding_lists_the_valid_ones():
    with pytest.raises(ValueError, match="`position_encoding` must be one of none, learned, sinusoidal, rope; got 'alibi'"):
        build_model("alibi", VOCAB_SIZE, n_layer=1, seed=0, **TINY)
    with pytest.raises(ValueError, match="`n_embd` 16 must split into `n_head` 3"):
        build_model("none", VOCAB_SIZE, n_layer=1, seed=0, **{**TINY, "n_head": 3})


def test_sinusoidal_table_values():
    table = sinusoidal_table(5, 4)
    assert table.shape == (5, 4) and table.dtype == torch.float64
    assert torch.equal(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert table[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0, dtype=torch.float64)).item(), abs=1e-15)
    assert table[3, 3].item() == pytest.approx(torch.cos(torch.tensor(3.0 / 100.0, dtype=torch.float64)).item(), abs=1e-15)


@pytest.mark.parametrize("encoding", ["none", "sinusoidal"])
def test_fixed_tables_stay_frozen_and_exact_through_training_and_save_load(tmp_path, encoding):
    model = build_model(encoding, VOCAB_SIZE, n_layer=1, seed=0, **TINY)
    wpe = model.transformer.wpe.weight
    expected = sinusoidal_table(TINY["max_positions"], TINY["n_embd"]).float() if encoding == "sinusoidal" else torch.zeros_like(wpe)
    assert not wpe.requires_grad and torch.equal(wpe, expected)
    optimizer = make_optimizer(model, type("Config", (), {"learning_rate": 1e-2, "weight_decay": 0.5})())
    assert all(p is not wpe for group in optimizer.param_groups for p in group["params"])  # no step, no decay
    for _ in range(3):
        loss = model(input_ids=torch.randint(2, VOCAB_SIZE, (4, 9)), labels=torch.randint(2, VOCAB_SIZE, (4, 9))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.transformer.wpe.weight, expected)

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert read_position_encoding(loaded) == encoding
    assert not loaded.transformer.wpe.weight.requires_grad and torch.equal(loaded.transformer.wpe.weight, expected)
    assert loaded.transformer.h[0].attn.c_attn.weight.requires_grad  # only the table is frozen


def test_load_model_refuses_a_trained_fixed_table_and_non_axiom_models(tmp_path):
    model = build_model("sinusoidal", VOCAB_SIZE, n_layer=1, seed=0, **TINY)
    with torch.no_grad():
        model.transformer.wpe.weight[3, 2] += 1e-3
    model.save_pretrained(tmp_path / "drifted")
    with pytest.raises(ValueError, match="frozen `sinusoidal` position table differs"):
        load_model(tmp_path / "drifted")
    model = build_model("rope", VOCAB_SIZE, n_layer=1, seed=0, **TINY)
    del model.config.bico_position_encoding
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no valid `bico_position_encoding`"):
        load_model(tmp_path / "plain")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "missing")


def test_rope_save_load_round_trip(tmp_path):
    model = build_model("rope", VOCAB_SIZE, n_layer=1, seed=0, **TINY).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    input_ids = torch.randint(2, VOCAB_SIZE, (2, 7))
    assert torch.equal(_last_output(model, input_ids), _last_output(loaded, input_ids))
    assert loaded.config.rope_parameters["partial_rotary_factor"] == 1.0


def test_vocabulary_mismatch_is_one_line():
    tokenizer = build_tokenizer()
    check_vocabulary(build_model("learned", len(tokenizer), n_layer=1, seed=0, **TINY), tokenizer)
    with pytest.raises(ValueError, match=r"^the tokenizer has 71 tokens but the model's vocabulary has 80 [^\n]*$"):
        check_vocabulary(build_model("learned", 80, n_layer=1, seed=0, **TINY), tokenizer)
    with pytest.raises(ValueError, match="pad id 0 differs from the model's 5"):
        check_vocabulary(build_model("learned", 71, n_layer=1, seed=0, **{**TINY, "pad_token_id": 5}), tokenizer)


def test_the_answer_is_read_at_the_last_real_position_whatever_the_padding():
    tokenizer = build_tokenizer()
    rows = [{"premise": "A causes B. B causes CD.", "question": "Does A cause CD?", "label": "Yes", "set": "t", "num_nodes": 3},
            {"premise": "x causes y.", "question": "Does y cause x?", "label": "No", "set": "t", "num_nodes": 2}]
    examples = encode(rows, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert (batch["input_ids"][1, lengths[1]:] == tokenizer.pad_token_id).all()
    assert batch["answer_ids"].tolist() == [e["label"] for e in examples]
    model = _model("learned", n_layer=2)
    logits = last_position_logits(model, batch["input_ids"], batch["attention_mask"])  # (B, V)
    for i, example in enumerate(examples):
        alone = _last_output(model, torch.tensor([example["input_ids"]]))
        assert (logits[i] - alone[0]).abs().max().item() < 1e-12
