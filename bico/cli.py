"""`bico-eval`: evaluate a saved model (or a LoRA adapter) on the name-description tasks.

    bico-eval --task n2d-reverse --model outputs/bico/final
    bico-eval --task all --model outputs/bico/final --output results.json --predictions predictions.jsonl
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m bico.cli --task all --model DIR

Prints a Markdown table of the metrics of `bico.evaluation.METRICS` on stdout. Bad input (an unknown
task, a missing model directory, a model without a tokenizer, a data directory without a task's file,
a malformed data file) prints one line `bico-eval: error: ...` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DEFAULT_DATA_DIR, TASKS, load_task, resolve_data_dir, resolve_tasks
from .pretrained import CheckpointError, is_gguf, resolve_model_path


# Any of these next to a model means a tokenizer was saved with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """Bad input; `main` prints the message as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the usage too; keep errors to one line.
        raise CliError(f"{message}; run `bico-eval --help` for usage.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bico-eval",
        description="Evaluate a causal LM on the reversal-curse name-description tasks (exact match, BLEU, "
        "log-probabilities, candidate ranking).",
    )
    parser.add_argument(
        "--task", action="extend", nargs="+", required=True, metavar="TASK",
        help=f"One or more of {', '.join(TASKS)}, or all; repeat or list several.",
    )
    parser.add_argument("--model", required=True, help="A directory saved with save_pretrained, a LoRA adapter directory, or a Llama-family .gguf file.")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help=f"Task files; default {DEFAULT_DATA_DIR}.")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, help="Prompts per batch (default 32).")
    parser.add_argument(
        "--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=40,
        help="Greedy decoding length (default 40, as in the BICO code).",
    )
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    parser.add_argument("--predictions", default=None, help="Write one JSON line per example here.")
    parser.add_argument("--no-rank", "--no_rank", dest="rank", action="store_false", help="Skip candidate ranking (faster).")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="Weights dtype (default: as saved).")
    return parser


def load_model(model_dir, dtype: str = "auto"):
    """Load a model directory, or a LoRA adapter directory merged onto its base, and its tokenizer.

    Args:
        model_dir (`str` or `os.PathLike`): A directory written by `save_pretrained` (config.json, weights,
            tokenizer), or a peft adapter directory (adapter_config.json); the adapter's
            `base_model_name_or_path` is loaded, the adapter applied and merged (`merge_and_unload`).
            The tokenizer is taken from the adapter directory when it has one, else from the base.
            A Llama-family `.gguf` file is converted once into a cached model directory
            (`bico.pretrained.resolve_model_path`).
        dtype (`str`, *optional*, defaults to `"auto"`): One of `DTYPES`.

    Returns:
        `tuple`: `(model, tokenizer)`, the model in eval mode on the CPU.

    Raises:
        `CliError`: with a one-line message saying what is missing and what to pass instead.
    """
    from transformers import AutoModelForCausalLM

    if is_gguf(model_dir):
        try:
            model_dir = resolve_model_path(model_dir)  # converted once, then cached
        except CheckpointError as error:
            raise CliError(str(error)) from None
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CliError(
            f"model directory not found: {model_dir}; pass --model a directory written by save_pretrained "
            "(config.json, weights and tokenizer) or a LoRA adapter directory."
        )
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise CliError(f"{adapter_config} has no base_model_name_or_path; set it to the base model's directory.")
        try:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
        except (OSError, ValueError) as error:
            raise CliError(
                f"cannot load the LoRA adapter in {model_dir} onto its base model {base} "
                f"({_first_line(error)}); make base_model_name_or_path in {adapter_config} a local model directory."
            ) from None
        tokenizer_dir = model_dir if _has_tokenizer(model_dir) else Path(base)
    else:
        if not (model_dir / "config.json").is_file():
            raise CliError(
                f"{model_dir} has no config.json: not a model saved with save_pretrained, nor a LoRA adapter "
                "(adapter_config.json); pass the directory that holds them."
            )
        tokenizer_dir = model_dir
    if not _has_tokenizer(tokenizer_dir):
        raise CliError(
            f"no tokenizer in {tokenizer_dir}; save it next to the model with tokenizer.save_pretrained('{tokenizer_dir}')."
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not adapter_config.is_file():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load the model or tokenizer in {model_dir}: {_first_line(error)}") from None
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    """Run `bico-eval`; returns the exit code (0, or 2 on bad input)."""
    try:
        return _run(build_parser().parse_args(argv))
    except CliError as error:
        print(f"bico-eval: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        tasks = resolve_tasks(args.task)
    except ValueError as error:
        raise CliError(str(error).replace("`task`", "--task")) from None
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise CliError(
            f"--batch-size and --max-new-tokens must be positive integers, got {args.batch_size} and {args.max_new_tokens}."
        )
    data_dir = resolve_data_dir(args.data_dir)
    try:
        for task in tasks:
            # Check every task file before the (possibly slow) model load; a DataError says which file and line.
            load_task(task, data_dir)
    except ValueError as error:
        raise CliError(str(error)) from None

    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from .evaluation import evaluate, format_table, write_predictions, write_results

    hf_logging.disable_progress_bar()
    accelerator = Accelerator()
    model, tokenizer = load_model(args.model, args.dtype)
    model.to(accelerator.device)
    results, predictions = evaluate(
        model,
        tokenizer,
        tasks,
        data_dir=data_dir,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        accelerator=accelerator,
        rank=args.rank,
    )
    results["model"] = str(Path(args.model).resolve())
    if accelerator.is_main_process:
        print(format_table(results))
        if args.output:
            write_results(results, args.output)
        if args.predictions:
            write_predictions(predictions, args.predictions)
    accelerator.wait_for_everyone()
    return 0


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
