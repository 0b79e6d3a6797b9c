"""The objective comparison: run naming, resume rules, aggregation over seeds, table, plot, one tiny end-to-end run."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from bico.compare import (
    CompareConfig,
    archive_run,
    check_same_run,
    dataset_label,
    load_run,
    parse_args,
    parse_variant,
    run_comparison,
    run_name,
    run_status,
    variant_label,
)
from bico.config import DEFAULT_MAX_STEPS, VARIANT_FIELDS, TrainConfig
from bico.data import DEFAULT_DATA_DIR
from bico.objectives import OBJECTIVES
from bico.report import aggregate, format_ablation, format_comparison, plot_comparison

TASK_ANSWERS = {"n2d": "description", "n2d-reverse": "name", "d2n": "name", "d2n-reverse": "description", "both": "either"}

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, data_dir):
    """The first 24 rows of every file of data/ (randomized files stay aligned with their test files)."""
    out = tmp_path_factory.mktemp("data") / "small"
    out.mkdir()
    for path in Path(data_dir).glob("*.jsonl"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        (out / path.name).write_text("".join(lines[:24]), encoding="utf-8")
    return out


def _task_metrics(task: str, em: float, rank: float) -> dict:
    """Per-task numbers in the format of `bico.evaluation.evaluate` (results["tasks"][task])."""
    randomized = task in ("n2d-reverse", "d2n-reverse")
    return {
        "answer": TASK_ANSWERS[task], "count": 300, "exact_match": em, "exact_match_correct": round(em * 300),
        "contains": em + 0.1, "contains_correct": round((em + 0.1) * 300),
        "bleu_word": 10.0 if TASK_ANSWERS[task] == "description" else None,
        "bleu_char": 20.0 if TASK_ANSWERS[task] == "description" else None,
        "target_logprob": -5.0 + rank, "random_logprob": -6.0 if randomized else None,
        "target_beats_random": 0.5 + rank / 2 if randomized else None,
        "rank_accuracy": rank, "rank_correct": round(rank * 300), "rank_chance": 1 / 30, "rank_candidates": 30.0,
    }


def _fake_run(output_dir: Path, data_dir, objective: str, seed: int, em: float, rank: float, steps=(50, 100)) -> Path:
    """A finished run directory with the files `bico.training.train` writes, and known numbers."""
    config = TrainConfig(objective=objective, seed=seed, data_dir=data_dir, max_steps=steps[-1], eval_every=steps[0],
                         resume_from_checkpoint="latest", output_dir=str(output_dir / run_name(data_dir, objective, seed)))
    run_dir = Path(config.output_dir)
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    with open(run_dir / "eval_history.jsonl", "w") as f:
        for i, step in enumerate(steps):
            scale = (i + 1) / len(steps)  # the curve rises to the final numbers
            tasks = {task: _task_metrics(task, em * scale, rank * scale) for task in ("n2d-reverse", "d2n-reverse")}
            f.write(json.dumps({"step": step, "objective": objective, "tasks": tasks}) + "\n")
    results = {
        "model": str(run_dir / "final"), "data_dir": str(data_dir), "settings": {}, "seconds": {}, "metrics": {},
        "tasks": {task: _task_metrics(task, em, rank) for task in TASK_ANSWERS},
        "training": {"objective": objective, "p_bico": 0.5, "steps": steps[-1], "seed": seed},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def fake_runs(tmp_path):
    """ntp (2 seeds, rank 0.02 / 0.04) and bico (2 seeds, rank 0.8 / 0.9) on a data set named `small`."""
    data = str(tmp_path / "small")
    numbers = {("ntp", 0): (0.0, 0.02), ("ntp", 1): (0.0, 0.04), ("bico", 0): (0.3, 0.8), ("bico", 1): (0.5, 0.9)}
    dirs = [_fake_run(tmp_path / "out", data, objective, seed, em, rank) for (objective, seed), (em, rank) in numbers.items()]
    return [load_run(d) for d in dirs]


def test_run_name_encodes_data_set_objective_and_seed(tmp_path):
    assert run_name("../shared/data/reversal_curse", "bico", 1) == "reversal_curse-bico-seed1"
    assert run_name(None, "ntp", 0) == run_name("data", "ntp", 0) == "data-ntp-seed0"
    assert dataset_label(tmp_path / "my set") == "my_set"
    config = CompareConfig(objectives=["ntp", "abi"], seeds=[3], data_dirs=[None, str(tmp_path / "b")],
                           output_dir=str(tmp_path), train_overrides={"max_steps": 40})
    names = [Path(c.output_dir).name for c in config.run_configs()]
    assert names == ["data-ntp-seed3", "data-abi-seed3", "b-ntp-seed3", "b-abi-seed3"]
    assert all(c.eval_every == 4 and c.max_steps == 40 and c.resume_from_checkpoint == "latest" for c in config.run_configs())


def test_variants_of_an_objective_are_runs_of_their_own(tmp_path):
    assert parse_variant("bico") == ("bico", {})
    assert parse_variant("bico:mask_schedule=span,mask_prob=0.3") == ("bico", {"mask_schedule": "span", "mask_prob": 0.3})
    config = CompareConfig(objectives=["bico", "bico:mask_prob=0.3", "bico:mask_schedule=uniform", "abi:p_bico=1"],
                           seeds=[0], output_dir=str(tmp_path), train_overrides={"max_steps": 40})
    runs = config.run_configs()
    assert [Path(c.output_dir).name for c in runs] == [
        "data-bico-seed0", "data-bico_mask_prob_0.3-seed0", "data-bico_mask_schedule_uniform-seed0", "data-abi_p_bico_1.0-seed0",
    ]
    assert (runs[1].mask_prob, runs[2].mask_schedule, runs[3].p_bico) == (0.3, "uniform", 1.0)
    assert [variant_label(c) for c in runs] == ["bico", "bico:mask_prob=0.3", "bico:mask_schedule=uniform", "abi:p_bico=1.0"]
    # A finished variant run is read back under its label, which the tables show.
    run_dir = _fake_run(tmp_path / "out", str(tmp_path / "small"), "bico", 0, 0.1, 0.5)
    stored = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump({**stored, "mask_schedule": "span"}))
    assert load_run(run_dir)["objective"] == "bico:mask_schedule=span"
    with pytest.raises(ValueError, match="name the same run twice"):
        CompareConfig(objectives=["bico", "bico:mask_prob=0.15"])
    with pytest.raises(ValueError, match="'learning_rate=1' is not field=value with a field of 'bico'"):
        CompareConfig(objectives=["bico:learning_rate=1"])
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        CompareConfig(objectives=["bico:mask_schedule=zigzag"])


def test_every_objective_names_its_variant_options_and_each_is_a_training_option():
    assert set(VARIANT_FIELDS) == set(OBJECTIVES)
    train_fields = set(asdict(TrainConfig()))
    assert all(set(options) <= train_fields for options in VARIANT_FIELDS.values())


def test_entity_masking_and_demask_variants_are_runs_of_their_own(tmp_path):
    config = CompareConfig(objectives=["bico", "bico:entity_mask_prob=0.5", "demask", "demask:mask_prob=0.5,entity_mask_prob=0.5"],
                           seeds=[0], output_dir=str(tmp_path), train_overrides={"max_steps": 40})
    runs = config.run_configs()
    assert [Path(c.output_dir).name for c in runs] == [
        "data-bico-seed0", "data-bico_entity_mask_prob_0.5-seed0", "data-demask-seed0",
        "data-demask_mask_prob_0.5_entity_mask_prob_0.5-seed0",
    ]
    assert [variant_label(c) for c in runs] == [
        "bico", "bico:entity_mask_prob=0.5", "demask", "demask:mask_prob=0.5,entity_mask_prob=0.5"]
    assert (runs[1].entity_mask_prob, runs[3].objective, runs[3].mask_prob) == (0.5, "demask", 0.5)
    # A run made before the new options existed has their defaults: it is the same run as today's default.
    run_dir = _fake_run(tmp_path / "old", None, "bico", 0, 0.1, 0.2)
    stored = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    for key in ("entity_mask_prob", "demask_marker", "demask_separator"):
        stored.pop(key)
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump(stored))
    check_same_run(TrainConfig(**stored), run_dir)
    with pytest.raises(ValueError, match=r"entity_mask_prob: 0.0 there, 0.5 now"):
        check_same_run(TrainConfig(**{**stored, "entity_mask_prob": 0.5}), run_dir)
    with pytest.raises(ValueError, match=r"`entity_mask_prob` must be in \[0, 1\]"):
        CompareConfig(objectives=["bico:entity_mask_prob=2"])
    inverted = CompareConfig(objectives=["demask:mask_prob=0.15,entity_mask_prob=1.0,demask_invert_prob=0.5"], seeds=[0],
                             output_dir=str(tmp_path)).run_configs()[0]
    assert (inverted.demask_invert_prob, variant_label(inverted), Path(inverted.output_dir).name) == (
        0.5, "demask:entity_mask_prob=1.0,demask_invert_prob=0.5", "data-demask_entity_mask_prob_1.0_demask_invert_prob_0.5-seed0")
    with pytest.raises(ValueError, match="demask_invert_prob"):
        CompareConfig(objectives=["bico:demask_invert_prob=0.5"])  # a demask option only


def test_bad_options_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`objectives`.*'mlm'"):
        CompareConfig(objectives=["ntp", "mlm"])
    with pytest.raises(ValueError, match="`seeds` has repeats"):
        CompareConfig(seeds=[0, 0])
    with pytest.raises(ValueError, match="`data_dirs`.*same directory names"):
        CompareConfig(data_dirs=[str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data")])
    with pytest.raises(ValueError, match="`seed` is set per run"):
        parse_args(["--seed", "3"])  # not an abbreviation of --seeds
    with pytest.raises(ValueError, match="`eval_tasks` is none"):
        parse_args(["--eval_tasks", "none"])
    with pytest.raises(ValueError, match="`p_bico`"):
        parse_args(["--p_bico", "2"])


def test_parse_args_splits_comparison_flags_from_training_options(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("learning_rate: 0.002\nmax_steps: 7\n")
    config = parse_args(["--objectives", "ntp", "bico", "--seeds", "0", "1", "--data_dir", "a", "b", "--output_dir", "o",
                         "--config", str(yaml_file), "--max_steps", "30", "--eval_every", "5", "--gradient_checkpointing"])
    assert (config.objectives, config.seeds, config.data_dirs, config.output_dir) == (["ntp", "bico"], [0, 1], ["a", "b"], "o")
    assert config.train_overrides == {"learning_rate": 0.002, "max_steps": 30, "eval_every": 5, "gradient_checkpointing": True}
    assert len(config.run_configs()) == 8
    defaults = parse_args([])
    assert defaults.objectives == ["ntp", "bico", "abi"] and defaults.data_dirs == [None]
    assert defaults.run_configs()[0].eval_every == DEFAULT_MAX_STEPS // 10


def test_aggregate_mean_std_and_curves(fake_runs):
    summary = aggregate(fake_runs)
    assert list(summary) == ["small"] and list(summary["small"]) == ["ntp", "bico"]
    bico = summary["small"]["bico"]
    assert bico["seeds"] == [0, 1] and bico["steps"] == [100]
    rank = bico["final"]["n2d-reverse"]["rank_accuracy"]
    assert rank["n"] == 2 and rank["mean"] == pytest.approx(0.85) and rank["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert bico["final"]["n2d"]["exact_match"]["mean"] == pytest.approx(0.4)
    assert "random_logprob" not in bico["final"]["n2d"]  # None in every run: not averaged
    curve = bico["curves"]["d2n-reverse"]["rank_accuracy"]
    assert curve["steps"] == [50, 100] and curve["n"] == [2, 2]
    assert curve["mean"] == pytest.approx([0.425, 0.85])
    # The final evaluation adds the tasks not evaluated during training at the last step.
    assert bico["curves"]["n2d"]["exact_match"]["steps"] == [100]
    single = aggregate(fake_runs[:1])["small"]["ntp"]["final"]["n2d-reverse"]["rank_accuracy"]
    assert single["n"] == 1 and single["std"] is None


def test_table_shows_mean_std_n_and_chance(fake_runs):
    table = format_comparison(aggregate(fake_runs))
    lines = table.splitlines()
    assert lines[0] == "### small (100 steps)"
    row = next(line for line in lines if line.startswith("| n2d-reverse | bico |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # task, objective, n, exact match, contains, rank accuracy, rank chance, log p(target), log p(random), target > random
    assert cells == ["n2d-reverse", "bico", "2", "0.400 ± 0.141", "0.500 ± 0.141", "0.850 ± 0.071", "0.033", "-4.15 ± 0.07", "-6.00 ± 0.00",
                     "0.925 ± 0.035"]
    n2d = next(line for line in lines if line.startswith("| n2d | ntp |"))
    assert n2d.split("|")[9].strip() == "-"  # no randomized file for n2d
    assert sum(line.startswith("| ") and "---" not in line for line in lines) == 1 + 5 * 2


def test_ablation_table_has_a_row_per_objective_and_the_chance_rates(fake_runs):
    lines = format_ablation(aggregate(fake_runs)).splitlines()
    assert lines[0] == "### small (100 steps)"
    assert lines[2] == ("| objective | n | n2d EM | n2d-reverse EM | n2d-reverse rank | d2n EM | d2n-reverse EM "
                        "| d2n-reverse rank |")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[4:]}
    assert list(rows) == ["ntp", "bico", "chance"]
    assert rows["bico"] == ["2", "0.400 ± 0.141", "0.400 ± 0.141", "0.850 ± 0.071", "0.400 ± 0.141", "0.400 ± 0.141",
                            "0.850 ± 0.071"]
    assert rows["ntp"][3] == "0.030 ± 0.014"
    assert rows["chance"] == ["", "-", "-", "0.033", "-", "-", "0.033"]


def test_plot_has_a_line_per_objective_and_the_chance_rate(fake_runs, tmp_path):
    path = tmp_path / "plot.png"
    fig = plot_comparison(aggregate(fake_runs), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["small: n2d-reverse", "small: d2n-reverse"] * 2
    em_ax, rank_ax = axes[0], axes[2]
    assert [line.get_label() for line in em_ax.get_lines()] == ["ntp (n=2)", "bico (n=2)"]
    dashed = [line for line in rank_ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(1 / 30)
    bico_line = rank_ax.get_lines()[1]
    assert list(bico_line.get_xdata()) == [50, 100] and list(bico_line.get_ydata()) == pytest.approx([0.425, 0.85])
    assert len(rank_ax.collections) == 2  # one shaded band per objective


def test_plot_drops_tasks_no_run_evaluated_and_tells_variants_apart(fake_runs):
    from matplotlib.colors import to_hex

    runs = [dict(run) for run in fake_runs]
    runs[3]["objective"] = "bico:mask_prob=0.3"  # bico's seed 1 read back as a variant of its own
    summary = aggregate(runs)
    for entry in summary["small"].values():  # as with eval_tasks n2d,n2d-reverse: no d2n-reverse anywhere
        entry["curves"].pop("d2n-reverse")
    fig = plot_comparison(summary)
    assert [ax.get_title() for ax in fig.axes] == ["small: n2d-reverse"] * 2
    lines = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert list(lines) == ["ntp (n=2)", "bico (n=1)", "bico:mask_prob=0.3 (n=1)"]
    assert lines["ntp (n=2)"] == to_hex("tab:blue") and lines["bico (n=1)"] == to_hex("tab:orange")
    assert len(set(lines.values())) == 3


def test_plot_legend_gives_the_seed_range_when_seeds_were_evaluated_at_different_steps(fake_runs):
    runs = [dict(run) for run in fake_runs]
    bico_seed0 = next(run for run in runs if run["objective"] == "bico" and run["seed"] == 0)
    bico_seed0["history"] = []  # evaluated only at the end, like a run without --eval_every
    summary = aggregate(runs)
    assert summary["small"]["bico"]["curves"]["n2d-reverse"]["rank_accuracy"]["n"] == [1, 2]
    labels = [line.get_label() for line in plot_comparison(summary).axes[0].get_lines()]
    assert labels == ["ntp (n=2)", "bico (n=1-2)"]


def test_status_and_config_mismatch(tmp_path):
    run_dir = _fake_run(tmp_path, None, "bico", 0, 0.1, 0.2)
    assert run_status(run_dir) == "finished"
    same = TrainConfig(**{**yaml.safe_load((run_dir / "train_config.yaml").read_text()), "report_to": "tensorboard"})
    check_same_run(same, run_dir)  # logging options do not matter
    check_same_run(TrainConfig(**{**asdict(same), "cpu_threads": 1, "eval_tasks": "n2d-reverse"}), run_dir)  # nor threads or tasks
    check_same_run(TrainConfig(**{**asdict(same), "eval_every": 0, "eval_every_tasks": "n2d-reverse"}), run_dir)  # nor curves
    assert same.data_dir is None
    check_same_run(TrainConfig(**{**asdict(same), "data_dir": str(DEFAULT_DATA_DIR)}), run_dir)  # the default set, named
    with pytest.raises(ValueError, match="data_dir: "):
        check_same_run(TrainConfig(**{**asdict(same), "data_dir": str(tmp_path)}), run_dir)
    # The same checkpoint converted by two transformers releases (bico-fetch-smollm2's cache) is one model.
    cache = tmp_path / "cache"
    old_release = TrainConfig(**{**asdict(same), "model_name_or_path": str(cache / "transformers-5.24.0" / "SmolLM2")})
    yaml_path = tmp_path / "converted" / "train_config.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(yaml.safe_dump(asdict(old_release)))
    check_same_run(TrainConfig(**{**asdict(same), "model_name_or_path": str(cache / "transformers-5.25.0" / "SmolLM2")}), yaml_path.parent)
    with pytest.raises(ValueError, match="model_name_or_path: "):
        check_same_run(TrainConfig(**{**asdict(same), "model_name_or_path": str(cache / "transformers-5.25.0" / "Other")}),
                       yaml_path.parent)
    with pytest.raises(ValueError, match=r"train_config.yaml: this run was made with other options \(max_steps: 100 there, 200 now\)"):
        check_same_run(TrainConfig(**{**asdict(same), "max_steps": 200}), run_dir)
    (run_dir / "results.json").unlink()
    assert run_status(run_dir) == "partial"
    assert run_status(tmp_path / "nothing") == "new"


def test_archived_runs_count_as_finished_and_are_not_trained_again(tmp_path, monkeypatch):
    import bico.compare

    data = str(tmp_path / "small")
    run_dir = _fake_run(tmp_path / "runs", data, "bico", 0, 0.3, 0.8)
    (run_dir / "checkpoints").mkdir()
    archived = archive_run(run_dir, tmp_path / "archive")
    assert sorted(p.name for p in archived.iterdir()) == ["eval_history.jsonl", "results.json", "train_config.yaml"]
    assert run_status(archived) == "finished" and load_run(archived) == load_run(run_dir)
    with pytest.raises(ValueError, match="not a finished run"):
        archive_run(tmp_path / "runs" / "nothing", tmp_path / "archive")

    monkeypatch.setattr(bico.compare, "train", lambda config: pytest.fail("an archived run was trained again"))
    stored = yaml.safe_load((archived / "train_config.yaml").read_text())
    config = CompareConfig(objectives=["bico"], seeds=[0], data_dirs=[data], output_dir=str(tmp_path / "fresh"),
                           archive_dir=str(tmp_path / "archive"),
                           train_overrides={"max_steps": stored["max_steps"], "eval_every": stored["eval_every"]})
    comparison = run_comparison(config)
    assert [run["status"] for run in comparison["runs"]] == ["archived"]
    assert comparison["summary"]["small"]["bico"]["final"]["n2d-reverse"]["rank_accuracy"]["mean"] == 0.8


def _mtimes(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_end_to_end_trains_then_skips_then_resumes(tmp_path, tiny_model_dir, small_data_dir, capsys):
    torch.manual_seed(0)
    output_dir = tmp_path / "compare"
    argv = ["--objectives", "ntp", "bico", "--seeds", "0", "--data_dir", str(small_data_dir), "--output_dir", str(output_dir),
            "--model_name_or_path", str(tiny_model_dir), "--max_steps", "4", "--eval_every", "2", "--checkpointing_steps", "2",
            "--per_device_train_batch_size", "8", "--max_train_samples", "32", "--learning_rate", "3e-3"]
    first = run_comparison(parse_args(argv))
    assert [(run["name"], run["status"]) for run in first["runs"]] == [("small-ntp-seed0", "trained"), ("small-bico-seed0", "trained")]
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (output_dir / name).is_file()
    saved = json.loads((output_dir / "comparison.json").read_text())
    curve = saved["summary"]["small"]["bico"]["curves"]["n2d-reverse"]["rank_accuracy"]
    assert curve["steps"] == [2, 4] and curve["n"] == [1, 1]
    assert set(saved["summary"]["small"]["ntp"]["final"]) == set(TASK_ANSWERS)  # every task evaluated at the end
    assert "| n2d-reverse | ntp | 1 |" in capsys.readouterr().out  # the table is printed

    # Same command again: nothing is retrained, nothing in the run directories is rewritten.
    before = {name: _mtimes(output_dir / name) for name in ("small-ntp-seed0", "small-bico-seed0")}
    second = run_comparison(parse_args(argv))
    assert [run["status"] for run in second["runs"]] == ["skipped", "skipped"]
    assert {name: _mtimes(output_dir / name) for name in before} == before
    assert second["summary"] == first["summary"]

    # A run killed after its last checkpoint, before its final evaluation, resumes from that checkpoint.
    bico_dir = output_dir / "small-bico-seed0"
    (bico_dir / "results.json").unlink()
    final_weights = (bico_dir / "final" / "model.safetensors").read_bytes()
    third = run_comparison(parse_args(argv))
    assert [run["status"] for run in third["runs"]] == ["skipped", "resumed"]
    assert (bico_dir / "final" / "model.safetensors").read_bytes() == final_weights
    assert third["summary"]["small"]["bico"]["final"] == first["summary"]["small"]["bico"]["final"]
    assert third["summary"]["small"]["bico"]["curves"] == first["summary"]["small"]["bico"]["curves"]

    # Another option on the same output_dir is refused rather than mixed into the table.
    with pytest.raises(ValueError, match="other options"):
        run_comparison(parse_args([*argv, "--mask_prob", "0.3"]))


@pytest.mark.slow
def test_two_cpu_processes_run_every_comparison_run(tmp_path, tiny_model_dir, small_data_dir, free_port):
    """Two CPU processes (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`): both runs train, one table.

    A bare `PartialState()` took each CPU process for the only one, and the first run's end destroyed the
    process group the second needed.
    """
    output_dir = tmp_path / "compare"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port),
               str(REPO_ROOT / "scripts" / "compare_objectives.py"), "--objectives", "ntp", "bico", "--seeds", "0",
               "--data_dir", str(small_data_dir), "--output_dir", str(output_dir), "--model_name_or_path", str(tiny_model_dir),
               "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_train_samples", "16", "--eval_max_new_tokens", "4"]
    completed = subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads((output_dir / "comparison.json").read_text())["runs"]
    assert [(run["name"], run["status"]) for run in runs] == [("small-ntp-seed0", "trained"), ("small-bico-seed0", "trained")]
    assert completed.stdout.count("| n2d-reverse | ntp | 1 |") == 1  # printed by the main process only
    assert completed.stdout.count("=== small-bico-seed0: trained ===") == 1
    train_config = yaml.safe_load((output_dir / "small-bico-seed0" / "train_config.yaml").read_text())
    assert train_config["per_device_train_batch_size"] == 4
    assert "2 process(es) x batch 4" in completed.stdout
