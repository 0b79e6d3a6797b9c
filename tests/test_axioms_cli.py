"""`bico-axioms`: generate, train and eval end to end, and every bad input as one line with exit code 2."""

import json
import shutil
import subprocess
import sys

import pytest

from bico.axioms.cli import main
from bico.axioms.generator import EVAL_SETS, read_jsonl


TINY_TRAIN = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--max_positions", "256", "--max_steps", "2",
              "--per_device_train_batch_size", "16", "--checkpointing_steps", "0", "--cpu_threads", "1"]


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bico-axioms {command}: error: " if command else "bico-axioms: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("axioms_data")
    assert main(["generate", "--num_instances", "64", "--eval_instances", "12", "--seed", "1", "--output_dir", str(output_dir)]) == 0
    return output_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, data_dir):
    """Two tiny models trained 2 steps through the command line: none and learned."""
    root = tmp_path_factory.mktemp("axioms_models")
    for encoding in ("none", "learned"):
        code = main(["train", *TINY_TRAIN, "--position_encoding", encoding, "--train_file", str(data_dir / "train.jsonl"),
                     "--output_dir", str(root / encoding)])
        assert code == 0
    return [root / "none" / "final", root / "learned" / "final"]


def test_generate_writes_the_training_file_and_every_set(data_dir):
    assert sorted(path.name for path in data_dir.iterdir()) == sorted(["train.jsonl"] + [f"{name}.jsonl" for name in EVAL_SETS])
    train_rows = read_jsonl(data_dir / "train.jsonl")
    assert len(train_rows) == 64 and {row["set"] for row in train_rows} == {"TS2"}
    eval_premises = {row["premise"] for name in EVAL_SETS for row in read_jsonl(data_dir / f"{name}.jsonl")}
    assert not eval_premises & {row["premise"] for row in train_rows}
    assert len(read_jsonl(data_dir / "reversed.jsonl")) == 12


def test_train_prints_a_summary_and_eval_writes_json_markdown_and_plot(capsys, model_dirs, data_dir, tmp_path):
    code, out, err = run_main(capsys, "train", *TINY_TRAIN, "--position_encoding", "rope", "--num_instances", "32",
                              "--output_dir", str(tmp_path / "rope"))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["num_rows"] == 32 and summary["final_dir"] == str(tmp_path / "rope" / "final")
    code, out, err = run_main(capsys, "eval", "--model", *map(str, model_dirs), "--data_dir", str(data_dir),
                              "--output_dir", str(tmp_path / "results"), "--batch_size", "5")
    assert code == 0, err
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results) == ["none", "learned"]
    assert list(results["none"]["sets"]) == list(EVAL_SETS) and results["none"]["count"] == 12 * len(EVAL_SETS)
    assert results["learned"]["position_encoding"] == "learned" and results["learned"]["model"] == str(model_dirs[1].resolve())
    assert "| set | n | none | learned |" in (tmp_path / "results" / "results.md").read_text()
    assert "| set | n | none | learned |" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results" / "accuracy.png").stat().st_size > 1000


def test_eval_labels_two_models_of_one_encoding_by_directory(capsys, model_dirs, data_dir, tmp_path):
    copy = tmp_path / "none-seed1" / "final"
    shutil.copytree(model_dirs[0], copy)
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), str(copy), "--data_dir", str(data_dir),
                            "--output_dir", str(tmp_path / "results"), "--sets", "reversed", "--no_plot")
    assert code == 0, err
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results) == ["none (none)", "none (none-seed1)"]
    assert results["none (none)"]["sets"] == results["none (none-seed1)"]["sets"]
    assert not (tmp_path / "results" / "accuracy.png").exists()


def test_bad_input_is_one_line(capsys, model_dirs, data_dir, tmp_path):
    code, _, err = run_main(capsys, "fit")
    assert_one_line_error(code, err, "", "must be one of generate, train, eval; got 'fit'")
    code, _, err = run_main(capsys, "train", "--position_encoding", "alibi", "--output_dir", str(tmp_path / "x"))
    assert_one_line_error(code, err, "train", "`position_encoding` must be one of none, learned, sinusoidal, rope; got 'alibi'")
    code, _, err = run_main(capsys, "train", "--n_layer", "two")
    assert_one_line_error(code, err, "train", "--n_layer", "invalid int value")
    code, _, err = run_main(capsys, "generate", "--mix", "TS9", "--output_dir", str(tmp_path / "g"))
    assert_one_line_error(code, err, "generate", "--mix must be one of TS1, TS2, OCC; got 'TS9'")
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), "--data_dir", str(data_dir), "--output_dir",
                            str(tmp_path / "r"), "--sets", "reversed", "mirror")
    assert_one_line_error(code, err, "eval", "--sets must be among length-sequential,", "got 'mirror'")
    code, _, err = run_main(capsys, "eval", "--model", str(tmp_path / "nowhere"), "--data_dir", str(data_dir), "--output_dir",
                            str(tmp_path / "r"), "--sets", "reversed", "--no_plot")
    assert_one_line_error(code, err, "eval", "no config.json")
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), "--output_dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "eval", "the following arguments are required: --data_dir")


def test_malformed_data_names_file_and_line(capsys, model_dirs, data_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(data_dir, bad_dir)
    lines = (bad_dir / "reversed.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # cut the closing brace
    (bad_dir / "reversed.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), "--data_dir", str(bad_dir), "--output_dir",
                            str(tmp_path / "r"), "--no_plot")
    assert_one_line_error(code, err, "eval", f"{bad_dir / 'reversed.jsonl'}:3:")
    code, _, err = run_main(capsys, "train", *TINY_TRAIN, "--train_file", str(bad_dir / "reversed.jsonl"),
                            "--output_dir", str(tmp_path / "t"))
    assert_one_line_error(code, err, "train", f"{bad_dir / 'reversed.jsonl'}:3:")
    (bad_dir / "shuffled.jsonl").unlink()
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), "--data_dir", str(bad_dir), "--output_dir",
                            str(tmp_path / "r"), "--sets", "shuffled", "--no_plot")
    assert_one_line_error(code, err, "eval", "shuffled.jsonl: no such file")


def test_tokenizer_that_does_not_fit_the_model_is_one_line(capsys, model_dirs, data_dir, tmp_path):
    from transformers import AutoTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs[1], broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(broken)
    code, _, err = run_main(capsys, "eval", "--model", str(broken), "--data_dir", str(data_dir), "--output_dir",
                            str(tmp_path / "r"), "--sets", "reversed", "--no_plot")
    assert_one_line_error(code, err, "eval", "the tokenizer has 72 tokens but the model's vocabulary has 71")


def test_module_entry_point_exits_2_without_traceback():
    completed = subprocess.run([sys.executable, "-m", "bico.axioms.cli", "train", "--position_encoding", "alibi"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "bico-axioms train: error: `position_encoding` must be one of none, learned, sinusoidal, rope; got 'alibi'."]


def test_eval_adds_the_columns_of_earlier_results(capsys, model_dirs, data_dir, tmp_path):
    code, _, err = run_main(capsys, "eval", "--model", str(model_dirs[0]), "--data_dir", str(data_dir),
                            "--output_dir", str(tmp_path / "first"), "--no_plot")
    assert code == 0, err
    code, out, err = run_main(capsys, "eval", "--results", str(tmp_path / "first" / "results.json"), "--model", str(model_dirs[1]),
                              "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "both"), "--no_plot")
    assert code == 0, err
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert list(both) == ["none", "learned"] and both["none"] == first["none"]
    assert "| set | n | none | learned |" in out
    # Results alone need no data; the same label twice is told apart by the model directory.
    code, _, err = run_main(capsys, "eval", "--results", str(tmp_path / "first" / "results.json"),
                            str(tmp_path / "both" / "results.json"), "--output_dir", str(tmp_path / "merged"), "--no_plot")
    assert code == 0, err
    assert len(json.loads((tmp_path / "merged" / "results.json").read_text())) == 3


def test_eval_bad_results_file_is_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, "eval", "--results", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "eval", "--results", "missing.json", "not a readable results.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = run_main(capsys, "eval", "--results", str(tmp_path / "list.json"), "--output_dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "eval", "list.json", "as `bico-axioms eval` writes it")
    code, _, err = run_main(capsys, "eval", "--output_dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "eval", "--results file")
