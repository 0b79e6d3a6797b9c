"""Causal graphs of the transitivity data: node names, chains, random DAGs, reachability and their text.

The graphs of Vashishtha et al. (arXiv 2407.07612; DESIGN.md section 9), written out as
`A causes B.` sentences. An edge is a `[cause, effect]` list of two node names (a list rather than a
tuple, so a row reads back from JSON unchanged). The label of a question `Does A cause B?` is whether
a directed path leads from A to B (the transitivity axiom); A and B are always distinct.

Graph kinds (`make_edges`); chains list their sentences in chain order, node 0 first:
- `sequential`: `v0 -> v1 -> ... -> v(n-1)`;
- `flipped`: each chain edge points backward with probability 1/2, independently (forks and
  colliders appear);
- `reversed`: every chain edge points backward, so the text starts at the sink end;
- `shuffled`: a sequential chain whose sentences are listed in a random order other than the chain's;
- `branching`: an Erdős-Rényi DAG with exactly `num_edges` edges and no isolated node.
"""

from __future__ import annotations

import random
import string
from itertools import combinations


NAME_CHARACTERS = string.ascii_letters + string.digits
# The words of the text; a node named `No` or `Yes` would be read as the answer token, so names avoid them.
KEYWORDS = ("causes", "cause", "Does", "Yes", "No")
ANSWERS = ("Yes", "No")
GRAPH_KINDS = ("sequential", "flipped", "reversed", "shuffled", "branching")


def sample_names(rng: random.Random, num_nodes: int, min_length: int = 1, max_length: int = 3) -> list[str]:
    """Distinct random node names of letters and digits, none of them a keyword.

    Each name draws its length uniformly from `[min_length, max_length]`, then each character uniformly
    from `NAME_CHARACTERS` (as the paper's files do; a 1-character name is then as likely as a 3-character one).

    Args:
        rng (`random.Random`): The source of randomness.
        num_nodes (`int`): How many names.
        min_length, max_length (`int`, *optional*, default 1 and 3): The name length range, inclusive.

    Returns:
        `list[str]`: `num_nodes` distinct names, e.g. `["EX", "T", "9", "W"]`.
    """
    lengths = range(min_length, max_length + 1)
    available = sum(len(NAME_CHARACTERS) ** n for n in lengths) - sum(len(word) in lengths for word in KEYWORDS)
    if not 1 <= min_length <= max_length or num_nodes > available:
        raise ValueError(
            f"`num_nodes` = {num_nodes} distinct names of {min_length}-{max_length} characters are not available."
        )
    names: dict[str, None] = {}  # insertion-ordered set
    while len(names) < num_nodes:
        name = "".join(rng.choices(NAME_CHARACTERS, k=rng.randint(min_length, max_length)))
        if name not in KEYWORDS:
            names[name] = None
    return list(names)


def make_edges(rng: random.Random, kind: str, nodes: list[str], num_edges: int | None = None) -> list[list[str]]:
    """The edges of one graph of `kind` over `nodes`, in the order the premise lists them.

    Args:
        rng (`random.Random`): The source of randomness.
        kind (`str`): One of `GRAPH_KINDS` (see the module docstring).
        nodes (`list[str]`): Distinct names; for chains, in chain order (at least 2 nodes, 3 for
            `shuffled`); for `branching`, in a random topological order (every edge points from an
            earlier to a later node).
        num_edges (`int`, *optional*): For `branching` only: the number of edges, between
            `len(nodes) / 2` (so no node is isolated) and `len(nodes) * (len(nodes) - 1) / 2`.

    Returns:
        `list[list[str]]`: `[cause, effect]` pairs; `len(nodes) - 1` of them for chains.
    """
    if kind not in GRAPH_KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(GRAPH_KINDS)}; got {kind!r}.")
    if kind == "branching":
        return _random_dag(rng, nodes, num_edges)
    forward = [[a, b] for a, b in zip(nodes, nodes[1:])]
    if kind == "sequential":
        return forward
    if kind == "flipped":
        return [edge[::-1] if rng.random() < 0.5 else edge for edge in forward]
    if kind == "reversed":
        return [edge[::-1] for edge in forward]
    if len(forward) < 2:
        raise ValueError(f"a shuffled chain needs at least 3 `nodes`; got {len(nodes)}.")
    order = list(range(len(forward)))
    while order == sorted(order):
        rng.shuffle(order)
    return [forward[i] for i in order]


def _random_dag(rng: random.Random, nodes: list[str], num_edges: int | None) -> list[list[str]]:
    # `nodes` is the topological order: keeping only pairs (earlier, later) is the paper's "lower
    # triangle of a randomly permuted Erdős-Rényi graph". Unlike the paper's files, every node gets
    # an edge, so every node of `num_nodes` is named in the premise.
    pairs = list(combinations(nodes, 2))
    if num_edges is None or not len(nodes) / 2 <= num_edges <= len(pairs):
        raise ValueError(
            f"`num_edges` must be between {len(nodes) / 2:g} and {len(pairs)} for {len(nodes)} nodes; got {num_edges}."
        )
    while True:
        edges = rng.sample(pairs, num_edges)
        if len({node for edge in edges for node in edge}) == len(nodes):
            break
    # The paper lists the edges grouped by cause, in a random node order unrelated to the causal one.
    rank = {node: i for i, node in enumerate(rng.sample(nodes, len(nodes)))}
    return [list(edge) for edge in sorted(edges, key=lambda edge: (rank[edge[0]], rank[edge[1]]))]


def descendants(nodes: list[str], edges: list[list[str]]) -> dict[str, set[str]]:
    """Every node's descendants: the nodes a directed path of one or more edges reaches.

    Args:
        nodes (`list[str]`): All node names.
        edges (`list[list[str]]`): `[cause, effect]` pairs over `nodes`.

    Returns:
        `dict[str, set[str]]`: `descendants(...)[a]` holds `b` exactly when `Does a cause b?` is Yes.
    """
    children: dict[str, list[str]] = {node: [] for node in nodes}
    for cause, effect in edges:
        children[cause].append(effect)
    reached: dict[str, set[str]] = {}
    for start in nodes:
        seen: set[str] = set()
        stack = list(children[start])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(children[node])
        reached[start] = seen
    return reached


def query_pairs(nodes: list[str], edges: list[list[str]]) -> dict[str, list[list[str]]]:
    """All ordered pairs of distinct nodes, grouped by their answer.

    A No pair is any pair without a directed path: the reverse of a Yes pair, or two nodes that no
    path joins in either direction (e.g. the two causes of a collider). Drawing a question uniformly
    from one group, after choosing its answer, is how every set balances its classes.

    Args:
        nodes (`list[str]`): All node names.
        edges (`list[list[str]]`): `[cause, effect]` pairs over `nodes`.

    Returns:
        `dict[str, list[list[str]]]`: `{"Yes": [[a, b], ...], "No": [[a, b], ...]}`, in node order.
    """
    reached = descendants(nodes, edges)
    pairs: dict[str, list[list[str]]] = {answer: [] for answer in ANSWERS}
    for a in nodes:
        for b in nodes:
            if a != b:
                pairs["Yes" if b in reached[a] else "No"].append([a, b])
    return pairs


def premise_text(edges: list[list[str]]) -> str:
    """`[["EX", "T"], ["T", "9"]]` -> `"EX causes T. T causes 9."`"""
    return " ".join(f"{cause} causes {effect}." for cause, effect in edges)


def question_text(query: list[str]) -> str:
    """`["EX", "9"]` -> `"Does EX cause 9?"`"""
    return f"Does {query[0]} cause {query[1]}?"
