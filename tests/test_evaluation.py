import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import bico
from bico.data import TASKS, DataError
from bico.scratch import small_llama_config
from bico.decoding import generate_answers, score_answers
from bico.evaluation import METRICS, evaluate, format_table, write_predictions, write_results


ROWS_PER_FILE = 40  # 4 people x 10 templates in the committed data


def write_subset(source_dir, target_dir, rows_per_file=ROWS_PER_FILE):
    """Copy the first `rows_per_file` rows of every test and randomized file."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS.values():
        for name in (task.file, task.randomized_file):
            if name is not None:
                lines = (source_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
                (target_dir / name).write_text("".join(lines[:rows_per_file]), encoding="utf-8")
    return target_dir


def train_tiny_model(tokenizer, texts, output_dir, steps=150, seed=0):
    """A tiny Llama trained with plain next-token prediction on `texts` (BOS + text + EOS), saved with its tokenizer."""
    torch.manual_seed(seed)
    config = small_llama_config(
        tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return loss.item()


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory, data_dir):
    return write_subset(data_dir, tmp_path_factory.mktemp("subset"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer, data_dir):
    """A tiny model that memorised 4 rows of n2d-reverse (4 people), and a data dir holding just those rows."""
    rows = [json.loads(line) for line in (data_dir / TASKS["n2d-reverse"].file).read_text().splitlines()][:40:10]
    randomized = [json.loads(line) for line in (data_dir / TASKS["n2d-reverse"].randomized_file).read_text().splitlines()][:40:10]
    trained_data = tmp_path_factory.mktemp("trained_data")
    for name, file_rows in ((TASKS["n2d-reverse"].file, rows), (TASKS["n2d-reverse"].randomized_file, randomized)):
        (trained_data / name).write_text("".join(json.dumps(row) + "\n" for row in file_rows))
    model_dir = tmp_path_factory.mktemp("trained_model")
    loss = train_tiny_model(tiny_tokenizer, [row["prompt"] + row["completion"] for row in rows], model_dir)
    assert loss < 0.1
    return model_dir, trained_data, rows


def full_forward_score(model, tokenizer, prompt, completion):
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


def test_score_answers_matches_full_forward(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = ["Believe it or not, Petronel Sandoval is", "Who", "The plaque outside the house of Nikolai Trelawny says they"]
    candidates = [
        [" the astronomer who found Tessaly.", " x", ""],
        [" Petronel Sandoval", " a much longer answer than the others, with commas", " b"],
        [" published a novel."],
    ]
    # max_pairs=2 splits the 7 pairs over several passes, each with a different mix of prompts.
    scores = score_answers(model, tokenizer, prompts, candidates, max_pairs=2)
    assert [len(s) for s in scores] == [3, 3, 1]
    for prompt, answers, answer_scores in zip(prompts, candidates, scores):
        for answer, score in zip(answers, answer_scores):
            assert score == pytest.approx(full_forward_score(model, tokenizer, prompt, answer), abs=1e-4)
    assert scores[0][2] == 0.0  # empty answer
    with pytest.raises(ValueError, match="`candidates`"):
        score_answers(model, tokenizer, prompts, candidates[:2])


def test_generate_answers_memorised_rows_batched_and_alone(trained):
    model_dir, _, rows = trained
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [row["prompt"] for row in rows]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=40)
    # Decoding stops at the EOS learnt after each completion: the answer is exactly the completion.
    assert batched == [row["completion"] for row in rows]
    # Left padding changes nothing: each prompt alone gives the same answer.
    assert [generate_answers(model, tokenizer, [p], max_new_tokens=40)[0] for p in prompts] == batched
    assert tokenizer.padding_side == "right"  # the tokenizer was not modified


def test_evaluate_trained_model_reaches_exact_match(trained):
    model_dir, trained_data, rows = trained
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.train()
    results, predictions = evaluate(model, tokenizer, "n2d-reverse", data_dir=trained_data, batch_size=3, show_progress=False)
    assert model.training  # mode restored
    metrics = results["tasks"]["n2d-reverse"]
    assert metrics["count"] == 4
    assert metrics["exact_match"] == 1.0 and metrics["exact_match_correct"] == 4
    assert metrics["contains"] == 1.0
    assert metrics["rank_accuracy"] == 1.0 and metrics["rank_chance"] == 0.25 and metrics["rank_candidates"] == 4
    assert metrics["target_beats_random"] == 1.0
    assert metrics["target_logprob"] > metrics["random_logprob"]
    assert [p["generation"] for p in predictions] == [row["completion"] for row in rows]
    assert all(p["top_candidate"] == p["target"] for p in predictions)


def test_evaluate_all_tasks_keys_and_counts(tiny, subset_dir):
    model, tokenizer = tiny
    results, predictions = evaluate(model, tokenizer, "all", data_dir=subset_dir, batch_size=16, max_new_tokens=5, show_progress=False)
    assert list(results["tasks"]) == ["n2d", "n2d-reverse", "d2n", "d2n-reverse", "both"]
    assert results["data_dir"] == str(subset_dir)
    assert results["settings"] == {
        "batch_size": 16, "max_new_tokens": 5, "decoding": "greedy", "mode": "causal", "rank": True, "num_processes": 1,
    }
    assert set(results["metrics"]) == set(METRICS)
    json.dumps(results)  # JSON-serialisable as is
    assert len(predictions) == 5 * ROWS_PER_FILE
    assert [(p["task"], p["index"]) for p in predictions] == [(t, i) for t in results["tasks"] for i in range(ROWS_PER_FILE)]
    for name, metrics in results["tasks"].items():
        assert metrics["count"] == ROWS_PER_FILE
        assert metrics["answer"] == TASKS[name].answer
        assert 0.0 <= metrics["exact_match"] <= metrics["contains"] <= 1.0
        # BLEU for description answers only; the random baseline where a randomized file exists.
        assert (metrics["bleu_char"] is not None) == (TASKS[name].answer == "description")
        assert (metrics["random_logprob"] is not None) == (TASKS[name].randomized_file is not None)
        assert metrics["target_logprob"] < 0
    # 4 people per file: every row of the four single-direction tasks ranks 4 candidates.
    for name in ["n2d", "n2d-reverse", "d2n", "d2n-reverse"]:
        assert results["tasks"][name]["rank_candidates"] == 4 and results["tasks"][name]["rank_chance"] == 0.25
    # The per-example log-probability is the model's: check one against a full forward pass.
    first = predictions[0]
    assert first["target_logprob"] == pytest.approx(full_forward_score(model, tokenizer, first["prompt"], first["target"]), abs=1e-4)
    assert all(len(p["generation"]) > 0 for p in predictions)


def test_evaluate_without_rank_scores_only_target_and_random(tiny, subset_dir, monkeypatch):
    model, tokenizer = tiny
    seen = []

    def counting_score(model, tokenizer, prompts, candidates, max_pairs=256):
        seen.extend(candidates)
        return [[-1.0] * len(c) for c in candidates]

    monkeypatch.setattr("bico.evaluation.score_answers", counting_score)
    results, predictions = evaluate(model, tokenizer, ["n2d-reverse", "d2n"], data_dir=subset_dir, max_new_tokens=2, rank=False, show_progress=False)
    assert sorted(len(c) for c in seen) == [1] * ROWS_PER_FILE + [2] * ROWS_PER_FILE
    assert results["tasks"]["d2n"]["rank_accuracy"] is None
    assert "rank_correct" not in predictions[0]


def test_ranking_and_metrics_with_a_fake_model(subset_dir, monkeypatch, tiny):
    model, tokenizer = tiny
    rows = [json.loads(line) for line in (subset_dir / TASKS["n2d"].file).read_text().splitlines()]
    target_of = {row["prompt"]: row["completion"] for row in rows}
    index_of = {row["prompt"]: i for i, row in enumerate(rows)}
    calls = []

    def fake_score(model, tokenizer, prompts, candidates, max_pairs=256):
        calls.append(len(prompts))
        out = []
        for prompt, answers in zip(prompts, candidates):
            # Even rows: the target scores highest. Odd rows: another candidate does.
            wrong = next(a for a in answers if a != target_of[prompt])
            best = target_of[prompt] if index_of[prompt] % 2 == 0 else wrong
            out.append([0.0 if a == best else -1.0 - len(a) / 100 for a in answers])
        return out

    def fake_generate(model, tokenizer, prompts, max_new_tokens=40):
        # Every 4th row exactly right; the others say the target after another word.
        return [target_of[p] if index_of[p] % 4 == 0 else " So," + target_of[p] for p in prompts]

    monkeypatch.setattr("bico.evaluation.score_answers", fake_score)
    monkeypatch.setattr("bico.evaluation.generate_answers", fake_generate)
    results, predictions = evaluate(model, tokenizer, "n2d", data_dir=subset_dir, batch_size=7, show_progress=False)
    metrics = results["tasks"]["n2d"]
    assert calls == [7, 7, 7, 7, 7, 5]
    assert metrics["rank_accuracy"] == 0.5 and metrics["rank_correct"] == 20
    assert metrics["exact_match"] == 0.25 and metrics["contains"] == 1.0
    assert metrics["bleu_char"] < 100 and metrics["bleu_word"] < 100
    assert [p["rank_correct"] for p in predictions] == [i % 2 == 0 for i in range(ROWS_PER_FILE)]
    # One candidate per person, in the wording of the row's own template.
    for prediction, row in zip(predictions, rows):
        assert prediction["num_candidates"] == 4
        assert (prediction["top_candidate"] == row["completion"]) == prediction["rank_correct"]
    assert metrics["target_logprob"] == pytest.approx(sum(0.0 if i % 2 == 0 else -1 - len(r["completion"]) / 100 for i, r in enumerate(rows)) / 40)


def test_abi_models_use_the_abi_seam(tiny, subset_dir, monkeypatch):
    model, tokenizer = tiny
    rows = [json.loads(line) for line in (subset_dir / TASKS["d2n"].file).read_text().splitlines()]
    target_of = {row["prompt"]: row["completion"] for row in rows}
    calls = {"generate": 0, "score": 0}

    def abi_generate(model, tokenizer, prompts, max_new_tokens):
        calls["generate"] += 1
        return [target_of[p] for p in prompts]

    def abi_score(model, tokenizer, prompts, completions, **kwargs):
        calls["score"] += 1
        return torch.tensor([0.0 if target_of[p] == c else -3.0 for p, c in zip(prompts, completions)])

    fake = types.SimpleNamespace(abi_generate=abi_generate, abi_score=abi_score)
    monkeypatch.setitem(sys.modules, "bico.abi", fake)
    monkeypatch.setattr(bico, "abi", fake, raising=False)
    monkeypatch.setattr(model.config, "bico_objective", "abi", raising=False)
    results, _ = evaluate(model, tokenizer, "d2n", data_dir=subset_dir, batch_size=40, show_progress=False)
    assert calls == {"generate": 1, "score": 1}
    assert results["settings"]["mode"] == "abi"
    metrics = results["tasks"]["d2n"]
    assert metrics["exact_match"] == 1.0 and metrics["rank_accuracy"] == 1.0 and metrics["target_logprob"] == 0.0


def test_abi_evaluation_matches_the_reference_path(tiny_model_dir, subset_dir):
    # The real seam: bico.abi_generation's KV-cache path against its full-sequence reference, selected
    # as `model.generate` selects it, through `generation_config.use_cache`.
    from bico.abi import prepare_abi_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prepare_abi_model(model, tokenizer)
    kwargs = dict(tasks=["n2d", "d2n-reverse"], data_dir=subset_dir, batch_size=16, max_new_tokens=5, show_progress=False)
    fast, fast_predictions = evaluate(model, tokenizer, **kwargs)
    model.generation_config.use_cache = False
    reference, reference_predictions = evaluate(model, tokenizer, **kwargs)
    assert fast["settings"]["mode"] == "abi"
    assert [p["generation"] for p in fast_predictions] == [p["generation"] for p in reference_predictions]
    assert [p["top_candidate"] for p in fast_predictions] == [p["top_candidate"] for p in reference_predictions]
    for key in ("target_logprob", "random_logprob"):
        got = torch.tensor([p.get(key, 0.0) for p in fast_predictions])
        expected = torch.tensor([p.get(key, 0.0) for p in reference_predictions])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=5e-7)


def test_patched_model_evaluates_as_the_causal_model(tiny_model_dir, subset_dir):
    from bico.patch import patch_llama

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    patched = patch_llama(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    kwargs = dict(tasks="n2d-reverse", data_dir=subset_dir, max_new_tokens=6, show_progress=False)
    expected, expected_predictions = evaluate(plain, tokenizer, **kwargs)
    got, got_predictions = evaluate(patched, tokenizer, **kwargs)
    assert [p["generation"] for p in got_predictions] == [p["generation"] for p in expected_predictions]
    assert got["tasks"]["n2d-reverse"]["target_logprob"] == pytest.approx(expected["tasks"]["n2d-reverse"]["target_logprob"], abs=1e-4)


def test_evaluate_rejects_bad_arguments(tiny, subset_dir, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate(model, tokenizer, "d2n", data_dir=subset_dir, batch_size=0)
    with pytest.raises(ValueError, match="`task`"):
        evaluate(model, tokenizer, "n2p", data_dir=subset_dir)
    with pytest.raises(DataError, match="p2d_prompts_test.jsonl"):
        evaluate(model, tokenizer, "n2d", data_dir=tmp_path)


def test_format_table_and_writers(tmp_path):
    results = {
        "tasks": {
            "n2d-reverse": {"count": 300, "exact_match": 0.333, "contains": 0.5, "bleu_word": None, "bleu_char": None,
                            "target_logprob": -3.21, "random_logprob": -9.5, "rank_accuracy": 0.85, "rank_chance": 1 / 30},
            "n2d": {"count": 300, "exact_match": 0.46, "contains": 0.5, "bleu_word": 41.234, "bleu_char": 70.0,
                    "target_logprob": -12.0, "random_logprob": None, "rank_accuracy": 0.9, "rank_chance": 1 / 30},
        }
    }
    lines = format_table(results).splitlines()
    assert lines[0] == "| task | n | EM | contains | BLEU word | BLEU char | log p(target) | log p(random) | rank | chance |"
    assert lines[2] == "| n2d-reverse | 300 | 0.333 | 0.500 | - | - | -3.21 | -9.50 | 0.850 | 0.033 |"
    assert lines[3] == "| n2d | 300 | 0.460 | 0.500 | 41.23 | 70.00 | -12.00 | - | 0.900 | 0.033 |"
    assert len(lines) == 4

    write_results(results, tmp_path / "out" / "results.json")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    predictions = [{"task": "n2d", "index": 0, "generation": " café — ok"}, {"task": "n2d", "index": 1, "generation": ""}]
    write_predictions(predictions, tmp_path / "preds.jsonl")
    lines = (tmp_path / "preds.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == predictions
