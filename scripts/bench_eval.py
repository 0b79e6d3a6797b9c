"""Benchmark `bico.evaluation.evaluate`: the four single-direction tasks (1,200 prompts) on the default small model.

Target (issue 4): <= 60 s on 2 CPU cores for n2d, n2d-reverse, d2n and d2n-reverse together, with
generation (40 new tokens), log-probabilities and candidate ranking. The model is the default
4.5M-parameter, 4-layer Llama of `bico.scratch` with a tokenizer trained on the committed training set
and random weights: timing does not depend on what the model learnt, except that a trained model
stops generating at EOS and so decodes faster.

    python scripts/bench_eval.py                       # 2 threads, the four tasks
    python scripts/bench_eval.py --tasks all           # the five tasks
    python scripts/bench_eval.py --threads 1 --batch_size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bico.data import DEFAULT_DATA_DIR, load_train
from bico.evaluation import evaluate, format_table
from bico.scratch import build_scratch_model


@dataclass
class BenchConfig:
    tasks: str = "n2d,n2d-reverse,d2n,d2n-reverse"  # comma-separated task names, or "all"
    data_dir: str = str(DEFAULT_DATA_DIR)  # task files and all_prompts_train.jsonl (tokenizer text)
    batch_size: int = 32  # prompts per batch
    max_new_tokens: int = 40  # greedy decoding length
    threads: int = 2  # torch intra-op threads (the target machine has 2 cores)
    no_rank: bool = False  # skip candidate ranking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in fields(BenchConfig):
        if field.type == "bool":
            parser.add_argument(f"--{field.name}", action="store_true")
        else:
            parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    config = BenchConfig(**vars(parser.parse_args()))
    torch.set_num_threads(config.threads)

    train = load_train(config.data_dir)
    with tempfile.TemporaryDirectory() as model_dir:
        build_scratch_model([p + c for p, c in zip(train["prompt"], train["completion"])], model_dir, seed=0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())

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
    seconds = time.perf_counter() - start

    print(format_table(results))
    print(
        f"\n{len(predictions)} prompts, {len(results['tasks'])} tasks, model {n_params / 1e6:.2f}M parameters "
        f"(vocab {len(tokenizer)}), {config.threads} threads, batch {config.batch_size}, "
        f"rank={'off' if config.no_rank else 'on'}: {seconds:.1f} s ({len(predictions) / seconds:.1f} prompts/s; "
        f"generation {results['seconds']['generation']:.1f} s, scoring {results['seconds']['scoring']:.1f} s)"
    )


if __name__ == "__main__":
    main()
