"""Evaluation of axiomatic training: accuracy bookkeeping per set and chain length, tables, the plot."""

import json
from types import SimpleNamespace

import pytest
import torch

from bico.axioms.evaluation import evaluate, format_results, plot_accuracy, write_results
from bico.axioms.generator import generate_eval
from bico.axioms.models import build_model
from bico.axioms.tokenizer import answer_ids, build_tokenizer, encode


class ParityModel(torch.nn.Module):
    """Answers Yes after an even number of tokens, No after an odd one; logits only at real positions matter."""

    def __init__(self, tokenizer):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        self.yes_id, self.no_id = answer_ids(tokenizer)
        self.weight = torch.nn.Parameter(torch.zeros(()))  # evaluate reads the device from a parameter

    def forward(self, input_ids, attention_mask, use_cache=False):
        B, L = input_ids.shape
        lengths = torch.arange(1, L + 1).expand(B, L)  # (B, L): tokens read so far
        logits = torch.zeros(B, L, self.config.vocab_size)
        logits[..., 5] = 10.0  # a non-answer token wins overall: only the Yes/No pair may decide
        logits[..., self.yes_id] = (lengths % 2 == 0).float()
        logits[..., self.no_id] = (lengths % 2 == 1).float()
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return generate_eval("reversed", 40, seed=0) + generate_eval("branching-2n", 24, seed=0)


def test_accuracy_per_set_and_chain_length_matches_a_recount(tokenizer, rows):
    yes_id, _ = answer_ids(tokenizer)
    examples = encode(rows, tokenizer)
    right = [(len(e["input_ids"]) % 2 == 0) == (e["label"] == yes_id) for e in examples]
    for batch_size in (1, 7, 64):
        results = evaluate(ParityModel(tokenizer), tokenizer, rows, batch_size)
        assert results["count"] == 64 and results["accuracy"] == pytest.approx(sum(right) / 64)
        reversed_set = results["sets"]["reversed"]
        assert reversed_set["count"] == 40 and set(reversed_set["by_num_nodes"]) == {"3", "4", "5", "6"}
        for n, metrics in reversed_set["by_num_nodes"].items():
            hits = [r for r, e in zip(right, examples) if e["set"] == "reversed" and e["num_nodes"] == int(n)]
            assert metrics == {"accuracy": pytest.approx(sum(hits) / len(hits)), "count": len(hits)}
        assert sum(m["count"] for m in results["sets"]["branching-2n"]["by_num_nodes"].values()) == 24
        even = [len(e["input_ids"]) % 2 == 0 for e in examples if e["set"] == "reversed"]
        assert reversed_set["yes_rate"] == pytest.approx(sum(even) / 40)


def test_a_real_model_gives_the_same_answers_in_any_batch(tokenizer, rows):
    model = build_model("rope", len(tokenizer), n_layer=1, n_head=2, n_embd=16, max_positions=256, pad_token_id=0, seed=0)
    one, many = evaluate(model, tokenizer, rows, 1), evaluate(model, tokenizer, rows, 64)
    assert one == many


def test_bad_inputs_are_one_line(tokenizer, rows):
    small = build_model("learned", len(tokenizer), n_layer=1, n_head=2, n_embd=16, max_positions=32, pad_token_id=0, seed=0)
    with pytest.raises(ValueError, match=r"^row \d+ of set '\S+' has \d+ tokens, more than the model's 32 positions"):
        evaluate(small, tokenizer, rows, 8)
    wrong = build_model("none", 90, n_layer=1, n_head=2, n_embd=16, max_positions=256, pad_token_id=0, seed=0)
    with pytest.raises(ValueError, match="^the tokenizer has 71 tokens but the model's vocabulary has 90"):
        evaluate(wrong, tokenizer, rows, 8)


def _results(accuracy_by_size: dict, name="reversed") -> dict:
    by_size = {str(n): {"accuracy": a, "count": 10} for n, a in accuracy_by_size.items()}
    return {"accuracy": 0.0, "count": 10 * len(by_size),
            "sets": {name: {"accuracy": sum(accuracy_by_size.values()) / len(by_size), "count": 10 * len(by_size),
                            "yes_rate": 0.5, "by_num_nodes": by_size}}}


def test_write_results_json_markdown_and_plot(tmp_path):
    results = {"none": _results({3: 1.0, 4: 0.9}), "learned": _results({3: 0.8, 5: 0.55})}
    write_results(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| set | n | none | learned |" in markdown and "| reversed | 20 | 0.950 | 0.675 |" in markdown
    assert "| model | 3 | 4 | 5 |" in markdown and "| learned | 0.800 | - | 0.550 |" in markdown
    assert format_results(results) in markdown

    pytest.importorskip("matplotlib")
    fig = plot_accuracy(results, tmp_path / "out" / "accuracy.png")
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["none"].get_xdata()) == [3, 4] and list(lines["learned"].get_ydata()) == [0.8, 0.55]
    assert list(lines["chance"].get_ydata()) == [0.5, 0.5]
    assert lines["none"].get_color() == "tab:blue"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="plot_accuracy needs matplotlib: pip install matplotlib"):
        plot_accuracy({"none": _results({3: 1.0})})
