import json
import re

import pytest

from bico.data import DEFAULT_DATA_DIR, TASKS, DataError, Task, load_task, load_train, read_jsonl, resolve_tasks


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "Who is Ada?", "completion": " Ada Orr"})


def test_default_data_dir_is_repo_data(data_dir):
    assert DEFAULT_DATA_DIR.resolve() == data_dir.resolve()  # data/ links to the package's copy
    assert (DEFAULT_DATA_DIR / "all_prompts_train.jsonl").is_file()


def test_read_jsonl_keeps_rows_and_skips_blank_lines(tmp_path):
    extra = json.dumps({"prompt": "p", "completion": " c", "id": 7})
    rows = read_jsonl(write_lines(tmp_path / "f.jsonl", [GOOD, "", "   ", extra]))
    assert rows == [{"prompt": "Who is Ada?", "completion": " Ada Orr"}, {"prompt": "p", "completion": " c", "id": 7}]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "a", "completion": " b"', "invalid JSON"),
        ("not json at all", "invalid JSON"),
        ('["prompt", "completion"]', "expected a JSON object with `prompt` and `completion`, got list"),
        ('{"completion": " b"}', "missing field `prompt`"),
        ('{"prompt": "a"}', "missing field `completion`"),
        ('{"prompt": 3, "completion": " b"}', "field `prompt` must be a string, got int"),
        ('{"prompt": "a", "completion": null}', "field `completion` must be a string, got NoneType"),
    ],
)
def test_read_jsonl_errors_name_path_and_line(tmp_path, bad_line, message):
    # The bad row is on line 4: two good rows and a blank line come first.
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    text = str(info.value)
    assert text.startswith(f"{path}:4: ")
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, ValueError)


def test_read_jsonl_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"prompt": "caf\xe9", "completion": " x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_read_jsonl_empty_and_missing(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="^" + re.escape(f"{empty}:1: empty file")):
        read_jsonl(empty)
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        read_jsonl(tmp_path / "nope.jsonl")


def test_missing_file_says_where_and_what_to_pass(tmp_path):
    write_lines(tmp_path / "other.jsonl", [GOOD])
    with pytest.raises(DataError) as info:
        load_train(tmp_path)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'all_prompts_train.jsonl'}: file not found in {tmp_path}")
    assert "other.jsonl" in text and "`data_dir`" in text
    with pytest.raises(DataError, match="data directory not found"):
        load_task("n2d", tmp_path / "missing_dir")
    with pytest.raises(DataError, match="p2d_prompts_test.jsonl: file not found"):
        load_task("n2d", tmp_path)


def test_resolve_tasks():
    assert resolve_tasks("all") == ["n2d", "n2d-reverse", "d2n", "d2n-reverse", "both"]
    assert resolve_tasks(["d2n", "n2d-reverse", "d2n"]) == ["d2n", "n2d-reverse"]
    assert resolve_tasks(["both", "all"]) == ["both", "n2d", "n2d-reverse", "d2n", "d2n-reverse"]
    with pytest.raises(ValueError) as info:
        resolve_tasks(["n2d", "reverse"])
    assert "`task`" in str(info.value) and "'reverse'" in str(info.value)
    assert "n2d-reverse" in str(info.value) and "all" in str(info.value)
    with pytest.raises(ValueError, match="`task` is empty"):
        resolve_tasks([])


def test_task_table():
    assert TASKS["n2d"] == Task("n2d", "p2d_prompts_test.jsonl", "description")
    assert TASKS["n2d-reverse"].answer == "name"
    assert TASKS["n2d-reverse"].randomized_file == "p2d_reverse_prompts_test_randomized.jsonl"
    assert TASKS["d2n"] == Task("d2n", "d2p_prompts_test.jsonl", "name")
    assert TASKS["d2n-reverse"].answer == "description"
    assert TASKS["d2n-reverse"].randomized_file == "d2p_reverse_prompts_test_randomized.jsonl"
    assert TASKS["both"] == Task("both", "both_prompts_test.jsonl", "either")


@pytest.mark.parametrize("which", ["data_dir", "berglund_dir"])
def test_load_train_and_tasks_on_both_sets(which, request):
    directory = request.getfixturevalue(which)
    train = load_train(directory)
    assert train.column_names == ["prompt", "completion"]
    assert train.num_rows == 3600
    assert load_train(directory, file="p2d_prompts_train.jsonl").num_rows == 900
    expected_rows = {"n2d": 300, "n2d-reverse": 300, "d2n": 300, "d2n-reverse": 300, "both": 600}
    for name in resolve_tasks("all"):
        task = load_task(name, directory)
        assert task.num_rows == expected_rows[name]
        assert all(c.startswith(" ") for c in task["completion"])
        if TASKS[name].randomized_file:
            assert task.column_names == ["prompt", "completion", "random_completion"]
            assert all(c.startswith(" ") for c in task["random_completion"])
        else:
            assert task.column_names == ["prompt", "completion"]
    # Same rows as the raw file, in order.
    raw = read_jsonl(directory / "d2p_prompts_test.jsonl")
    assert load_task("d2n", directory)["completion"] == [r["completion"] for r in raw]


def test_load_task_default_dir_and_task_object():
    by_name = load_task("n2d-reverse")
    by_task = load_task(TASKS["n2d-reverse"], DEFAULT_DATA_DIR)
    assert by_name.to_list() == by_task.to_list()
    row = by_name[0]
    assert row["random_completion"] != row["completion"]
    with pytest.raises(ValueError, match="`task` must be one of"):
        load_task("n2d_reverse")


def test_randomized_file_optional_and_checked(tmp_path):
    rows = [{"prompt": f"P{i}", "completion": f" N{i}"} for i in range(3)]
    write_lines(tmp_path / "p2d_reverse_prompts_test.jsonl", [json.dumps(r) for r in rows])
    # No randomized file: the column is simply absent.
    assert load_task("n2d-reverse", tmp_path).column_names == ["prompt", "completion"]

    randomized = tmp_path / "p2d_reverse_prompts_test_randomized.jsonl"
    write_lines(randomized, [json.dumps({"prompt": f"P{i}", "completion": f" N{(i + 1) % 3}"}) for i in range(3)])
    assert load_task("n2d-reverse", tmp_path)["random_completion"] == [" N1", " N2", " N0"]

    write_lines(randomized, [json.dumps({"prompt": p, "completion": " X"}) for p in ["P0", "Q1", "P2"]])
    with pytest.raises(DataError, match="^" + re.escape(f"{randomized}:2: prompt differs from row 2")):
        load_task("n2d-reverse", tmp_path)
    write_lines(randomized, [json.dumps({"prompt": "P0", "completion": " X"})])
    with pytest.raises(DataError, match="1 rows but p2d_reverse_prompts_test.jsonl has 3"):
        load_task("n2d-reverse", tmp_path)
