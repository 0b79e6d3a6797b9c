import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bico.cli import main
from bico.data import TASKS
from bico.evaluation import evaluate
from bico.scratch import small_llama_config


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory, data_dir):
    """The first 40 rows (4 people) of every test and randomized file of the committed data."""
    target = tmp_path_factory.mktemp("subset")
    for task in TASKS.values():
        for name in (task.file, task.randomized_file):
            if name is not None:
                lines = (data_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
                (target / name).write_text("".join(lines[:40]), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, tiny_tokenizer, subset_dir):
    """A tiny Llama trained for 150 steps on 4 rows of d2n (one per person), saved with its tokenizer."""
    rows = [json.loads(line) for line in (subset_dir / TASKS["d2n"].file).read_text().splitlines()][::10]
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_llama_config(tiny_tokenizer, **TINY))
    sequences = [tiny_tokenizer(r["prompt"] + r["completion"])["input_ids"] + [tiny_tokenizer.eos_token_id] for r in rows]
    length = max(len(s) for s in sequences)
    input_ids = torch.tensor([s + [0] * (length - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    output_dir = tmp_path_factory.mktemp("trained")
    model.save_pretrained(output_dir)
    tiny_tokenizer.save_pretrained(output_dir)
    return output_dir


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bico-eval: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_full_run_writes_results_and_predictions(capsys, trained_model_dir, subset_dir, tmp_path):
    code, out, err = run_main(
        capsys, "--task", "d2n", "n2d-reverse", "--model", str(trained_model_dir), "--data-dir", str(subset_dir),
        "--batch-size", "16", "--max-new-tokens", "20",
        "--output", str(tmp_path / "out" / "results.json"), "--predictions", str(tmp_path / "preds.jsonl"),
    )
    assert code == 0, err
    table = out.strip().splitlines()
    assert table[0].startswith("| task | n | EM |") and len(table) == 4
    assert table[2].startswith("| d2n | 40 |") and table[3].startswith("| n2d-reverse | 40 |")

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"] == str(trained_model_dir.resolve())
    assert results["data_dir"] == str(subset_dir)
    assert results["settings"]["max_new_tokens"] == 20 and results["settings"]["batch_size"] == 16
    assert list(results["tasks"]) == ["d2n", "n2d-reverse"]
    d2n = results["tasks"]["d2n"]
    assert d2n["count"] == 40 and d2n["rank_chance"] == 0.25
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(predictions) == 80
    # The 4 trained rows (one per person, first template) are answered exactly (names are ~15 tokens here).
    trained_rows = [p for p in predictions if p["task"] == "d2n" and p["index"] % 10 == 0]
    assert [p["exact_match"] for p in trained_rows] == [True] * 4
    assert all(p["rank_correct"] for p in trained_rows)
    assert d2n["exact_match_correct"] >= 4
    assert "rank_correct" in predictions[-1] and "random_logprob" in predictions[-1]


def test_all_tasks_and_no_rank(capsys, tiny_model_dir, subset_dir):
    code, out, err = run_main(
        capsys, "--task", "all", "--model", str(tiny_model_dir), "--data_dir", str(subset_dir),
        "--max_new_tokens", "2", "--no-rank",
    )
    assert code == 0, err
    rows = out.strip().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| n2d", "| n2d-reverse", "| d2n", "| d2n-reverse", "| both"]
    assert all(row.endswith("| - | - |") for row in rows)  # no ranking columns


def test_lora_adapter_is_merged_onto_its_base(capsys, tiny_model_dir, subset_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter changes the model.
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    merged = peft_model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    kwargs = dict(tasks="d2n", data_dir=subset_dir, max_new_tokens=4, show_progress=False)
    expected, _ = evaluate(merged, tokenizer, **kwargs)
    base_results, _ = evaluate(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, **kwargs)

    code, _, err = run_main(
        capsys, "--task", "d2n", "--model", str(adapter_dir), "--data-dir", str(subset_dir),
        "--max-new-tokens", "4", "--output", str(tmp_path / "results.json"),
    )
    assert code == 0, err
    got = json.loads((tmp_path / "results.json").read_text())["tasks"]["d2n"]["target_logprob"]
    assert got == pytest.approx(expected["tasks"]["d2n"]["target_logprob"], abs=1e-4)
    assert got != pytest.approx(base_results["tasks"]["d2n"]["target_logprob"], abs=1e-2)


def test_unknown_task(capsys, tiny_model_dir):
    code, _, err = run_main(capsys, "--task", "n2p", "--model", str(tiny_model_dir))
    assert_one_line_error(code, err, "--task must be one of n2d, n2d-reverse, d2n, d2n-reverse, both, all", "'n2p'")


def test_missing_arguments_and_bad_numbers(capsys, tiny_model_dir, subset_dir):
    code, _, err = run_main(capsys, "--model", str(tiny_model_dir))
    assert_one_line_error(code, err, "--task", "bico-eval --help")
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tiny_model_dir), "--batch-size", "two")
    assert_one_line_error(code, err, "--batch-size", "'two'")
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tiny_model_dir), "--data-dir", str(subset_dir), "--batch-size", "0")
    assert_one_line_error(code, err, "positive", "got 0")


def test_missing_model_directory(capsys, tmp_path, subset_dir):
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tmp_path / "nope"), "--data-dir", str(subset_dir))
    assert_one_line_error(code, err, "model directory not found", str(tmp_path / "nope"), "save_pretrained")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tmp_path / "empty"), "--data-dir", str(subset_dir))
    assert_one_line_error(code, err, "no config.json")


def test_model_without_tokenizer(capsys, tiny_model_dir, tmp_path, subset_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(model_dir), "--data-dir", str(subset_dir))
    assert_one_line_error(code, err, "no tokenizer in", "tokenizer.save_pretrained")


def test_adapter_with_missing_base(capsys, tmp_path, subset_dir):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"), "peft_type": "LORA"}))
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(adapter_dir), "--data-dir", str(subset_dir))
    assert_one_line_error(code, err, "cannot load the LoRA adapter", "base_model_name_or_path")


def test_data_dir_without_a_task_file(capsys, tiny_model_dir, subset_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(subset_dir, partial)
    (partial / TASKS["d2n-reverse"].file).unlink()
    code, _, err = run_main(capsys, "--task", "d2n", "d2n-reverse", "--model", str(tiny_model_dir), "--data-dir", str(partial))
    assert_one_line_error(code, err, "d2p_reverse_prompts_test.jsonl", "file not found")
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "data directory not found")


def test_malformed_data_file(capsys, tiny_model_dir, subset_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(subset_dir, broken)
    path = broken / TASKS["d2n"].file
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"prompt": "no completion"}\n' + "".join(lines[2:]))
    code, _, err = run_main(capsys, "--task", "d2n", "--model", str(tiny_model_dir), "--data-dir", str(broken))
    assert_one_line_error(code, err, f"{path}:2: missing field `completion`")


def test_console_script_exit_code_without_traceback(tmp_path):
    script = shutil.which("bico-eval")
    command = [script] if script else [sys.executable, "-m", "bico.cli"]
    result = subprocess.run([*command, "--task", "nope", "--model", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["bico-eval: error: --task must be one of n2d, n2d-reverse, d2n, d2n-reverse, both, all; got 'nope'."]
    assert result.stdout == ""


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(capsys, tiny_model_dir, subset_dir, tmp_path, free_port):
    common = ["--task", "all", "--model", str(tiny_model_dir), "--data-dir", str(subset_dir), "--batch-size", "8", "--max-new-tokens", "6"]
    code, _, err = run_main(capsys, *common, "--output", str(tmp_path / "one.json"), "--predictions", str(tmp_path / "one.jsonl"))
    assert code == 0, err
    # DESIGN.md section 4: two gloo processes on a CPU-only machine need ACCELERATE_USE_CPU and --multi_gpu.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port), "-m", "bico.cli"]
    result = subprocess.run(
        [*launch, *common, "--output", str(tmp_path / "two.json"), "--predictions", str(tmp_path / "two.jsonl")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["settings"]["num_processes"] == 1 and two["settings"]["num_processes"] == 2
    # The table is printed once, by the main process.
    assert result.stdout.count("| task |") == 1
    # Same batches and kernels; log-probabilities may differ in the last bits because the
    # subprocesses run with a different thread count (a different matmul reduction order).
    assert_same_up_to_rounding(two["tasks"], one["tasks"])
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    assert_same_up_to_rounding(read("two.jsonl"), read("one.jsonl"))


def assert_same_up_to_rounding(got, expected):
    """Equal structures, with floats compared to a relative 1e-6 and everything else exactly."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same_up_to_rounding(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_up_to_rounding(a, b)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-6)
    else:
        assert got == expected
