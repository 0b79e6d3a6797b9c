"""Axiomatic training of causal transitivity (Vashishtha et al., arXiv 2407.07612; DESIGN.md section 9).

A transformer trained from scratch on symbolic demonstrations of one axiom, "if A causes B and B
causes C, then A causes C", answers `Does A cause C?` with Yes or No on graphs unlike its training
chains: longer chains, longer names, reversed or shuffled sentences, branching DAGs. This subpackage
generates the training mixes and evaluation sets (`generator`, `graphs`), the fixed character-level
tokenizer (`tokenizer`), the decoders with four positional encodings (`models`), their training
(`training`) and evaluation (`evaluation`; a pre-trained model asked zero-shot: `zero_shot`), and the
`bico-axioms` command (`cli`); docs/axioms.md describes them.
"""

from .generator import (
    EVAL_SETS,
    TRAIN_MIXES,
    assert_disjoint,
    generate_eval,
    generate_train,
    instance_text,
    read_jsonl,
    write_jsonl,
)
from .tokenizer import ANSWERS, answer_ids, build_tokenizer, encode
from .models import POSITION_ENCODINGS, build_model, load_model
from .training import AxiomConfig, train
from .evaluation import evaluate, plot_accuracy, write_results
from .zero_shot import evaluate_zero_shot


__all__ = [
    "TRAIN_MIXES",
    "EVAL_SETS",
    "generate_train",
    "generate_eval",
    "instance_text",
    "assert_disjoint",
    "write_jsonl",
    "read_jsonl",
    "ANSWERS",
    "build_tokenizer",
    "answer_ids",
    "encode",
    "POSITION_ENCODINGS",
    "build_model",
    "load_model",
    "AxiomConfig",
    "train",
    "evaluate",
    "evaluate_zero_shot",
    "write_results",
    "plot_accuracy",
]
