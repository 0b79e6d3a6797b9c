"""Objective comparison: the same model, seed and data trained with NTP, BICO and ABI, side by side.

The BICO paper (arXiv 2311.07468, section 5, table 2) compares NTP, BICO and GLM's blank infilling on
the name-description tasks of Berglund et al. (arXiv 2309.12288). This module repeats that comparison
with `bico.training.train`: one run per (data set, seed, objective), one after another in this
process, then one table (Markdown and JSON) and one plot of the reverse tasks against training steps.

- Every run of a (data set, seed) starts from the same model (the scratch model is rebuilt from the
  seed, or `model_name_or_path` is shared) and sees the same batches in the same order (the data
  order is keyed on the seed only); only the objective differs.
- A run lives in `output_dir/<data set>-<objective>-seed<seed>/`. A run whose `results.json`
  exists is finished and skipped; any other run is started with `resume_from_checkpoint=latest`,
  so a half-finished one continues from its newest checkpoint.
- With `archive_dir`, each finished run's small files (options, results, history; no model) are
  copied there as soon as it ends (`archive_run`), and a run finished in the archive is not trained
  again: results can be committed run by run and a comparison continued on a fresh machine.
- The numbers are read back from the run directories (`results.json`, `eval_history.jsonl`), so a
  skipped run counts exactly like one trained now.
- Spread over seeds is the sample standard deviation (n - 1); with one seed there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .checkpoints import find_latest_checkpoint
from .config import DEFAULT_MAX_STEPS, VARIANT_FIELDS, TrainConfig, load_yaml_config
from .config import build_parser as build_train_parser
from .data import DEFAULT_DATA_DIR, resolve_data_dir
from .objectives import OBJECTIVES
from .pretrained import conversion_key
from .processes import end_processes, process_state
from .report import aggregate, format_comparison, write_comparison
from .training import train

RESULTS_FILE = "results.json"  # written by `train` after the final evaluation: marks a finished run
HISTORY_FILE = "eval_history.jsonl"  # evaluations during training, one JSON object per line
CONFIG_FILE = "train_config.yaml"  # the run's TrainConfig, written by `train` when it starts
OUTPUT_FILES = ("comparison.md", "comparison.json", "comparison.png")
DEFAULT_OBJECTIVES = ("ntp", "bico", "abi")
DEFAULT_OUTPUT_DIR = "runs/compare"
# The comparison sets these per run; as overrides they would make every run the same.
PER_RUN_FIELDS = ("objective", "seed", "data_dir", "output_dir", "resume_from_checkpoint")
# Options that change neither the trained weights nor the numbers of a task that was evaluated: a run
# made with other values of these is the same experiment (e.g. resumed with fewer threads, without
# the slow `both` task, or with evaluations during training: every draw is keyed on seed, step and row).
NON_RESULT_FIELDS = ("output_dir", "resume_from_checkpoint", "report_to", "logging_steps", "checkpointing_steps",
                     "checkpoints_total_limit", "eval_batch_size", "cpu_threads", "eval_tasks", "eval_every",
                     "eval_every_tasks")
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
EVALS_PER_RUN = 10  # default `eval_every` = max_steps / EVALS_PER_RUN


@dataclass
class CompareConfig:
    """One comparison: which objectives, seeds and data sets, and the training options shared by all runs.

    Args:
        objectives (`list[str]`, defaults to `["ntp", "bico", "abi"]`): Names of `bico.objectives.OBJECTIVES`.
        seeds (`list[int]`, defaults to `[0]`): One run per objective and seed.
        data_dirs (`list[str | None]`, defaults to `[None]`): Name-description directories; None is the
            project's `data/`. The directory names label the data sets and must differ.
        output_dir (`str`, defaults to `"runs/compare"`): Receives the run directories and the comparison files.
        train_overrides (`dict`, defaults to `{}`): `TrainConfig` fields for every run, e.g. `{"max_steps": 1000}`;
            without `eval_every`, a run is evaluated 10 times during training (`max_steps // 10`).
        collect_only (`bool`, defaults to `False`): Train nothing; tabulate the finished runs found.
        archive_dir (`str`, *optional*): Copy each finished run's small files here; runs finished here count as done.
    """

    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    seeds: list[int] = field(default_factory=lambda: [0])
    data_dirs: list[str | None] = field(default_factory=lambda: [None])
    output_dir: str = DEFAULT_OUTPUT_DIR
    train_overrides: dict = field(default_factory=dict)
    collect_only: bool = False
    archive_dir: str | None = None

    def __post_init__(self):
        for name in ("objectives", "seeds", "data_dirs"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"`{name}` is empty; give at least one.")
            if len(set(values)) != len(values):
                raise ValueError(f"`{name}` has repeats: {values}.")
        for spec in self.objectives:
            parse_variant(spec)
        labels = [dataset_label(d) for d in self.data_dirs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"`data_dirs` {self.data_dirs} have the same directory names {labels}; the names label the data sets.")
        valid = [f.name for f in fields(TrainConfig)]
        for key in self.train_overrides:
            if key in PER_RUN_FIELDS:
                raise ValueError(f"`{key}` is set per run by the comparison (--objectives, --seeds, --data_dir, --output_dir); remove it from the training options.")
            if key not in valid:
                raise ValueError(f"`train_overrides` has unknown field `{key}`; valid fields: {', '.join(valid)}.")
        if self.run_configs()[0].eval_task_list() == []:
            raise ValueError("`eval_tasks` is none; the comparison needs the final evaluation. Give `all` or a list of tasks.")

    def run_configs(self) -> list[TrainConfig]:
        """The runs, data set by data set, then seed by seed, then objective by objective.

        All objectives of a seed come before the next seed, so a comparison stopped early still has
        complete seeds. Raises `ValueError` for a bad training option.
        """
        options = dict(self.train_overrides)
        if "eval_every" not in options:
            steps = options.get("max_steps") or (DEFAULT_MAX_STEPS if options.get("num_train_epochs") is None else None)
            options["eval_every"] = max(1, steps // EVALS_PER_RUN) if steps else 0
        configs = []
        for data_dir in self.data_dirs:
            for seed in self.seeds:
                for spec in self.objectives:
                    objective, variant = parse_variant(spec)
                    config = TrainConfig(**{**options, **variant}, objective=objective, seed=seed, data_dir=data_dir,
                                         resume_from_checkpoint="latest")
                    config.output_dir = str(Path(self.output_dir) / run_name(data_dir, variant_label(config), seed))
                    configs.append(config)
        names = [Path(config.output_dir).name for config in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"`objectives` {self.objectives} name the same run twice (e.g. `bico` and `bico:mask_prob=0.15`).")
        return configs


def parse_variant(spec: str) -> tuple[str, dict]:
    """Read an objective, or a variant of one: `"bico"`, `"bico:mask_prob=0.3"`, `"bico:mask_schedule=span,mask_prob=0.3"`.

    Returns:
        `tuple[str, dict]`: the objective name and the `TrainConfig` fields the variant sets.
    """
    objective, _, options = spec.partition(":")
    if objective not in OBJECTIVES:
        raise ValueError(f"`objectives` must be among {', '.join(OBJECTIVES)} (with optional :field=value,...); got {spec!r}.")
    allowed = VARIANT_FIELDS.get(objective, ())
    variant = {}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in allowed:
            raise ValueError(f"`objectives` entry {spec!r}: {item!r} is not field=value with a field of "
                             f"{objective!r} among {', '.join(allowed) or 'none'}.")
        variant[key] = getattr(build_train_parser().parse_args([f"--{key}", value]), key)
    return objective, variant


def variant_label(config: TrainConfig) -> str:
    """The run's objective as the tables name it: the objective plus its variant fields that differ from the defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = [f"{key}={getattr(config, key)}" for key in VARIANT_FIELDS.get(config.objective, ())
               if getattr(config, key) != defaults[key]]
    return config.objective + (":" + ",".join(changed) if changed else "")


def dataset_label(data_dir: str | os.PathLike | None) -> str:
    """The data set's name in run directories and tables: the directory name (`data` for the default)."""
    path = resolve_data_dir(data_dir)
    if path.resolve() == DEFAULT_DATA_DIR.resolve():
        return "data"  # the packaged set, however it is reached (bico/dataset, or the checkout's data/ link)
    name = path.resolve().name or str(path)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def run_name(data_dir: str | os.PathLike | None, objective: str, seed: int) -> str:
    """The run directory's name, e.g. `reversal_curse-bico-seed0`, `data-bico_mask_prob_0.3-seed1` for a variant."""
    return f"{dataset_label(data_dir)}-{re.sub(r'[^A-Za-z0-9_.+-]', '_', objective)}-seed{seed}"


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_status(run_dir: str | os.PathLike) -> str:
    """`"finished"` (final evaluation written), `"partial"` (started; may have checkpoints) or `"new"`.

    `results.json` is written after `final/`, so it alone marks a finished run; an archived run
    (`train_config.yaml`, `results.json`, `eval_history.jsonl`, without the model) counts as one.
    """
    run_dir = Path(run_dir)
    if (run_dir / RESULTS_FILE).is_file() and (run_dir / CONFIG_FILE).is_file():
        return "finished"
    return "partial" if (run_dir / CONFIG_FILE).is_file() else "new"


def check_same_run(config: TrainConfig, run_dir: str | os.PathLike) -> None:
    """Raise `ValueError` if `run_dir` holds a run with other training options than `config`.

    Resuming or skipping such a run would mix two experiments in one table, so the caller must
    choose another `output_dir` (or delete the run).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return
    stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    wanted = asdict(config)
    differing = []
    for key, value in wanted.items():
        if key in NON_RESULT_FIELDS:
            continue
        old = stored.get(key, TrainConfig.__dataclass_fields__[key].default)
        if key == "data_dir":  # None is the project's set, which `--data_dir data` also names
            old, value = str(resolve_data_dir(old)), str(resolve_data_dir(value))
        if key == "model_name_or_path" and old is not None and value is not None:
            same = conversion_key(old) == conversion_key(value)  # one checkpoint converted by two transformers releases
        elif key == "data_dir":
            same = Path(old).resolve() == Path(value).resolve()
        else:
            same = old == value
        if not same:
            differing.append(f"{key}: {old!r} there, {value!r} now")
    if differing:
        raise ValueError(
            f"{path}: this run was made with other options ({'; '.join(differing)}); use another `output_dir` or delete {Path(run_dir)}."
        )


def run_one(config: TrainConfig) -> str:
    """Train one run unless it is finished; resume it from its newest checkpoint if it has one.

    Returns:
        `str`: `"skipped"` (finished before), `"resumed"` (continued from a checkpoint) or `"trained"`.
    """
    run_dir = Path(config.output_dir)
    check_same_run(config, run_dir)
    if run_status(run_dir) == "finished":
        return "skipped"
    resumed = find_latest_checkpoint(run_dir) is not None
    train(config)  # resume_from_checkpoint="latest": starts at step 0 when there is no checkpoint
    return "resumed" if resumed else "trained"


def archive_run(run_dir: str | os.PathLike, archive_dir: str | os.PathLike) -> Path:
    """Copy a finished run's small files (options, results, evaluation history) to `archive_dir/<run>/`.

    The copy is a finished run for `run_comparison` (skipped, tabulated), without checkpoints or model,
    so results can be committed as soon as a run ends and a comparison continued on another machine.
    """
    run_dir = Path(run_dir)
    if run_status(run_dir) != "finished":
        raise ValueError(f"{run_dir} is not a finished run (no {RESULTS_FILE}).")
    target = Path(archive_dir) / run_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, RESULTS_FILE, HISTORY_FILE):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, target / name)
    return target


def load_run(run_dir: str | os.PathLike) -> dict:
    """Read a finished run back: its options, final results and evaluations during training.

    Returns:
        `dict`: `name`, `dataset`, `objective`, `seed`, `steps` (optimizer steps trained), `results`
        (`{task: metrics}` of the final evaluation) and `history` (`[{"step", "tasks"}]`, in step order).
    """
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    history = []
    if (run_dir / HISTORY_FILE).is_file():
        lines = (run_dir / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        history = [{"step": r["step"], "tasks": r["tasks"]} for r in map(json.loads, filter(str.strip, lines))]
    return {
        "name": run_dir.name,
        "dataset": dataset_label(config.get("data_dir")),
        "objective": variant_label(TrainConfig(**{key: value for key, value in config.items() if key in TRAIN_FIELDS})),
        "seed": config["seed"],
        "steps": results.get("training", {}).get("steps"),
        "results": results["tasks"],
        "history": sorted(history, key=lambda record: record["step"]),
    }


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------


def run_comparison(config: CompareConfig, command: str | None = None) -> dict:
    """Train (or resume, or skip) every run, then write and print the comparison.

    Writes `comparison.md`, `comparison.json` and `comparison.png` to `config.output_dir` (on the main
    process when launched with Accelerate) and prints the Markdown table.

    Args:
        config (`CompareConfig`): The comparison.
        command (`str`, *optional*): The command line, recorded in the Markdown and JSON files.

    Returns:
        `dict`: The content of `comparison.json`: `command`, `settings`, `runs` (name, data set,
        objective, seed, `status` in trained / resumed / skipped / archived / finished / missing) and `summary`
        (`aggregate`'s output).
    """
    state = process_state()
    run_configs = config.run_configs()
    statuses, sources = {}, {}
    for run_config in run_configs:
        name = Path(run_config.output_dir).name
        archived = Path(config.archive_dir) / name if config.archive_dir else None
        if run_status(run_config.output_dir) != "finished" and archived is not None and run_status(archived) == "finished":
            check_same_run(run_config, archived)
            statuses[name], sources[name] = "archived", archived
            continue
        sources[name] = Path(run_config.output_dir)
        if config.collect_only:
            statuses[name] = "finished" if run_status(run_config.output_dir) == "finished" else "missing"
            continue
        state.print(f"=== {name}: {run_status(run_config.output_dir)} run ===")
        statuses[name] = run_one(run_config)
        if archived is not None and state.is_main_process:
            archive_run(run_config.output_dir, config.archive_dir)
        state.print(f"=== {name}: {statuses[name]} ===")

    runs = [load_run(sources[name]) for name in statuses if statuses[name] != "missing"]
    summary = aggregate(runs)
    comparison = {
        "command": command,
        "settings": {
            "objectives": config.objectives,
            "seeds": config.seeds,
            "data_dirs": [str(resolve_data_dir(d)) for d in config.data_dirs],
            "train_overrides": config.train_overrides,
            "eval_every": run_configs[0].eval_every,
            "spread": "sample standard deviation over seeds (n - 1)",
        },
        "runs": [
            {"name": Path(c.output_dir).name, "dataset": dataset_label(c.data_dir), "objective": variant_label(c),
             "seed": c.seed, "status": statuses[Path(c.output_dir).name]}
            for c in run_configs
        ],
        "summary": summary,
    }
    if state.is_main_process:
        write_comparison(comparison, config.output_dir)
        print(format_comparison(summary) if summary else "no finished runs")
    end_processes()
    return comparison


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The comparison's own flags; every other flag is a `TrainConfig` field (`scripts/finetune_bico.py`)."""
    parser = argparse.ArgumentParser(
        description="Train the same model with each objective (same seed, data and batch order), evaluate, compare.",
        epilog="Every other flag is a training option shared by all runs, as in scripts/finetune_bico.py "
        "(see its --help), e.g. --max_steps 1000 --eval_every 100 --per_device_train_batch_size 32; "
        "--config FILE.yaml reads them from YAML. Default eval_every: max_steps // 10.",
        allow_abbrev=False,  # `--seed 1` must not silently mean `--seeds 1`
    )
    parser.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES),
                        help=f"any of {', '.join(OBJECTIVES)}, or a variant such as bico:mask_prob=0.3, "
                        "bico:mask_schedule=uniform or demask:mask_prob=0.5,entity_mask_prob=0.5 (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per objective and seed (default: 0)")
    parser.add_argument("--data_dir", nargs="+", default=[None], help="one or more name-description directories (default: data/)")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="runs and comparison files (default: %(default)s)")
    parser.add_argument("--collect_only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--archive_dir", default=None, help="copy each finished run's results here (commit them); runs finished there are not trained again")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> CompareConfig:
    """Build a `CompareConfig`: the comparison's flags, then training options from `--config` YAML and flags."""
    args, rest = build_parser().parse_known_args(argv)
    given = vars(build_train_parser().parse_args(rest))
    overrides = load_yaml_config(given.pop("config")) if "config" in given else {}
    overrides.update(given)
    return CompareConfig(
        objectives=args.objectives, seeds=args.seeds, data_dirs=args.data_dir, output_dir=args.output_dir,
        train_overrides=overrides, collect_only=args.collect_only, archive_dir=args.archive_dir,
    )
