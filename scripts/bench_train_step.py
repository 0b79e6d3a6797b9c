"""Benchmark one optimizer step of NTP and of BICO on the same model and batch, in one run.

A step is what the training loop does per optimizer step: collate (NTP or BICO placeholder masking),
forward (BICO inside `bico.bidirectional(model)`), backward, gradient clipping, AdamW step. The
two objectives alternate step by step on one model and one optimizer, so a busy machine slows both
alike; the script prints the median wall time per step, the process CPU time per step, and the
ratio BICO / NTP (target: <= 1.2 at sequence length 256 on the default model).

Rows are training texts (data/ by default) with EOS, packed end to end into rows of exactly
`--lengths` tokens; the length `data` instead uses one unpacked training row per sequence, padded
to the longest in the batch (the shape of the default training run).

    python scripts/bench_train_step.py                                  # default scratch model, CPU, L = 256 and data
    python scripts/bench_train_step.py --lengths 256 512 --steps 20
    python scripts/bench_train_step.py --model_name_or_path DIR --device cuda --dtype bfloat16 --batch_size 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bico.collators import BicoCollator, NtpCollator, encode_rows
from bico.data import load_train
from bico.patch import bidirectional, patch_llama
from bico.scratch import build_scratch_model


def _batches(tokenizer, prompts, completions, length: str, batch_size: int) -> list[list[dict]]:
    examples, _ = encode_rows(prompts, completions, tokenizer, max_length=10_000)
    if length == "data":
        return [examples[i : i + batch_size] for i in range(0, len(examples) - batch_size + 1, batch_size)]
    L = int(length)
    stream = [token for example in examples for token in example["input_ids"]]
    rows = [{"input_ids": stream[i : i + L]} for i in range(0, len(stream) - L + 1, L)]
    return [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def _step(model, optimizer, collator, examples, device, bico: bool) -> None:
    batch = {key: value.to(device) for key, value in collator(examples).items()}
    with bidirectional(model) if bico else contextlib.nullcontext():
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(model, tokenizer, prompts, completions, length: str, batch_size: int, steps: int, warmup: int, device: str) -> dict:
    batches = _batches(tokenizer, prompts, completions, length, batch_size)
    if len(batches) < 2:
        raise ValueError(f"not enough training text for two batches of {batch_size} x {length} tokens.")
    collators = {"ntp": NtpCollator(tokenizer), "bico": BicoCollator(tokenizer, seed=0)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wall = {"ntp": [], "bico": []}
    cpu = {"ntp": [], "bico": []}
    tokens = []
    for i in range(warmup + steps):
        examples = batches[i % len(batches)]
        tokens.append(sum(len(example["input_ids"]) for example in examples))
        # The same batch for both objectives, in alternating order so neither always goes first.
        for objective in (("ntp", "bico") if i % 2 == 0 else ("bico", "ntp")):
            _sync(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            _step(model, optimizer, collators[objective], examples, device, bico=objective == "bico")
            _sync(device)
            if i >= warmup:
                wall[objective].append(time.perf_counter() - start_wall)
                cpu[objective].append(time.process_time() - start_cpu)
    result = {"length": length, "batch_size": batch_size, "steps": steps, "mean_tokens_per_batch": statistics.mean(tokens)}
    for objective in ("ntp", "bico"):
        result[f"{objective}_wall_s"] = statistics.median(wall[objective])
        result[f"{objective}_cpu_s"] = statistics.median(cpu[objective])
    result["ratio_wall"] = result["bico_wall_s"] / result["ntp_wall_s"]
    result["ratio_cpu"] = result["bico_cpu_s"] / result["ntp_cpu_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", help="model directory; default: build the default scratch model")
    parser.add_argument("--data_dir", help="training data directory (default: data/)")
    parser.add_argument("--lengths", nargs="+", default=["256", "data"], help="sequence lengths, or data")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per objective and length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()

    train = load_train(args.data_dir)
    prompts, completions = train["prompt"], train["completion"]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_name_or_path
        if model_dir is None:
            model_dir = build_scratch_model([p + c for p, c in zip(prompts, completions)], Path(scratch) / "model")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device)
    patch_llama(model).train()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {model_dir or 'scratch'}: {parameters / 1e6:.1f}M parameters, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    print("| length | tokens/batch | NTP s/step | BICO s/step | BICO/NTP (wall) | NTP cpu s | BICO cpu s | BICO/NTP (cpu) |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for length in args.lengths:
        r = bench(model, tokenizer, prompts, completions, length, args.batch_size, args.steps, args.warmup, args.device)
        results.append(r)
        print(f"| {length} | {r['mean_tokens_per_batch']:.0f} | {r['ntp_wall_s']:.3f} | {r['bico_wall_s']:.3f} | "
              f"{r['ratio_wall']:.2f} | {r['ntp_cpu_s']:.3f} | {r['bico_cpu_s']:.3f} | {r['ratio_cpu']:.2f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
