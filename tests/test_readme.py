"""The README's commands and its Python example are the first thing a newcomer runs: keep them working."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_main_job_and_the_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("accelerate launch scripts/finetune_bico.py")
    assert commands[1] == "python3 -m pytest -q"
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == commands[1]  # CI runs exactly the README's test command


def test_python_api_example_runs(capsys):
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert re.fullmatch(r"BICO loss \d+\.\d{3}\n", capsys.readouterr().out)


def test_ci_lowest_pins_are_the_lower_bounds_pyproject_claims():
    import tomllib

    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    lower = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+).*", r).groups() for r in requirements if ">=" in r)
    pins = dict(line.split("==") for line in (root / ".ci" / "lowest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins and all(Version(lower[name]) == Version(version) for name, version in pins.items()), (pins, lower)
    assert {"transformers", "peft", "accelerate"} <= pins.keys()
    assert all(f"{name} {version}" in README for name, version in pins.items())  # the README states the tested range


def test_version_is_written_once():
    import importlib.metadata

    import bico

    assert importlib.metadata.version("bico") == bico.__version__
    assert "version =" not in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text().split("[project]")[1].split("[")[0]


def test_axioms_example_runs(capsys):
    section = README.split("## Axiomatic training", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    premise_line, accuracy = capsys.readouterr().out.splitlines()
    assert premise_line.endswith(("? Yes", "? No")) and " causes " in premise_line
    assert 0.0 <= float(accuracy) <= 1.0
