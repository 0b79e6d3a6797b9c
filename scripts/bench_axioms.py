"""Training throughput of the four positional encodings, in instances per second, measured in one run.

Every encoding trains the same rows (one generated file), with the same model size, batch and steps,
through `bico.axioms.training.train`; the time is the loop's wall time (`loop_seconds`: forward,
backward, optimizer step; not data generation, model building or the final save). With `--rounds R`
the encodings take turns R times and the best round counts, which damps the noise of a shared machine.
A benchmark, not a test:

    python scripts/bench_axioms.py                                            # the CPU config's model, 30 steps
    python scripts/bench_axioms.py --config configs/axioms_cpu.yaml --steps 50 --rounds 2
    accelerate launch scripts/bench_axioms.py --config configs/axioms_paper.yaml --steps 100   # one GPU (bf16)

Prints a Markdown table with each encoding's ratio against `learned` (GPT-2's own). `--encodings` also
takes `llama` (the RoPE Llama of `--architecture llama`) and `llama+bico` (the same with `--bico_prob 0.5`:
half the steps are BICO's bidirectional denoising, bico.axioms.denoising).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bico.axioms.generator import write_jsonl
from bico.axioms.models import POSITION_ENCODINGS
from bico.axioms.training import generate_split, parse_axiom_config
from bico.axioms.training import train as train_axioms
from bico.processes import end_processes, process_state


VARIANTS = {encoding: {"position_encoding": encoding} for encoding in POSITION_ENCODINGS} | {
    "llama": {"position_encoding": "rope", "architecture": "llama"},
    "llama+bico": {"position_encoding": "rope", "architecture": "llama", "bico_prob": 0.5},
}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="an AxiomConfig YAML (model size, batch, precision); default: AxiomConfig()")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per encoding and round (default 30)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every encoding; the best counts (default 1)")
    parser.add_argument("--num_instances", type=int, default=4096, help="rows of the shared training file (default 4096)")
    parser.add_argument("--encodings", nargs="+", default=list(POSITION_ENCODINGS), choices=list(VARIANTS))
    parser.add_argument("--cpu_threads", type=int, default=None, help="torch threads on CPU (default: the config's)")
    args = parser.parse_args()
    base = parse_axiom_config(["--config", args.config] if args.config else [])
    if args.cpu_threads is not None:
        base = dataclasses.replace(base, cpu_threads=args.cpu_threads)

    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_axioms_") as tmp:
        train_file = write_jsonl(generate_split(base.mix, args.num_instances, base.data_seed, eval_instances=2)[0], Path(tmp) / "train.jsonl")
        for round_index in range(args.rounds):
            for encoding in args.encodings:
                config = dataclasses.replace(
                    base, **VARIANTS[encoding], train_file=str(train_file), max_steps=args.steps, checkpointing_steps=0,
                    resume_from_checkpoint=None, report_to=None, output_dir=f"{tmp}/{encoding.replace('+', '-')}-{round_index}",
                )
                result = train_axioms(config)
                speed = result["rows_seen"] / result["loop_seconds"]
                if encoding not in best or speed > best[encoding]["speed"]:
                    best[encoding] = {"speed": speed, **result}
    end_processes()
    if not process_state().is_main_process:
        return
    reference_name = "learned" if "learned" in best else next(iter(best))
    reference = best[reference_name]["speed"]
    print(f"\n{base.n_layer} layers, {base.n_head} heads, width {base.n_embd}, batch {base.per_device_train_batch_size} "
          f"x {process_state().num_processes} process(es), {args.steps} steps, best of {args.rounds} round(s), "
          f"device {process_state().device}, {base.cpu_threads or 'default'} CPU threads, "
          f"mixed precision {base.mixed_precision or 'as launched'}\n")
    print(f"| encoding | parameters | seconds | instances/s | ms/step | vs {reference_name} |")
    print("|---|---|---|---|---|---|")
    for encoding, run in best.items():
        print(f"| {encoding} | {run['num_parameters']:,} | {run['loop_seconds']:.1f} | {run['speed']:.0f} | "
              f"{1000 * run['loop_seconds'] / run['global_step']:.0f} | {run['speed'] / reference:.2f} |")


if __name__ == "__main__":
    main()
