"""BICO denoising in axiomatic training: premise-only masks, bidirectional reads, the step mix, resume, the saved model."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bico.axioms.denoising import denoising_loss, premise_labels, step_generator
from bico.axioms.generator import generate_train
from bico.axioms.models import build_model, collate, load_model
from bico.axioms.tokenizer import build_tokenizer, encode
from bico.axioms.training import AxiomConfig, train
from bico.collators import BicoCollator, choose_objective
from bico.patch import bidirectional, is_patched, patch_llama


TINY = dict(n_layer=1, n_head=2, n_embd=16, max_positions=64, num_instances=96, per_device_train_batch_size=16,
            learning_rate=3e-3, checkpointing_steps=0, cpu_threads=1, position_encoding="rope", architecture="llama")


class _OneProcess:
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return generate_train("TS2", 24, seed=3)


def test_premise_labels_are_the_premise_tokens(tokenizer, rows):
    batch = collate(encode(rows, tokenizer), tokenizer.pad_token_id)
    labels = premise_labels(batch["input_ids"], batch["attention_mask"], tokenizer.convert_tokens_to_ids("Does"))
    for row, row_labels in zip(rows, labels):
        premise_ids = tokenizer(row["premise"], add_special_tokens=False)["input_ids"]
        assert row_labels[row_labels != -100].tolist() == premise_ids  # the premise, in place, and nothing else
        assert (row_labels[: len(premise_ids)] != -100).all()


def test_masks_fall_on_the_premise_only_and_repeat_from_the_step(tokenizer, rows):
    batch = collate(encode(rows, tokenizer), tokenizer.pad_token_id)
    does_id = tokenizer.convert_tokens_to_ids("Does")
    labels = premise_labels(batch["input_ids"], batch["attention_mask"], does_id)
    collator = BicoCollator(tokenizer, mask_prob=0.3)
    masked = collator.mask_batch(batch["input_ids"], batch["attention_mask"], labels, [step_generator(0, 5, 0, 0)] * len(rows))
    again = collator.mask_batch(batch["input_ids"], batch["attention_mask"], labels, [step_generator(0, 5, 0, 0)] * len(rows))
    other = collator.mask_batch(batch["input_ids"], batch["attention_mask"], labels, [step_generator(0, 6, 0, 0)] * len(rows))
    hits = masked["labels"] != -100
    assert torch.equal(masked["input_ids"], again["input_ids"]) and not torch.equal(masked["input_ids"], other["input_ids"])
    assert (hits.sum(dim=1) >= 1).all() and not hits[:, 0].any()
    assert (labels[hits] != -100).all()  # never a question token
    assert torch.equal(masked["labels"][hits], batch["input_ids"][hits])
    assert (masked["input_ids"][hits] == tokenizer.pad_token_id).all() and (masked["attention_mask"][hits] == 0).all()
    assert 0.2 < hits.sum() / (labels != -100).sum() < 0.4


def test_a_masked_token_is_read_from_the_tokens_after_it(tokenizer, rows):
    # Bidirectional mode: the prediction of a masked premise token depends on the premise after it;
    # the causal model's does not.
    model = patch_llama(build_model("rope", len(tokenizer), n_layer=2, n_head=2, n_embd=16, max_positions=64,
                                    pad_token_id=0, seed=0, architecture="llama")).eval()
    batch = collate(encode(rows[:1], tokenizer), tokenizer.pad_token_id)
    input_ids, attention_mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    input_ids[0, 2], attention_mask[0, 2] = tokenizer.pad_token_id, 0  # a placeholder at 2, read from output 1
    changed = input_ids.clone()
    changed[0, 5] = tokenizer.convert_tokens_to_ids("Q") if changed[0, 5] != tokenizer.convert_tokens_to_ids("Q") else 4
    with torch.no_grad():
        with bidirectional(model):
            before = model(input_ids=input_ids, attention_mask=attention_mask).logits[0, 1]
            after = model(input_ids=changed, attention_mask=attention_mask).logits[0, 1]
        causal_before = model(input_ids=input_ids).logits[0, 1]
        causal_after = model(input_ids=changed).logits[0, 1]
    assert not torch.allclose(before, after)
    assert torch.equal(causal_before, causal_after)


def test_denoising_loss_is_the_mean_cross_entropy_of_the_masked_tokens(tokenizer, rows):
    model = patch_llama(build_model("rope", len(tokenizer), n_layer=1, n_head=2, n_embd=16, max_positions=64,
                                    pad_token_id=0, seed=0, architecture="llama"))
    batch = collate(encode(rows[:6], tokenizer), tokenizer.pad_token_id)
    does_id = tokenizer.convert_tokens_to_ids("Does")
    collator = BicoCollator(tokenizer, mask_prob=0.3)
    loss = denoising_loss(model, batch, _OneProcess(), collator, does_id, step_generator(1, 0, 0, 0))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    masked = collator.mask_batch(batch["input_ids"], batch["attention_mask"],
                                 premise_labels(batch["input_ids"], batch["attention_mask"], does_id), [step_generator(1, 0, 0, 0)] * 6)
    with torch.no_grad(), bidirectional(model):  # the model's own shifted loss, as a second computation
        expected = model(input_ids=masked["input_ids"], attention_mask=masked["attention_mask"], labels=masked["labels"]).loss
    torch.testing.assert_close(loss.detach(), expected)


def test_training_mixes_bico_steps_resumes_exactly_and_saves_the_causal_llama(tmp_path):
    options = dict(max_steps=6, bico_prob=0.5, checkpointing_steps=3, checkpoints_total_limit=None)
    full = train(AxiomConfig(**{**TINY, **options, "output_dir": str(tmp_path / "full")}))
    objectives = [choose_objective(0, step, 0.5) for step in range(6)]
    assert set(objectives) == {"bico", "ntp"} and len(full["losses"]) == 6
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "resumed" / "checkpoints" / "step_3")
    resumed = train(AxiomConfig(**{**TINY, **options, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": "latest"}))
    assert resumed["losses"] == full["losses"][3:]
    full_weights = load_file(Path(tmp_path / "full" / "final" / "model.safetensors"))
    resumed_weights = load_file(Path(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(full_weights[key], resumed_weights[key]) for key in full_weights)
    plain = train(AxiomConfig(**{**TINY, "max_steps": 6, "output_dir": str(tmp_path / "plain")}))
    # The answer steps of both runs start alike; the BICO steps make the difference.
    assert plain["losses"][0] == full["losses"][0] and objectives[0] == "ntp"
    assert plain["losses"] != full["losses"]
    model = load_model(tmp_path / "full" / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and not is_patched(model)
    assert model.config.bico_position_encoding == "rope"


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="needs `architecture` llama"):
        AxiomConfig(position_encoding="rope", bico_prob=0.5)
    with pytest.raises(ValueError, match="llama has RoPE only"):
        AxiomConfig(position_encoding="none", architecture="llama")
    with pytest.raises(ValueError, match="`architecture` must be one of gpt, llama; got 'mamba'"):
        AxiomConfig(architecture="mamba")
    with pytest.raises(ValueError, match="`bico_prob` must be in"):
        AxiomConfig(position_encoding="rope", architecture="llama", bico_prob=1.5)
