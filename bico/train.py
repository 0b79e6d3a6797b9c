"""`bico-train`: the training command line (`python -m bico.train`, `accelerate launch -m bico.train`).

    bico-train --max_steps 3                                       # a few steps of the default run
    accelerate launch -m bico.train                                # the default experiment, as scripts/finetune_bico.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m bico.train   # 2 CPU processes (gloo)

Every flag is a field of `bico.config.TrainConfig` (`--help` lists them). Bad options and bad data
print one line `error: ...` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys

from .processes import end_processes
from .training import parse_config, train


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_config(argv))
        end_processes()
    except ValueError as error:  # bad options, bad data (`DataError`), unusable checkpoints (`CheckpointError`)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
