import collections
import json
import re
import string

import pytest

from bico.axioms.generator import EVAL_SETS, EVAL_SPECS, TRAIN_MIXES, assert_disjoint, generate_eval, generate_train
from bico.axioms.generator import instance_text, read_jsonl, write_jsonl
from bico.data import DataError


SENTENCE = re.compile(r"([A-Za-z0-9]+) causes ([A-Za-z0-9]+)\.")
QUESTION = re.compile(r"Does ([A-Za-z0-9]+) cause ([A-Za-z0-9]+)\?")


def parse(row):
    # The premise and question read back from the text alone, with nothing of the generator.
    sentences = row["premise"].split(". ")
    edges = [list(SENTENCE.fullmatch(s if s.endswith(".") else s + ".").groups()) for s in sentences]
    return edges, list(QUESTION.fullmatch(row["question"]).groups())


def reaches(edges, cause, effect):
    # Floyd-Warshall on a 0/1 matrix over the names in the text; the generator uses a search instead.
    names = sorted({name for edge in edges for name in edge} | {cause, effect})
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    path = [[0] * n for _ in range(n)]
    for a, b in edges:
        path[index[a]][index[b]] = 1
    for k in range(n):
        for i in range(n):
            for j in range(n):
                path[i][j] = path[i][j] or (path[i][k] and path[k][j])
    return bool(path[index[cause]][index[effect]])


@pytest.fixture(scope="module")
def eval_sets():
    return {name: generate_eval(name, num_instances=200, seed=0) for name in EVAL_SETS}


@pytest.fixture(scope="module")
def train_sets():
    return {mix: generate_train(mix, num_instances=1200, seed=0) for mix in TRAIN_MIXES}


def all_rows(eval_sets, train_sets):
    return [row for rows in [*eval_sets.values(), *train_sets.values()] for row in rows]


def test_text_and_label_agree_with_an_independent_closure(eval_sets, train_sets):
    for row in all_rows(eval_sets, train_sets):
        edges, query = parse(row)
        assert edges == row["edges"] and query == row["query"]
        assert query[0] != query[1] and set(query) <= set(row["nodes"])
        assert row["label"] == ("Yes" if reaches(edges, *query) else "No"), row
        assert instance_text(row) == row["premise"] + " " + row["question"]
        assert row["num_edges"] == len(edges)


def test_names_unique_alphanumeric_and_sized(eval_sets, train_sets):
    for row in all_rows(eval_sets, train_sets):
        nodes = row["nodes"]
        assert len(nodes) == len(set(nodes)) == row["num_nodes"]
        assert {name for edge in row["edges"] for name in edge} == set(nodes)  # every node is in the text
        assert all(set(name) <= set(string.ascii_letters + string.digits) for name in nodes)
        assert not {"Yes", "No"} & set(nodes)
        low, high = (8, 10) if row["set"] == "name-shift" else (1, 3)
        assert all(low <= len(name) <= high for name in nodes)
    lengths = collections.Counter(len(name) for row in eval_sets["name-shift"] for name in row["nodes"])
    assert set(lengths) == {8, 9, 10}


@pytest.mark.parametrize("num_instances", [200, 201])
def test_classes_balanced_overall_and_per_stratum(num_instances):
    sets = [generate_eval(name, num_instances) for name in EVAL_SETS] + [generate_train("TS1", num_instances)]
    for rows in sets:
        assert len(rows) == num_instances
        labels = collections.Counter(row["label"] for row in rows)
        assert (labels["Yes"], labels["No"]) == (num_instances - num_instances // 2, num_instances // 2)
        per_stratum = collections.defaultdict(collections.Counter)
        for row in rows:
            per_stratum[row["kind"], row["num_nodes"]][row["label"]] += 1
        assert all(abs(c["Yes"] - c["No"]) <= 1 for c in per_stratum.values())


def test_eval_set_parameters(eval_sets):
    for name, rows in eval_sets.items():
        spec = EVAL_SPECS[name]
        assert {row["set"] for row in rows} == {name}
        assert {row["num_nodes"] for row in rows} == set(spec.node_counts)
        assert {row["kind"] for row in rows} == set(spec.kinds)
        sizes = collections.Counter((row["kind"], row["num_nodes"]) for row in rows).values()
        assert max(sizes) - min(sizes) <= 2  # equal shares (branching counts whole graphs)
    assert {row["num_nodes"] for row in eval_sets["length-sequential"]} == set(range(7, 16))
    assert {row["num_nodes"] for row in eval_sets["name-shift"]} == set(range(3, 10))
    assert {row["num_nodes"] for row in eval_sets["reversed"]} == {3, 4, 5, 6}
    assert {row["num_nodes"] for row in eval_sets["branching-2n"]} == {5, 8, 10, 12}


def test_sequential_and_reversed_chains(eval_sets):
    for row in eval_sets["length-sequential"]:
        nodes = row["nodes"]
        assert row["edges"] == [[a, b] for a, b in zip(nodes, nodes[1:])]
    for row in eval_sets["reversed"]:
        nodes = row["nodes"]
        # Every edge points backward, and the text starts at the sink (the node that causes nothing).
        assert row["edges"] == [[b, a] for a, b in zip(nodes, nodes[1:])]
        sink = row["edges"][0][1]
        assert not [edge for edge in row["edges"] if edge[0] == sink]
        assert row["premise"].startswith(f"{nodes[1]} causes {sink}.")
        assert row["premise"].endswith(f"causes {nodes[-2]}.")


def test_shuffled_is_a_permutation_of_a_sequential_chain(eval_sets):
    for row in eval_sets["shuffled"]:
        nodes = row["nodes"]
        chain = [f"{a} causes {b}." for a, b in zip(nodes, nodes[1:])]
        sentences = SENTENCE.findall(row["premise"])
        assert sorted(f"{a} causes {b}." for a, b in sentences) == sorted(chain)
        assert [f"{a} causes {b}." for a, b in sentences] != chain


@pytest.mark.parametrize("name, factor", [("branching-1.4n", 1.4), ("branching-2n", 2)])
def test_branching_edge_counts_and_one_question_of_each_answer(eval_sets, name, factor):
    expected = {5: 7, 8: 11, 10: 14, 12: 16} if factor == 1.4 else {5: 10, 8: 16, 10: 20, 12: 24}
    by_premise = collections.defaultdict(list)
    for row in eval_sets[name]:
        assert row["num_edges"] == len(row["edges"]) == expected[row["num_nodes"]]
        assert len({tuple(edge) for edge in row["edges"]}) == row["num_edges"]
        by_premise[row["premise"]].append(row["label"])
    assert all(sorted(labels) == ["No", "Yes"] for labels in by_premise.values())


def test_train_mixes():
    assert sum(TRAIN_MIXES["TS1"].values()) == pytest.approx(1) == sum(TRAIN_MIXES["TS2"].values())
    for mix, expected in [("TS1", (101, 73, 12)), ("TS2", (132, 42, 0)), ("OCC", (1, 0, 0))]:
        rows = generate_train(mix, 1860)
        kinds = collections.Counter(row["kind"] for row in rows)
        counts = [kinds[kind] for kind in ("sequential", "flipped", "reversed")]
        assert counts == pytest.approx([1860 * n / sum(expected) for n in expected], abs=1)
        assert {row["set"] for row in rows} == {mix}
        assert {row["num_nodes"] for row in rows} == {3, 4, 5, 6}
    custom = generate_train({"sequential": 1, "reversed": 3}, 400, min_nodes=7, max_nodes=8)
    assert collections.Counter(row["kind"] for row in custom) == {"reversed": 300, "sequential": 100}
    assert {row["num_nodes"] for row in custom} == {7, 8} and {row["set"] for row in custom} == {"custom"}


def test_deterministic_in_the_seed():
    assert generate_train("TS1", 300, seed=5) == generate_train("TS1", 300, seed=5)
    assert generate_eval("branching-2n", 50, seed=5) == generate_eval("branching-2n", 50, seed=5)
    premises = [row["premise"] for row in generate_train("TS1", 300, seed=5)]
    assert len(set(premises) & {row["premise"] for row in generate_train("TS1", 300, seed=6)}) < 5
    assert generate_eval("reversed", 50, seed=0) != generate_eval("reversed", 50, seed=1)
    assert {row["seed"] for row in generate_eval("reversed", 50, seed=7)} == {7}


def test_train_excludes_given_premises(eval_sets, train_sets):
    first = generate_train("TS1", 300, seed=3)
    again = generate_train("TS1", 300, seed=3, exclude=first)
    assert_disjoint(again, first)
    assert len(again) == 300 and collections.Counter(row["label"] for row in again) == {"Yes": 150, "No": 150}
    assert generate_train("TS1", 300, seed=3, exclude=[row["premise"] for row in first]) == again
    with pytest.raises(ValueError) as info:
        assert_disjoint(first[:10], [first[4]])
    assert repr(first[4]["premise"]) in str(info.value) and "TS1" in str(info.value)
    for rows in train_sets.values():
        assert_disjoint(rows, [row for rows in eval_sets.values() for row in rows])


def test_jsonl_round_trip(tmp_path, eval_sets, train_sets):
    for name, rows in [*eval_sets.items(), *train_sets.items()]:
        path = write_jsonl(rows, tmp_path / "sets" / f"{name}.jsonl")
        assert read_jsonl(path) == rows


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: "{not json", "invalid JSON"),
        (lambda row: json.dumps([row]), "expected a JSON object with `premise`, `question`, `label`,"),
        (lambda row: json.dumps({k: v for k, v in row.items() if k != "edges"}), "missing field `edges`"),
        (lambda row: json.dumps({**row, "num_nodes": "3"}), "field `num_nodes` must be an integer, got str"),
        (lambda row: json.dumps({**row, "seed": True}), "field `seed` must be an integer, got bool"),
        (lambda row: json.dumps({**row, "label": "yes"}), "field `label` must be 'Yes' or 'No', got 'yes'"),
        (lambda row: json.dumps({**row, "nodes": row["nodes"][:-1]}), "field `nodes` must be 3 (`num_nodes`)"),
        (lambda row: json.dumps({**row, "query": ["a"]}), "field `query` must hold [cause, effect] pairs"),
        (lambda row: json.dumps({**row, "premise": row["premise"][:-1]}), "`premise` is not the text of `edges`"),
        (lambda row: json.dumps({**row, "question": "Does x cause y?"}), "`question` is not the text of `query`"),
        (lambda row: json.dumps({**row, "label": "No"}), "field `label` is 'No' but `edges` answer 'Yes'"),
    ],
)
def test_read_jsonl_errors_name_path_and_line(tmp_path, change, message):
    rows = generate_eval("length-sequential", 4)
    row = {
        **rows[0], "nodes": ["a", "b", "c"], "num_nodes": 3, "edges": [["a", "b"], ["b", "c"]], "query": ["a", "c"],
        "premise": "a causes b. b causes c.", "question": "Does a cause c?", "label": "Yes",
    }
    lines = [json.dumps(rows[1]), "", json.dumps(row), change(row), json.dumps(rows[2])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:4: ") and message in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`mix` must be one of TS1, TS2, OCC or a dict .*; got 'TS3'"):
        generate_train("TS3", 10)
    with pytest.raises(ValueError, match="`mix` keys must be among sequential, flipped, reversed; got 'shuffled'"):
        generate_train({"sequential": 1, "shuffled": 1}, 10)
    with pytest.raises(ValueError, match="`mix` weights must be finite, non-negative"):
        generate_train({"sequential": -1, "flipped": 2}, 10)
    with pytest.raises(ValueError, match="`mix` weights"):
        generate_train({"sequential": 0}, 10)
    with pytest.raises(ValueError, match="`num_instances` must be a positive integer; got 0"):
        generate_train("TS2", 0)
    with pytest.raises(ValueError, match="2 <= min_nodes <= max_nodes; got 5 and 4"):
        generate_train("TS2", 10, min_nodes=5, max_nodes=4)
    with pytest.raises(ValueError) as info:
        generate_eval("length", 10)
    assert "`name` must be one of " + ", ".join(EVAL_SETS) + "; got 'length'" in str(info.value)


def test_package_exports_the_data_api():
    import bico.axioms

    data_api = {"generate_train", "generate_eval", "EVAL_SETS", "TRAIN_MIXES", "build_tokenizer", "encode"}
    assert data_api <= set(bico.axioms.__all__)
    assert all(hasattr(bico.axioms, name) for name in bico.axioms.__all__)
