"""`bico-axioms`: generate the transitivity data, train a decoder per positional encoding, evaluate them.

    bico-axioms generate --mix TS2 --num_instances 20000 --seed 0 --output_dir outputs/axioms/data
    bico-axioms train --config configs/axioms_cpu.yaml --position_encoding none --train_file outputs/axioms/data/train.jsonl
    accelerate launch -m bico.axioms.cli train --config configs/axioms_paper.yaml --position_encoding rope   # GPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m bico.axioms.cli train ...   # 2 CPU processes
    bico-axioms eval --model outputs/axioms/none/final outputs/axioms/rope/final --data_dir outputs/axioms/data --output_dir results/axioms
    bico-axioms eval --pretrained "$(bico-fetch-smollm2)" --data_dir outputs/axioms/data --output_dir results/smollm2   # zero-shot
    bico-axioms eval --results results/axioms/results.json --model outputs/axioms/learned/final --data_dir ... --output_dir ...

`generate` writes `train.jsonl` and one `<set>.jsonl` per evaluation set (`bico.axioms.EVAL_SETS`),
no training premise among them. `train` takes every field of `AxiomConfig` as a flag (`bico-axioms
train --help`) and prints a JSON summary as its last line. `eval` writes `results.json`,
`results.md` and `accuracy.png` (one line per model; a `--pretrained` model is asked zero-shot,
`bico.axioms.zero_shot`; `--results` adds the columns of an earlier eval). Bad input (an unknown encoding, mix or set, a
malformed JSONL line, a missing model) prints one line `bico-axioms <command>: error: ...` on stderr
and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from .generator import EVAL_SETS, TRAIN_MIXES, read_jsonl, write_jsonl


COMMANDS = ("generate", "train", "eval")
TRAIN_FILE = "train.jsonl"


class CliError(Exception):
    """Bad input; `main` prints the message as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the usage too; keep errors to one line.
        raise CliError(f"{message}; run `{self.prog} --help` for usage.")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command; `train`'s has one flag per `AxiomConfig` field."""
    if command == "train":
        from ..config import build_parser as build_config_parser
        from .training import AxiomConfig

        return build_config_parser(AxiomConfig, _Parser(prog="bico-axioms train", description=AxiomConfig.__doc__))
    parser = _Parser(prog=f"bico-axioms {command}")
    if command == "generate":
        parser.description = "Write the training rows and every evaluation set as JSONL."
        parser.add_argument("--mix", default="TS2", help=f"training mix: {', '.join(TRAIN_MIXES)} (default TS2)")
        parser.add_argument("--num_instances", type=int, default=20_000, help="training rows (default 20000; the paper ~175000)")
        parser.add_argument("--eval_instances", type=int, default=500, help="rows per evaluation set (default 500)")
        parser.add_argument("--seed", type=int, default=0, help="seed of every set (default 0)")
        parser.add_argument("--output_dir", required=True, help=f"gets {TRAIN_FILE} and <set>.jsonl per evaluation set")
    else:
        parser.description = "Evaluate trained models on the evaluation sets: JSON, Markdown and a plot."
        parser.add_argument("--model", action="extend", nargs="+", default=[], metavar="DIR",
                            help="one or more `final` directories written by `bico-axioms train`")
        parser.add_argument("--pretrained", action="extend", nargs="+", default=[], metavar="DIR",
                            help="pre-trained causal LMs (with their tokenizers) asked zero-shot, e.g. $(bico-fetch-smollm2)")
        parser.add_argument("--results", action="extend", nargs="+", default=[], metavar="FILE",
                            help="results.json of earlier evals on the same data: their columns come first, so runs "
                                 "trained at different times share one table and plot")
        parser.add_argument("--data_dir", help="directory of <set>.jsonl files (bico-axioms generate); needed with "
                                               "--model or --pretrained")
        parser.add_argument("--output_dir", required=True, help="gets results.json, results.md and accuracy.png")
        parser.add_argument("--sets", action="extend", nargs="+", metavar="SET", help=f"some of {', '.join(EVAL_SETS)} (default all)")
        parser.add_argument("--batch_size", type=int, default=64, help="rows per forward pass (default 64)")
        parser.add_argument("--no_plot", action="store_true", help="skip accuracy.png (no matplotlib needed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `bico-axioms COMMAND ...`; returns the exit code (0, or 2 on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    try:
        if command in ("-h", "--help"):
            print(__doc__)
            return 0
        if command not in COMMANDS:
            raise CliError(f"the command must be one of {', '.join(COMMANDS)}; got {command!r}.")
        return {"generate": _generate, "train": _train, "eval": _evaluate}[command](build_parser(command), argv[1:])
    except (CliError, ValueError) as error:  # ValueError: bad options, DataError (path:line), bad models
        prefix = "bico-axioms" + (f" {command}" if command in COMMANDS else "")
        print(f"{prefix}: error: {_first_line(error)}", file=sys.stderr)
        return 2


def _generate(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from .training import generate_split

    args = parser.parse_args(argv)
    if args.mix not in TRAIN_MIXES:
        raise CliError(f"--mix must be one of {', '.join(TRAIN_MIXES)}; got {args.mix!r}.")
    train_rows, eval_sets = generate_split(args.mix, args.num_instances, args.seed, args.eval_instances)
    output_dir = Path(args.output_dir)
    write_jsonl(train_rows, output_dir / TRAIN_FILE)
    for name, rows in eval_sets.items():
        write_jsonl(rows, output_dir / f"{name}.jsonl")
    print(f"wrote {len(train_rows)} {args.mix} training rows and {len(eval_sets)} evaluation sets of "
          f"{args.eval_instances} rows (seed {args.seed}) to {output_dir}")
    return 0


def _train(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from ..processes import end_processes, process_state
    from .training import parse_axiom_config, train

    result = train(parse_axiom_config(argv, parser))
    is_main = process_state().is_main_process
    end_processes()
    if is_main:
        print(json.dumps({key: value for key, value in result.items() if key != "losses"}))
    return 0


def _evaluate(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    sets = list(dict.fromkeys(args.sets or EVAL_SETS))
    unknown = [name for name in sets if name not in EVAL_SETS]
    if unknown:
        raise CliError(f"--sets must be among {', '.join(EVAL_SETS)}; got {', '.join(map(repr, unknown))}.")
    if not args.model and not args.pretrained and not args.results:
        raise CliError("give at least one --model (trained by `bico-axioms train`), --pretrained model or --results file.")
    if (args.model or args.pretrained) and args.data_dir is None:
        raise CliError("the following arguments are required: --data_dir")
    earlier = [column for path in args.results for column in _read_results(path)]
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be a positive integer, got {args.batch_size}.")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise CliError("the plot needs matplotlib: pip install matplotlib, or pass --no_plot.")
    rows, data_dir = [], Path(args.data_dir or ".")
    for name in sets if args.model or args.pretrained else []:  # every file is read and checked before any model is loaded
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise CliError(f"{path}: no such file; write the evaluation sets with `bico-axioms generate --output_dir {data_dir}`.")
        rows += read_jsonl(path)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..processes import process_state
    from .evaluation import evaluate, format_results, plot_accuracy, write_results
    from .models import load_model, read_position_encoding
    from .zero_shot import evaluate_zero_shot

    hf_logging.disable_progress_bar()
    if process_state().num_processes > 1:
        raise CliError("eval runs in one process (every process would write the same files); run it without `accelerate launch`.")
    device = process_state().device
    evaluated = list(earlier)
    for model_dir in args.model:
        model = load_model(model_dir).to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as error:
            raise CliError(f"no usable tokenizer in {model_dir} ({_first_line(error)}); save it with the model.") from None
        encoding = read_position_encoding(model)
        metrics = evaluate(model, tokenizer, rows, args.batch_size, desc=f"eval {encoding}")
        evaluated.append((encoding, Path(model_dir), {"model": str(Path(model_dir).resolve()), "position_encoding": encoding, **metrics}))
        del model
    for model_dir in args.pretrained:
        model, tokenizer = _load_pretrained(model_dir, device)
        metrics = evaluate_zero_shot(model, tokenizer, rows, args.batch_size, desc=f"eval {Path(model_dir).name}")
        evaluated.append((f"{_model_name(Path(model_dir))} (zero-shot)", Path(model_dir), {"model": str(Path(model_dir).resolve()), "position_encoding": None, **metrics}))
        del model
    results = dict(zip(_labels([(encoding, path) for encoding, path, _ in evaluated]), [metrics for _, _, metrics in evaluated]))
    output_dir = write_results(results, args.output_dir)
    if not args.no_plot:
        plot_accuracy(results, output_dir / "accuracy.png")
    print(format_results(results))
    return 0


def _read_results(path: str) -> list[tuple[str, Path, dict]]:
    """The columns of a results.json written by an earlier eval, as `(label, model directory, metrics)`."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CliError(f"--results {path}: not a readable results.json ({_first_line(error)}).") from None
    if not isinstance(results, dict) or not all(isinstance(metrics, dict) and "sets" in metrics for metrics in results.values()):
        raise CliError(f"--results {path}: expected {{label: metrics with \"sets\"}}, as `bico-axioms eval` writes it.")
    return [(label, Path(metrics.get("model") or path), metrics) for label, metrics in results.items()]


def _load_pretrained(model_dir: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    except (OSError, ValueError) as error:
        raise CliError(f"--pretrained {model_dir}: not a causal LM with its tokenizer ({_first_line(error)}).") from None
    return model, tokenizer


def _labels(models: list[tuple[str, Path]]) -> list[str]:
    """The encoding, or `encoding (directory)` where two models share one; `#i` keeps them apart if that is not enough."""
    encodings = [encoding for encoding, _ in models]
    labels = [encoding if encodings.count(encoding) == 1 else f"{encoding} ({_model_name(path)})" for encoding, path in models]
    return [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


def _model_name(path: Path) -> str:
    # `outputs/axioms/none-seed1/final` reads better as `none-seed1` than as `final`.
    path = path.resolve()
    return path.parent.name if path.name == "final" else path.name


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
