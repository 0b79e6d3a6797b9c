"""Benchmark `bico.evaluation.evaluate`: generation, log-probabilities and ranking, timed per phase.

Default (issue 4): the four single-direction tasks (1,200 prompts) on the default small model, target
<= 60 s on 2 CPU cores. The model is the default 4.5M-parameter, 4-layer Llama of `bico.scratch` with
a tokenizer trained on the committed training set and random weights: timing does not depend on
what the model learnt, except that a trained model stops generating at EOS and so decodes faster.

`--model` evaluates a saved model instead, exactly as `bico-eval` loads it. For an ABI model (issue 12),
`--reference` also runs blank-infilling inference on its reference path (no KV cache:
`model.generation_config.use_cache = False`) in the same process, and prints the ratio and how far
the two paths' answers and log-probabilities differ.

    python scripts/bench_eval.py                       # 2 threads, the four tasks
    python scripts/bench_eval.py --tasks all           # the five tasks
    python scripts/bench_eval.py --threads 1 --batch_size 64
    # an ABI model from a short training run, both inference paths on Berglund's five tasks
    python -m bico.train --objective abi --max_steps 300 --eval_tasks none \
        --data_dir ../shared/data/reversal_curse --output_dir /tmp/abi_model
    python scripts/bench_eval.py --model /tmp/abi_model/final --tasks all \
        --data_dir ../shared/data/reversal_curse --reference
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bico.cli import load_model
from bico.data import DEFAULT_DATA_DIR, load_train
from bico.evaluation import evaluate, format_table
from bico.scratch import build_scratch_model


@dataclass
class BenchConfig:
    tasks: str = "n2d,n2d-reverse,d2n,d2n-reverse"  # comma-separated task names, or "all"
    data_dir: str = str(DEFAULT_DATA_DIR)  # task files and all_prompts_train.jsonl (tokenizer text)
    model: str = ""  # a saved model directory (as for bico-eval); empty = the random scratch model
    batch_size: int = 32  # prompts per batch
    max_new_tokens: int = 40  # greedy decoding length
    threads: int = 2  # torch intra-op threads (the target machine has 2 cores)
    no_rank: bool = False  # skip candidate ranking
    reference: bool = False  # ABI model: also time the reference path (no KV cache) and compare


def run(model, tokenizer, config: BenchConfig) -> tuple[dict, list[dict], float]:
    start = time.perf_counter()
    results, predictions = evaluate(
        model,
        tokenizer,
        config.tasks.split(","),
        data_dir=config.data_dir,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        rank=not config.no_rank,
        show_progress=False,
    )
    return results, predictions, time.perf_counter() - start


def summary(label: str, results: dict, predictions: list[dict], seconds: float) -> str:
    return (
        f"{label}: {seconds:.1f} s for {len(predictions)} prompts ({len(predictions) / seconds:.1f} prompts/s; "
        f"generation {results['seconds']['generation']:.1f} s, scoring {results['seconds']['scoring']:.1f} s)"
    )


def compare(fast: list[dict], reference: list[dict]) -> str:
    same = sum(f["generation"] == r["generation"] for f, r in zip(fast, reference))
    pairs = [(f[key], r[key]) for f, r in zip(fast, reference) for key in ("target_logprob", "random_logprob") if key in f]
    absolute = max(abs(a - b) for a, b in pairs)
    relative = max(abs(a - b) / max(abs(b), 1e-30) for a, b in pairs)
    line = (
        f"identical generations {same}/{len(fast)}; max |log p difference| {absolute:.2e} "
        f"(relative {relative:.1e}) over {len(pairs)} scores"
    )
    if "top_candidate" in fast[0]:
        line += f"; identical top candidates {sum(f['top_candidate'] == r['top_candidate'] for f, r in zip(fast, reference))}/{len(fast)}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in fields(BenchConfig):
        if field.type == "bool":
            parser.add_argument(f"--{field.name}", action="store_true")
        else:
            parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    config = BenchConfig(**vars(parser.parse_args()))
    torch.set_num_threads(config.threads)

    if config.model:
        model, tokenizer = load_model(config.model)
    else:
        train = load_train(config.data_dir)
        with tempfile.TemporaryDirectory() as model_dir:
            build_scratch_model([p + c for p, c in zip(train["prompt"], train["completion"])], model_dir, seed=0)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())

    results, predictions, seconds = run(model, tokenizer, config)
    print(format_table(results))
    print(
        f"\nmode {results['settings']['mode']}, model {n_params / 1e6:.2f}M parameters (vocab {len(tokenizer)}), "
        f"{len(results['tasks'])} tasks, {config.threads} threads, batch {config.batch_size}, "
        f"rank={'off' if config.no_rank else 'on'}"
    )
    print(summary("fast (KV cache)" if config.reference else "time", results, predictions, seconds))
    if config.reference:
        model.generation_config.use_cache = False  # what bico.abi_generation reads for its reference path
        ref_results, ref_predictions, ref_seconds = run(model, tokenizer, config)
        print(summary("reference (no cache)", ref_results, ref_predictions, ref_seconds))
        print(f"reference / fast: {ref_seconds / seconds:.1f}x; {compare(predictions, ref_predictions)}")


if __name__ == "__main__":
    main()
