import itertools
import random
import string

import pytest

from bico.axioms.graphs import (
    GRAPH_KINDS,
    KEYWORDS,
    descendants,
    make_edges,
    premise_text,
    query_pairs,
    question_text,
    sample_names,
)


def closure(nodes, edges):
    # Warshall's transitive closure on a boolean matrix: the reference for `descendants`' search.
    index = {node: i for i, node in enumerate(nodes)}
    n = len(nodes)
    reach = [[False] * n for _ in range(n)]
    for cause, effect in edges:
        reach[index[cause]][index[effect]] = True
    for k in range(n):
        for i in range(n):
            if reach[i][k]:
                for j in range(n):
                    reach[i][j] = reach[i][j] or reach[k][j]
    return {(nodes[i], nodes[j]) for i in range(n) for j in range(n) if reach[i][j]}


def test_sample_names_distinct_alphanumeric_and_never_a_keyword():
    rng = random.Random(0)
    for _ in range(200):
        names = sample_names(rng, 15)
        assert len(set(names)) == 15
        assert all(1 <= len(name) <= 3 and set(name) <= set(string.ascii_letters + string.digits) for name in names)
    lengths = {len(name) for _ in range(50) for name in sample_names(rng, 9, 8, 10)}
    assert lengths == {8, 9, 10}
    # Every 2-character name there is, except the answer token "No".
    every_pair = {"".join(pair) for pair in itertools.product(string.ascii_letters + string.digits, repeat=2)}
    assert set(sample_names(rng, len(every_pair) - 1, 2, 2)) == every_pair - set(KEYWORDS)
    with pytest.raises(ValueError, match="`num_nodes` = 3844 distinct names of 2-2 characters"):
        sample_names(rng, len(every_pair), 2, 2)


def test_chains():
    rng = random.Random(1)
    nodes = ["a", "b", "c", "d", "e"]
    assert make_edges(rng, "sequential", nodes) == [["a", "b"], ["b", "c"], ["c", "d"], ["d", "e"]]
    assert make_edges(rng, "reversed", nodes) == [["b", "a"], ["c", "b"], ["d", "c"], ["e", "d"]]
    shuffled = make_edges(rng, "shuffled", nodes)
    assert sorted(shuffled) == make_edges(rng, "sequential", nodes) != shuffled
    assert make_edges(rng, "shuffled", ["a", "b", "c"]) == [["b", "c"], ["a", "b"]]  # the only other order
    backward = 0
    for _ in range(500):
        flipped = make_edges(rng, "flipped", nodes)
        assert [sorted(edge) for edge in flipped] == make_edges(rng, "sequential", nodes)
        backward += sum(edge[0] > edge[1] for edge in flipped)
    assert 0.45 < backward / 2000 < 0.55


@pytest.mark.parametrize("num_nodes, num_edges", [(5, 7), (5, 10), (8, 11), (12, 16), (12, 24)])
def test_branching_is_a_dag_with_exact_edges_and_no_isolated_node(num_nodes, num_edges):
    rng = random.Random(num_edges)
    nodes = [f"n{i}" for i in range(num_nodes)]  # the topological order
    for _ in range(20):
        edges = make_edges(rng, "branching", nodes, num_edges)
        assert len(edges) == len({tuple(edge) for edge in edges}) == num_edges
        assert all(nodes.index(cause) < nodes.index(effect) for cause, effect in edges)
        assert {node for edge in edges for node in edge} == set(nodes)
        # Listed grouped by cause: a cause never comes back after another cause's sentences.
        causes = [cause for cause, _ in edges]
        assert causes == sorted(causes, key=causes.index)


def test_descendants_and_query_pairs_match_a_transitive_closure():
    rng = random.Random(2)
    for _ in range(300):
        nodes = sample_names(rng, rng.randint(2, 9))
        # Any directed graph, cycles and self-loops included.
        edges = [[rng.choice(nodes), rng.choice(nodes)] for _ in range(rng.randint(0, 12))]
        reach = closure(nodes, edges)
        found = descendants(nodes, edges)
        assert {(a, b) for a in nodes for b in found[a]} == reach
        pairs = query_pairs(nodes, edges)
        assert {tuple(p) for p in pairs["Yes"]} == {(a, b) for a, b in reach if a != b}
        assert sorted(pairs["Yes"] + pairs["No"]) == sorted([a, b] for a in nodes for b in nodes if a != b)


def test_text():
    edges = [["EX", "T"], ["T", "9"], ["9", "W"]]
    assert premise_text(edges) == "EX causes T. T causes 9. 9 causes W."
    assert question_text(["EX", "9"]) == "Does EX cause 9?"


def test_bad_arguments():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="`kind` must be one of " + ", ".join(GRAPH_KINDS) + "; got 'tree'"):
        make_edges(rng, "tree", ["a", "b"])
    with pytest.raises(ValueError, match="at least 3 `nodes`; got 2"):
        make_edges(rng, "shuffled", ["a", "b"])
    with pytest.raises(ValueError, match="`num_edges` must be between 2.5 and 10 for 5 nodes; got 11"):
        make_edges(rng, "branching", list("abcde"), 11)
    with pytest.raises(ValueError, match="`num_edges`.*got None"):
        make_edges(rng, "branching", list("abcde"))
