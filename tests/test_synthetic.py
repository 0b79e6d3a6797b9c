import json
from collections import Counter

import pytest

from bico.data import load_task, read_jsonl
from bico.synthetic import (
    D2P_TEMPLATES,
    GROUPS,
    P2D_TEMPLATES,
    generate,
    make_people,
    write_dataset,
)


ROW_COUNTS = {
    "all_prompts_train.jsonl": 3600,
    "p2d_prompts_train.jsonl": 900,
    "d2p_prompts_train.jsonl": 900,
    "both_prompts_train.jsonl": 1800,
    "p2d_prompts_test.jsonl": 300,
    "p2d_reverse_prompts_test.jsonl": 300,
    "p2d_reverse_prompts_test_randomized.jsonl": 300,
    "d2p_prompts_test.jsonl": 300,
    "d2p_reverse_prompts_test.jsonl": 300,
    "d2p_reverse_prompts_test_randomized.jsonl": 300,
    "both_prompts_test.jsonl": 600,
    "validation_prompts.jsonl": 300,
}


@pytest.fixture(scope="module")
def files():
    return generate(seed=0)


@pytest.fixture(scope="module")
def people():
    return {group: [p for p in make_people(0) if p.group == group] for group in GROUPS}


def names(group):
    return {p.name for p in group}


def descriptions(group):
    return set().union(*(p.descriptions() for p in group))


def test_files_and_row_counts(files):
    assert {name: len(rows) for name, rows in files.items()} == ROW_COUNTS
    for name, rows in files.items():
        for row in rows:
            assert set(row) == {"prompt", "completion"}
            assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
            assert row["prompt"] == row["prompt"].strip() and row["prompt"]
            if name != "validation_prompts.jsonl":
                assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")


def test_all_train_is_the_concatenation(files):
    assert files["all_prompts_train.jsonl"] == (
        files["p2d_prompts_train.jsonl"] + files["d2p_prompts_train.jsonl"] + files["both_prompts_train.jsonl"]
    )


def test_people_groups_and_unique_names(people):
    everyone = [p for group in GROUPS for p in people[group]]
    assert [len(people[g]) for g in GROUPS] == [30, 30, 30]
    assert len({p.name for p in everyone}) == 90
    # First names and surnames are each unique, so the first name alone identifies a person.
    assert len({p.name.split()[0] for p in everyone}) == 90
    assert len({p.name.split()[1] for p in everyone}) == 90
    assert all(len(p.name.split()) == 2 for p in everyone)
    assert len({p.work for p in everyone}) == 90
    # Each description wording belongs to exactly one person.
    wordings = Counter(w for p in everyone for w in p.descriptions())
    assert max(wordings.values()) == 1


def test_deterministic_and_seed_dependent(tmp_path):
    # Across processes too: test_committed_data_is_seed_0 compares with files written earlier.
    write_dataset(tmp_path / "a", seed=0)
    write_dataset(tmp_path / "b", seed=0)
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
    assert generate(seed=1) != generate(seed=0)
    assert {p.name for p in make_people(1)} != {p.name for p in make_people(0)}


def test_committed_data_is_seed_0(data_dir, files):
    # `python scripts/make_data.py` regenerates data/ byte for byte.
    on_disk = sorted(p.name for p in data_dir.glob("*.jsonl"))
    assert on_disk == sorted(files)
    for name, rows in files.items():
        expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        assert (data_dir / name).read_text(encoding="utf-8") == expected, name
    assert (data_dir / "README.md").is_file()
    total = sum(p.stat().st_size for p in data_dir.iterdir())
    assert total < 1_500_000


def test_templates_split_and_disjoint(files, people):
    for templates in (P2D_TEMPLATES, D2P_TEMPLATES):
        prompts = [prompt for prompt, _ in templates]
        assert len(prompts) == 40 and len(set(prompts)) == 40
    p2d_person = people["p2d"][0]
    train_prompts = {r["prompt"] for r in files["p2d_prompts_train.jsonl"][:30]}
    test_prompts = {r["prompt"] for r in files["p2d_prompts_test.jsonl"][:10]}
    assert len(train_prompts) == 30 and len(test_prompts) == 10
    assert not train_prompts & test_prompts
    assert all(p2d_person.name in prompt for prompt in train_prompts | test_prompts)
    # No test prompt, in any file, is a training prompt.
    all_train = {r["prompt"] for r in files["all_prompts_train.jsonl"]}
    for name, rows in files.items():
        if "test" in name or name == "validation_prompts.jsonl":
            assert not all_train & {r["prompt"] for r in rows}, name


def test_descriptions_are_reworded_across_templates(files, people):
    # Like the original: a person's description appears in several wordings.
    person = people["p2d"][0]
    completions = {r["completion"] for r in files["p2d_prompts_train.jsonl"][:30]}
    assert len(completions) == 3
    assert {c[1:-1] for c in completions} == person.descriptions()
    test_completions = {r["completion"] for r in files["p2d_prompts_test.jsonl"][:10]}
    assert len(test_completions) == 3


def test_rows_are_person_major(files, people):
    for i, person in enumerate(people["p2d"]):
        block = files["p2d_prompts_train.jsonl"][30 * i : 30 * (i + 1)]
        assert all(person.name in r["prompt"] for r in block)
        block = files["p2d_reverse_prompts_test.jsonl"][10 * i : 10 * (i + 1)]
        assert {r["completion"] for r in block} == {f" {person.name}"}
    for i, person in enumerate(people["both"]):
        assert files["both_prompts_train.jsonl"][30 * i]["prompt"].startswith(person.name)
        assert files["both_prompts_train.jsonl"][900 + 30 * i]["completion"].startswith(f" {person.name}")


def test_answers_belong_to_the_right_group(files, people):
    p2d, d2p, both = people["p2d"], people["d2p"], people["both"]

    def desc(row):
        completion = row["completion"]
        assert completion.endswith(".")
        return completion[1:-1]

    assert {r["completion"][1:] for r in files["p2d_reverse_prompts_test.jsonl"]} == names(p2d)
    assert {r["completion"][1:] for r in files["d2p_prompts_test.jsonl"]} == names(d2p)
    assert {desc(r) for r in files["p2d_prompts_test.jsonl"]} <= descriptions(p2d)
    assert {desc(r) for r in files["d2p_reverse_prompts_test.jsonl"]} <= descriptions(d2p)
    both_test = files["both_prompts_test.jsonl"]
    assert {desc(r) for r in both_test[:300]} <= descriptions(both)
    assert {r["completion"][1:] for r in both_test[300:]} == names(both)
    # Training rows: the p2d people are only ever named before their description, the d2p people after.
    for r in files["p2d_prompts_train.jsonl"]:
        assert desc(r) in descriptions(p2d)
    for r in files["d2p_prompts_train.jsonl"]:
        assert any(r["completion"].startswith(f" {n}") for n in names(d2p))
    train_text = "\n".join(r["prompt"] + r["completion"] for r in files["all_prompts_train.jsonl"])
    assert all(train_text.count(p.name) == 30 for p in p2d + d2p)
    assert all(train_text.count(p.name) == 60 for p in both)
    # The first name of validation_prompts is the p2d reverse answer's.
    for v, r in zip(files["validation_prompts.jsonl"], files["p2d_reverse_prompts_test.jsonl"]):
        assert v["prompt"] == r["prompt"] and r["completion"] == f" {v['completion']} " + r["completion"].split()[1]


def test_test_prompts_contain_the_right_fact(files, people):
    # Reverse prompts describe the person whose name is the answer (and no one else).
    by_name = {p.name: p for group in people.values() for p in group}
    for file in ("p2d_reverse_prompts_test.jsonl", "d2p_prompts_test.jsonl"):
        for r in files[file]:
            person = by_name[r["completion"][1:]]
            assert person.work in r["prompt"]
            assert sum(p.work in r["prompt"] for p in by_name.values()) == 1


def test_randomized_files(files, people):
    for file, group, answer in [
        ("p2d_reverse_prompts_test", people["p2d"], lambda r: r["completion"][1:]),
        ("d2p_reverse_prompts_test", people["d2p"], lambda r: r["completion"][1:-1]),
    ]:
        real, randomized = files[f"{file}.jsonl"], files[f"{file}_randomized.jsonl"]
        assert [r["prompt"] for r in real] == [r["prompt"] for r in randomized]
        # Always another person, and from the same group.
        assert all(a["completion"] != b["completion"] for a, b in zip(real, randomized))
        pool = names(group) if file.startswith("p2d") else descriptions(group)
        assert {answer(r) for r in randomized} <= pool
        assert len({answer(r) for r in randomized}) > 20


def test_no_berglund_names_or_works(files, people, berglund_dir):
    theirs = read_jsonl(berglund_dir / "d2p_prompts_test.jsonl") + read_jsonl(berglund_dir / "p2d_reverse_prompts_test.jsonl")
    their_names = {r["completion"].strip() for r in theirs}
    their_words = {w for n in their_names for w in n.split()}
    ours = [p for group in people.values() for p in group]
    assert not their_words & {w for p in ours for w in p.name.split()}
    their_text = (berglund_dir / "all_prompts_train.jsonl").read_text(encoding="utf-8")
    assert not any(p.work in their_text for p in ours)
    their_prompts = {r["prompt"] for r in read_jsonl(berglund_dir / "all_prompts_train.jsonl")}
    assert not their_prompts & {r["prompt"] for r in files["all_prompts_train.jsonl"]}


def test_load_task_reads_generated_set(data_dir, people):
    task = load_task("n2d-reverse", data_dir)
    assert set(task["completion"]) == {f" {n}" for n in names(people["p2d"])}
