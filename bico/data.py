"""Loading and validating name-description JSONL data (the layout of Berglund et al., arXiv 2309.12288).

A data directory holds JSONL files whose rows are `{"prompt": str, "completion": str}`; the training
text of a row is `prompt + completion` (+ EOS, added by the collators). The BICO paper (arXiv
2311.07468, section 5) trains on `all_prompts_train.jsonl` and tests on the files of the five tasks in
`TASKS`. The project's own generated set, with the same file names as the real set, ships inside the
package (`DEFAULT_DATA_DIR` = `bico/dataset/`, which the checkout's `data/` links to); pass `data_dir`
to use another directory.

Every malformed file raises `DataError` with one line, `path:line: what is wrong` (`path: what is
wrong` when the problem concerns the whole file, e.g. a missing file).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datasets import Dataset


# Package data, so every kind of install has it; the checkout's `data/` is a link to the same files.
DEFAULT_DATA_DIR = Path(str(importlib.resources.files("bico") / "dataset"))
TRAIN_FILE = "all_prompts_train.jsonl"
REQUIRED_FIELDS = ("prompt", "completion")
# The JSON type each required field must have, for `read_numbered_jsonl`.
REQUIRED_TYPES = dict.fromkeys(REQUIRED_FIELDS, str)
_JSON_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object"
}


class DataError(ValueError):
    """A data file is missing or malformed; the message is `path:line: what is wrong` (or `path: ...`)."""


@dataclass(frozen=True)
class Task:
    """One evaluation task of DESIGN.md section 2.

    Args:
        name (`str`): The task name used on the command line, e.g. `"n2d-reverse"`.
        file (`str`): The test file in the data directory.
        answer (`str`): What the completion is: `"name"`, `"description"` or `"either"` (the `both`
            task mixes the two directions).
        randomized_file (`str` or `None`): The same prompts with another person's answer as the
            completion (Berglund's log-probability baseline), where the data set has one.
    """

    name: str
    file: str
    answer: Literal["name", "description", "either"]
    randomized_file: str | None = None


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("n2d", "p2d_prompts_test.jsonl", "description"),
        Task("n2d-reverse", "p2d_reverse_prompts_test.jsonl", "name", "p2d_reverse_prompts_test_randomized.jsonl"),
        Task("d2n", "d2p_prompts_test.jsonl", "name"),
        Task(
            "d2n-reverse",
            "d2p_reverse_prompts_test.jsonl",
            "description",
            "d2p_reverse_prompts_test_randomized.jsonl",
        ),
        Task("both", "both_prompts_test.jsonl", "either"),
    )
}


def resolve_tasks(names: str | Iterable[str]) -> list[str]:
    """Expand `"all"` and check task names; keeps the given order and drops repeats.

    Args:
        names (`str` or `Iterable[str]`): Task names from `TASKS`, or `"all"`.

    Returns:
        `list[str]`: Task names, e.g. `resolve_tasks(["all"]) == ["n2d", "n2d-reverse", "d2n", "d2n-reverse", "both"]`.
    """
    if isinstance(names, str):
        names = [names]
    resolved: list[str] = []
    for name in names:
        if name == "all":
            expanded = list(TASKS)
        elif name in TASKS:
            expanded = [name]
        else:
            choices = ", ".join([*TASKS, "all"])
            raise ValueError(f"`task` must be one of {choices}; got {name!r}.")
        resolved.extend(task for task in expanded if task not in resolved)
    if not resolved:
        raise ValueError(f"`task` is empty; give one or more of {', '.join([*TASKS, 'all'])}.")
    return resolved


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir` as a `Path`; None is the project's packaged set (`DEFAULT_DATA_DIR`)."""
    return DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)


def _find_file(data_dir: Path, file: str) -> Path:
    path = data_dir / file
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: data directory not found; pass `data_dir` (`--data_dir`) pointing to a directory "
            f"of name-description JSONL files, e.g. ../shared/data/reversal_curse, or omit it to use {DEFAULT_DATA_DIR}."
        )
    if not path.is_file():
        present = sorted(p.name for p in data_dir.glob("*.jsonl"))
        raise DataError(
            f"{path}: file not found in {data_dir} (it holds: {', '.join(present) or 'no .jsonl files'}); "
            f"pass the directory that contains {file} as `data_dir` (`--data_dir`)."
        )
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and validate a JSONL file of `{"prompt": str, "completion": str}` rows.

    Blank lines are skipped; extra fields are kept.

    Args:
        path (`str` or `os.PathLike`): The file.

    Returns:
        `list[dict]`: One dict per non-blank line.

    Raises:
        `DataError`: `path: file not found.`, `path:1: empty file ...`, or `path:line: ...` for a
        line that is not valid JSON or not an object, or lacks `prompt`/`completion`, or has one
        that is not a string.
    """
    return [row for _, row in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: str | os.PathLike, fields: Mapping[str, type] = REQUIRED_TYPES) -> list[tuple[int, dict]]:
    """Read a JSONL file of objects that have `fields`, keeping each row's line number.

    The generic part of `read_jsonl`, for other row layouts (e.g. `bico.axioms`). Blank lines are
    skipped; extra fields are kept.

    Args:
        path (`str` or `os.PathLike`): The file.
        fields (`Mapping[str, type]`, *optional*, defaults to `{"prompt": str, "completion": str}`):
            Each required field and the JSON type its value must have exactly: `str`, `int`, `float`,
            `bool`, `list` or `dict` (so `true` is not an `int`).

    Returns:
        `list[tuple[int, dict]]`: (line number, row) for each non-blank line, so later checks can
        name the line of a row.

    Raises:
        `DataError`: as `read_jsonl`, for the given `fields`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    rows = []
    with open(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 text ({error.reason}).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object with {_name_fields(fields)}, "
                    f"got {type(row).__name__}."
                )
            for field, expected in fields.items():
                if field not in row:
                    raise DataError(f"{path}:{line_number}: missing field `{field}`.")
                # json.loads builds exact built-in types, so `is` rejects a bool where an int is due.
                if type(row[field]) is not expected:
                    raise DataError(
                        f"{path}:{line_number}: field `{field}` must be {_JSON_TYPE_NAMES[expected]}, "
                        f"got {type(row[field]).__name__}."
                    )
            rows.append((line_number, row))
    if not rows:
        raise DataError(f"{path}:1: empty file; expected JSONL rows with {_name_fields(fields)}.")
    return rows


def _name_fields(fields: Iterable[str]) -> str:
    """`["prompt", "completion"]` -> "`prompt` and `completion`"; three or more get commas before the "and"."""
    names = [f"`{field}`" for field in fields]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _to_dataset(rows: list[dict], columns: Iterable[str] = REQUIRED_FIELDS) -> Dataset:
    return Dataset.from_dict({column: [row[column] for row in rows] for column in columns})


def load_train(data_dir: str | os.PathLike | None = None, file: str = TRAIN_FILE) -> Dataset:
    """Load a training file as a `datasets.Dataset` with columns `prompt` and `completion`.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            The data directory; defaults to the project's generated set in `data/` (`DEFAULT_DATA_DIR`).
        file (`str`, *optional*, defaults to `"all_prompts_train.jsonl"`):
            The file name inside `data_dir`, e.g. `"p2d_prompts_train.jsonl"`.

    Returns:
        `datasets.Dataset`: Rows in file order.
    """
    path = _find_file(resolve_data_dir(data_dir), file)
    return _to_dataset(read_jsonl(path))


def load_task(task: str | Task, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load the test file of one task of `TASKS`.

    Args:
        task (`str` or `Task`): A task name (`"n2d"`, `"n2d-reverse"`, `"d2n"`, `"d2n-reverse"`,
            `"both"`) or a `Task`.
        data_dir (`str` or `os.PathLike`, *optional*):
            The data directory; defaults to `DEFAULT_DATA_DIR`.

    Returns:
        `datasets.Dataset`: Columns `prompt` and `completion`, plus `random_completion` (another
        person's answer for the same prompt) when the task has a randomized file and it exists in
        `data_dir`.

    Raises:
        `ValueError`: unknown task name. `DataError`: missing or malformed file, or a randomized file
        whose prompts do not match the test file row by row.
    """
    if not isinstance(task, Task):
        task = TASKS[resolve_tasks([task])[0]]
    data_dir = resolve_data_dir(data_dir)
    rows = read_jsonl(_find_file(data_dir, task.file))
    columns = list(REQUIRED_FIELDS)
    if task.randomized_file is not None and (data_dir / task.randomized_file).is_file():
        randomized_path = data_dir / task.randomized_file
        randomized = read_numbered_jsonl(randomized_path)
        if len(randomized) != len(rows):
            raise DataError(
                f"{randomized_path}: {len(randomized)} rows but {task.file} has {len(rows)}; "
                "the randomized file must have the same prompts in the same order."
            )
        for index, (row, (line_number, random_row)) in enumerate(zip(rows, randomized), start=1):
            if random_row["prompt"] != row["prompt"]:
                raise DataError(
                    f"{randomized_path}:{line_number}: prompt differs from row {index} of {task.file}."
                )
            row["random_completion"] = random_row["completion"]
        columns.append("random_completion")
    return _to_dataset(rows, columns)
