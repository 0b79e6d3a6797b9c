"""Axiomatic training: options, the answer-only loss, a short run, exact resume, training files, 2 processes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bico.axioms.evaluation import evaluate
from bico.axioms.generator import write_jsonl
from bico.axioms.models import build_model, collate, load_model, sinusoidal_table
from bico.axioms.tokenizer import answer_ids, build_tokenizer, encode
from bico.axioms.training import AxiomConfig, answer_loss, generate_split, parse_axiom_config, train


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=1, n_head=2, n_embd=16, max_positions=64, num_instances=96, per_device_train_batch_size=16,
            learning_rate=3e-3, checkpointing_steps=0, cpu_threads=1)


def _config(tmp_path, name="run", **overrides) -> AxiomConfig:
    return AxiomConfig(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "final" / "model.safetensors")


class _OneProcess:
    """What `answer_loss` asks of an Accelerator, for one process."""

    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def test_defaults_yaml_then_flags(tmp_path):
    assert parse_axiom_config([]) == AxiomConfig()
    assert AxiomConfig(position_encoding="rope").output_dir == "outputs/axioms/rope"
    config_file = tmp_path / "axioms.yaml"
    config_file.write_text(yaml.safe_dump({"position_encoding": "learned", "n_layer": 2, "learning_rate": 1e-4, "seed": 3}))
    config = parse_axiom_config(["--config", str(config_file), "--seed", "5", "--max_steps", "none", "--train_file", "x.jsonl"])
    assert (config.position_encoding, config.n_layer, config.learning_rate) == ("learned", 2, 1e-4)  # from the file
    assert (config.seed, config.max_steps, config.train_file) == (5, None, "x.jsonl")  # flags win


@pytest.mark.parametrize("name", ["axioms_cpu", "axioms_paper"])
def test_shipped_configs_load(name):
    config = parse_axiom_config(["--config", str(REPO_ROOT / "configs" / f"{name}.yaml")])
    assert config.mix == "TS2"
    if name == "axioms_cpu":  # the defaults (the paper's loss) plus what the CPU run needed to learn
        assert config == dataclasses.replace(AxiomConfig(), cpu_threads=1, premise_lm_weight=1.0, per_device_train_batch_size=32,
                                             max_steps=20_000, warmup_steps=200, checkpointing_steps=1000)
    if name == "axioms_paper":
        assert (config.n_layer, config.n_head, config.n_embd, config.per_device_train_batch_size) == (12, 8, 512, 128)
        assert (config.learning_rate, config.num_train_epochs, config.mixed_precision) == (1e-4, 100, "bf16")


def test_bad_options_name_the_field_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match="`position_encoding` must be one of none, learned, sinusoidal, rope; got 'alibi'"):
        AxiomConfig(position_encoding="alibi")
    with pytest.raises(ValueError, match="`mix` must be one of TS1, TS2, OCC; got 'TS3'"):
        AxiomConfig(mix="TS3")
    with pytest.raises(ValueError, match="`n_layer` must be positive, got 0"):
        AxiomConfig(n_layer=0)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("n_layers: 2\n")
    with pytest.raises(ValueError, match="unknown field `n_layers`"):
        parse_axiom_config(["--config", str(bad_yaml)])


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def _tiny_batch_and_model(encoding: str, seed: int):
    """Six TS2 rows as one padded batch, a 1-layer model with `encoding`, and the Yes/No ids."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    rows, _ = generate_split("TS2", 6, seed=seed, eval_instances=2)
    batch = collate(encode(rows, tokenizer), tokenizer.pad_token_id)
    model = build_model(encoding, len(tokenizer), n_layer=1, n_head=2, n_embd=16, max_positions=64, pad_token_id=0, seed=0)
    return batch, model, torch.tensor(answer_ids(tokenizer))


def test_loss_is_only_the_answer_at_the_last_real_position():
    batch, model, answers = _tiny_batch_and_model("learned", seed=1)
    seen = {}

    def keep_logits(module, args, output):
        output.logits.retain_grad()
        seen["logits"] = output.logits

    model.register_forward_hook(keep_logits)
    loss, correct = answer_loss(model, batch, _OneProcess(), answers)
    loss.backward()
    logits, grad = seen["logits"], seen["logits"].grad  # (B, L, V)
    last = batch["attention_mask"].sum(dim=1) - 1
    at_answer = torch.zeros(grad.shape[:2], dtype=torch.bool)
    at_answer[torch.arange(len(last)), last] = True
    assert grad[~at_answer].abs().max() == 0  # no loss anywhere else, padding included
    assert (grad[at_answer].abs().sum(dim=-1) > 0).all()
    rows_logits = logits[torch.arange(len(last)), last]  # (B, V)
    expected = torch.nn.functional.cross_entropy(rows_logits, batch["answer_ids"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    predicted = answers[rows_logits[:, answers].argmax(dim=-1)]
    assert correct.item() == (predicted == batch["answer_ids"]).sum().item()
    # More right padding changes nothing: a pad column appended to the batch.
    padded = {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, 3), value=0),
              "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 3), value=0),
              "answer_ids": batch["answer_ids"]}
    assert answer_loss(model, padded, _OneProcess(), answers)[0].item() == pytest.approx(loss.item(), abs=1e-6)



def test_premise_lm_weight_adds_the_mean_next_token_loss_of_the_real_tokens():
    batch, model, answers = _tiny_batch_and_model("none", seed=2)
    plain, _ = answer_loss(model, batch, _OneProcess(), answers)
    weighted, _ = answer_loss(model, batch, _OneProcess(), answers, premise_lm_weight=0.5)
    # Independent: every (row, t) with tokens t and t+1 both real, token t+1 predicted from position t.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    terms = []
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        for t in range(length - 1):
            terms.append(-torch.log_softmax(logits[row, t], dim=-1)[batch["input_ids"][row, t + 1]])
    expected_lm = torch.stack(terms).mean()
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * expected_lm.item(), rel=1e-5)
    assert weighted.item() > plain.item() + 0.5  # the next-token loss of an untrained model is large
    with pytest.raises(ValueError, match="premise_lm_weight"):
        AxiomConfig(premise_lm_weight=-1.0)

# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def test_train_memorises_and_saves_a_model_that_evaluates_alike(tmp_path):
    config = _config(tmp_path, position_encoding="sinusoidal", n_embd=32, num_instances=16, max_steps=60, learning_rate=1e-2,
                     lr_scheduler_type="constant")
    result = train(config)
    assert result["global_step"] == 60 and len(result["losses"]) == 60
    assert result["losses"][-1] < 0.05 and result["accuracy"] == 1.0, result["losses"]  # the answers, not just the Yes/No prior
    assert result["rows_seen"] == 60 * 16 and result["num_rows"] == 16
    run = Path(config.output_dir)
    model = load_model(run / "final")
    assert model.config.bico_position_encoding == "sinusoidal"
    assert torch.equal(model.transformer.wpe.weight, sinusoidal_table(64, 32).float())  # frozen all along
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    rows, _ = generate_split("TS2", 16, seed=0, eval_instances=500)
    assert evaluate(model, tokenizer, rows)["accuracy"] == 1.0  # evaluation reads the answer where training taught it
    assert yaml.safe_load((run / "train_config.yaml").read_text())["position_encoding"] == "sinusoidal"


def test_resume_equals_uninterrupted_run(tmp_path):
    # 96 rows / batch 16 = 6 batches per epoch, accumulation 2: 3 steps per epoch; the checkpoint at
    # step 4 sits in the middle of the second epoch. Dropout is on, so the RNG has to resume too.
    options = dict(position_encoding="rope", max_steps=7, gradient_accumulation_steps=2, checkpointing_steps=4,
                   checkpoints_total_limit=None, dropout=0.1)
    full = train(_config(tmp_path, "full", **options))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", tmp_path / "resumed" / "checkpoints" / "step_4")
    resumed = train(_config(tmp_path, "resumed", resume_from_checkpoint="latest", **options))
    assert resumed["global_step"] == 7 and resumed["losses"] == full["losses"][4:]
    full_weights, resumed_weights = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(full_weights[key], resumed_weights[key]) for key in full_weights)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_config(tmp_path, "full", **options))


def test_training_file_equals_generated_rows_and_bad_lines_are_named(tmp_path):
    train_rows, _ = generate_split("TS2", 96, seed=0)
    write_jsonl(train_rows, tmp_path / "train.jsonl")
    from_file = train(_config(tmp_path, "file", train_file=str(tmp_path / "train.jsonl"), max_steps=2))
    generated = train(_config(tmp_path, "generated", max_steps=2))
    assert from_file["losses"] == generated["losses"]
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"label": "', '"label": "Maybe')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:5: "):
        train(_config(tmp_path, "bad", train_file=str(tmp_path / "bad.jsonl"), max_steps=2))


def test_max_positions_shorter_than_the_data_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="`max_positions` 16 is shorter than the longest training row"):
        train(_config(tmp_path, position_encoding="learned", max_positions=16, max_steps=2))


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, free_port):
    """`accelerate launch -m bico.axioms.cli train` over 2 gloo processes x batch 8 = 1 process x batch 16."""
    options = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_positions", "64", "--num_instances", "96",
               "--learning_rate", "3e-3", "--checkpointing_steps", "0", "--max_steps", "6", "--position_encoding", "none"]
    single = train(parse_axiom_config(options + ["--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one")]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port), "-m", "bico.axioms.cli", "train", *options,
               "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "two")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 process(es) x batch 8" in completed.stdout
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 6 and summary["loss"] == pytest.approx(single["loss"], abs=1e-5)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((one[key] - two[key]).abs().max().item() for key in one) < 1e-5
