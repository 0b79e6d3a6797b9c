"""Compare training objectives (NTP, BICO, ABI) on the same model, seed, data and batch order.

Each (data set, seed, objective) is one `bico.training.train` run in `OUTPUT_DIR/<data set>-<objective>-seed<seed>/`,
evaluated on every task during training (every `--eval_every` steps) and after it. Runs run one after
another in this one process; a finished run is skipped and a half-finished one resumes from its
newest checkpoint, so re-running the same command continues where it stopped. At the end it writes
`comparison.md`, `comparison.json` and `comparison.png` to OUTPUT_DIR and prints the table.

    python scripts/compare_objectives.py --objectives ntp bico abi --seeds 0 1 --output_dir runs/compare
    python scripts/compare_objectives.py --data_dir data ../shared/data/reversal_curse --max_steps 1000 --eval_every 100
    python scripts/compare_objectives.py --output_dir runs/compare --collect_only      # table of the finished runs only
    accelerate launch scripts/compare_objectives.py ...      # optional: same result, Accelerate's launcher
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/compare_objectives.py ...   # 2 CPU processes

Every flag of scripts/finetune_bico.py except --objective, --seed, --data_dir, --output_dir and
--resume_from_checkpoint is accepted and applies to every run (see bico.config.TrainConfig).
"""

import shlex
import sys

from bico.compare import parse_args, run_comparison


def main() -> None:
    try:
        config = parse_args()
        run_comparison(config, command=shlex.join(["python", "scripts/compare_objectives.py", *sys.argv[1:]]))
    except ValueError as error:  # bad options and bad data (`DataError`): one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
