"""Every shell command of README.md and docs/*.md is classified and checked: quick ones run, the others are parsed."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from doc_commands import PROGRAMS, ROOT, SHELL, blocks, commands, unknown_flags, usage_problems
from nni_pipebd.cli import _parser, main

pytestmark = pytest.mark.timeout(600)

RUN = "run"          # run for real in a copy of examples/, with FAST flags added
PARSE = "parse"      # long, or run by another test: parsed by the CLI, its config loaded
USAGE = "usage"      # a synopsis with placeholders: its command and every flag it shows exist in the CLI's parser
TORCHRUN = "torchrun"  # torchrun's own parser, then the CLI's for what follows -m nni_pipebd.cli
SCRIPT = "script"    # python SCRIPT ...: the script's --help lists every flag shown
NNICTL = "nnictl"    # nnictl's --help lists every flag shown; a --config file is a valid NNI config
INSTALL = "install"  # pip install -e .[extra]: pyproject declares the package, its command and the extra
PYTEST = "pytest"    # the test extra is installed and pytest finds the tests

CLASSIFIED = {
    # README.md
    "python3 -m pip install -e .": INSTALL,
    "nni-pipebd demo": PARSE,  # 5-10 minutes (tests/report/test_report.py runs it on a tiny job)
    "python3 -m pip install -e .[test]": INSTALL,
    "python3 -m pytest -q": PYTEST,
    "python3 -m pytest -q -m not slow": PYTEST,
    "nni-pipebd train CONFIG [--executor reference|dp|ls|pipebd] [--workers W] [--epochs E] [--max-steps S] "
    "[--seed N] [--out DIR] [--overwrite] [--json] [--trace TIMELINE.json] [--boundaries 0,2,4] [--no-decoupled] "
    "[--plan auto|PLAN.json] [--memory-limit MB]": USAGE,
    "nni-pipebd blocks CONFIG": USAGE,
    "nni-pipebd profile CONFIG [--workers W] [--out PROFILE.json]": USAGE,
    "nni-pipebd plan CONFIG --workers W [--memory-limit MB] [--json] [--out PLAN.json]": USAGE,
    "torchrun --nproc-per-node 4 -m nni_pipebd.cli train CONFIG --executor pipebd --plan PLAN.json": TORCHRUN,
    # docs/benchmarks.md, docs/reliability.md, docs/search.md: benchmarks of minutes to hours
    "python benchmarks/executors.py --workers 2 --json benchmarks/results-cpu-w2.json --doc docs/benchmarks.md": SCRIPT,
    "python benchmarks/executors.py --render benchmarks/results-cpu-w2.json --doc docs/benchmarks.md": SCRIPT,
    "python benchmarks/levers.py --workload teacher-heavy --workload mobilenet "
    "--json benchmarks/results-levers-cpu.json": SCRIPT,
    "python benchmarks/levers.py --render benchmarks/results-levers-cpu.json --doc docs/benchmarks.md": SCRIPT,
    "python benchmarks/soak.py --epochs 40": SCRIPT,
    "python benchmarks/search_quality.py --init library --finetune-epochs 2 "
    "--json benchmarks/results-search-quality-library.json": SCRIPT,
    "python benchmarks/search_quality.py --render benchmarks/results-search-quality-library.json "
    "--doc docs/search.md": SCRIPT,
    # docs/guide.md
    "nni-pipebd blocks examples/custom/config.yaml": RUN,
    # tests/test_cli.py::test_blocks_and_train_with_user_teacher_and_data runs this job (its teacher trained first)
    "nni-pipebd train examples/custom/config.yaml --out runs/custom": PARSE,
    # docs/nni.md
    "nnictl create --config examples/digits/nni_config.yml --port 8080": NNICTL,  # tests/nni/test_nni_nnictl.py runs one
    "nnictl stop --all": NNICTL,
    "nnictl algo register --meta $(nni-pipebd nni-meta)": NNICTL,
    # docs/quickstart.md, in this order: the library the first one writes serves the others
    "nni-pipebd train examples/digits/config.yaml --executor pipebd --workers 2 --out runs/lib": RUN,
    "nni-pipebd plan examples/digits/config.yaml --workers 4": RUN,
    "nni-pipebd search runs/lib --method dna --budget params=450k --top-k 3 --out runs/archs.json": RUN,
    "nni-pipebd finetune runs/lib --arch runs/archs.json": RUN,
    "nni-pipebd report runs/lib": RUN,
    # docs/search.md
    "nni-pipebd train examples/digits/config.yaml --out runs/digits": PARSE,  # quickstart's job, run above
    "nni-pipebd search runs/digits --method dna --budget params=450k [--top-k 5] [--max-paths 64] --out archs.json "
    "[--json]": USAGE,
    "nni-pipebd search runs/digits --method donna --budget latency_ms=3.5 [--predictor-archs 8 --epochs 1] "
    "--out front.json": USAGE,
    "nni-pipebd finetune runs/digits --arch archs.json [--epochs 1] [--mode kd|labels] [--init library|scratch] "
    "[--json]": USAGE,
}
"""Every shell command of the docs and how it is checked. A command added to the docs fails
:func:`test_every_doc_command_is_classified` until it is entered here."""

FAST = {
    "train": ["--epochs", "1", "--max-steps", "2"],
    "search": ["--max-paths", "4", "--val-batches", "1", "--calib-batches", "1", "--latency-runs", "0"],
    "finetune": ["--epochs", "1", "--max-steps", "2"],
}
"""Flags added to a run command (the last of a repeated flag wins): the same command, made short."""

def doc_commands():
    return [command for block in blocks() if block.lang in SHELL for command in commands(block)]


def _kind(command):
    kind = CLASSIFIED.get(command.text)
    if kind is None:
        pytest.fail(f"{command.where}: {command.text!r} is not classified: add it to CLASSIFIED in {__file__}")
    return kind


def _commands_of(*kinds):
    return [c for c in doc_commands() if CLASSIFIED.get(c.text) in kinds]


def _cli_words(command):
    """The words after the program, for ``nni-pipebd ...`` and ``python -m nni_pipebd.cli ...``."""
    words = list(command.words)
    if words[0] == "nni-pipebd":
        return words[1:]
    if words[:3] in (["python", "-m", "nni_pipebd.cli"], ["python3", "-m", "nni_pipebd.cli"]):
        return words[3:]
    raise AssertionError(f"{command.where}: {command.text!r} is not an nni-pipebd command")


def _value_checks():
    from nni_pipebd.executors.base import executor_names

    return {"--executor": lambda name: name in executor_names()}


# --- the classification itself ---------------------------------------------------------------------------------------

def test_every_doc_command_is_classified():
    found = doc_commands()
    texts = {c.text for c in found}
    unclassified = [f"{c.where}: {c.text!r}" for c in found if c.text not in CLASSIFIED]
    stale = [text for text in CLASSIFIED if text not in texts]
    assert not unclassified, "doc commands nobody classified (add them to CLASSIFIED):\n" + "\n".join(unclassified)
    assert not stale, "CLASSIFIED names commands no doc holds any more:\n" + "\n".join(stale)
    for command in found:  # a synopsis is checked as one, never run
        if command.placeholders and CLASSIFIED[command.text] in (RUN, PARSE):
            pytest.fail(f"{command.where}: {command.text!r} holds placeholders {command.placeholders}: not {RUN}")
    assert {CLASSIFIED[c.text] for c in found} >= {RUN, USAGE, PARSE}


def test_commands_stand_in_labelled_blocks():
    """A command line in an unlabelled block would escape this file: such blocks must say ``bash`` or ``console``."""
    for block in blocks():
        if block.lang in SHELL or block.lang not in ("", "text"):
            continue
        lines = [line for line in block.text.splitlines() if line.split()[:1] and line.split()[0] in PROGRAMS]
        assert not lines, f"{block.where}: commands in an unlabelled block (label it bash, or console with $): {lines}"


def test_the_parser_reads_shell_as_the_shell_does(tmp_path):
    from doc_commands import Block

    text = ("nni-pipebd train A \\\n    --out B   # a comment\n# only a comment\n"
            "pip install -e '.[x]' && nni-pipebd demo\n")
    found = commands(Block(tmp_path / "x.md", 1, "bash", text))
    assert [c.words for c in found] == [("nni-pipebd", "train", "A", "--out", "B"), ("pip", "install", "-e", ".[x]"),
                                        ("nni-pipebd", "demo")]
    console = commands(Block(tmp_path / "x.md", 1, "console", "$ nni-pipebd demo\nrank 0: done\n"))
    assert [c.text for c in console] == ["nni-pipebd demo"]
    with pytest.raises(ValueError, match="inside a continued line"):
        commands(Block(tmp_path / "x.md", 1, "bash", "nni-pipebd train \\\n"))
    assert found[0].placeholders == ["A", "B"] and not found[2].placeholders


def test_usage_check_catches_what_drifts():
    parser, checks = _parser(), _value_checks()
    assert usage_problems("train CONFIG [--executor reference|pipebd] [--json]".split(), parser, checks) == []
    assert usage_problems("-v search DIR --budget params=1M [--method dna|donna]".split(), parser, checks) == []
    problems = usage_problems("train CONFIG [--executor pipebd|fast] [--wrokers W] [--json x]".split(), parser, checks)
    assert problems == ["--executor 'fast' is not valid", "--wrokers is not an option of 'nni-pipebd train'",
                        "2 positional arguments ['CONFIG', 'x'] for 'nni-pipebd train', which takes 1: ['config']"]
    assert usage_problems("plan CONFIG".split(), parser)[0] == "'nni-pipebd plan' requires --workers, not shown"
    assert "'trian' is not a command" in usage_problems(["trian", "CONFIG"], parser)[0]
    assert usage_problems("search DIR --budget B --method nas".split(), parser) == [
        "--method 'nas' is not one of ['dna', 'donna']"]
    assert usage_problems("train CONFIG --workers two".split(), parser) == ["--workers 'two' is not a valid int"]


# --- the checks, by kind -----------------------------------------------------------------------------------------

def test_usage_lines_match_the_cli_parser():
    checks = _value_checks()
    for command in _commands_of(USAGE):
        problems = usage_problems(_cli_words(command), _parser(), checks)
        assert not problems, f"{command.where}: {command.text!r}: " + "; ".join(problems)


def test_torchrun_lines_match_torchrun_and_the_cli():
    from torch.distributed.run import get_args_parser

    for command in _commands_of(TORCHRUN):
        assert command.words[0] == "torchrun"
        args = get_args_parser().parse_args(list(command.words[1:]))
        assert args.module and args.training_script == "nni_pipebd.cli", command.text
        problems = usage_problems(args.training_script_args, _parser(), _value_checks())
        assert not problems, f"{command.where}: {command.text!r}: " + "; ".join(problems)


def test_parse_commands_parse_and_their_config_loads():
    from nni_pipebd.config import load_config
    from nni_pipebd.demo import DEFAULT_CONFIG

    for command in _commands_of(PARSE):
        words = _cli_words(command)
        assert usage_problems(words, _parser(), _value_checks()) == [], command.text
        args = _parser().parse_args(words)
        config = getattr(args, "config", None) or DEFAULT_CONFIG
        load_config(ROOT / config)


def test_install_lines_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["nni-pipebd"] == "nni_pipebd.cli:main"
    for command in _commands_of(INSTALL):
        target = command.words[command.words.index("-e") + 1]
        path, _, extras = target.partition("[")
        assert path == ".", command.text
        for extra in filter(None, extras.rstrip("]").split(",")):
            assert extra in project["optional-dependencies"], f"{command.where}: no extra {extra!r} in pyproject.toml"
            for requirement in project["optional-dependencies"][extra]:
                name = re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]
                importlib.metadata.distribution(name)  # installed here, or PackageNotFoundError


def test_pytest_lines_find_the_tests():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    for command in _commands_of(PYTEST):
        assert command.words[1:3] == ("-m", "pytest"), command.text
        assert all((ROOT / path).is_dir() for path in ini["testpaths"])
        assert Path(__file__).parent.name in ini["testpaths"]


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
jobs, out = json.loads(sys.argv[1]), {}
for key, (kind, argv) in jobs.items():
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            if kind == "script":
                runpy.run_path(argv[0], run_name="doc_help")["main"](argv[1:])
            else:
                from nni.tools.nnictl.nnictl import parse_args
                sys.argv = ["nnictl", *argv]
                parse_args()
        status = 0
    except SystemExit as stop:
        status = stop.code or 0
    except Exception as err:
        status, buffer = 1, io.StringIO(f"{type(err).__name__}: {err}")
    out[key] = [status, buffer.getvalue()]
print("HELP-JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory):
    """``--help`` of every script and nnictl subcommand the docs name, all in one process: {key: (status, text)}."""
    import json

    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "NNI_CONFIG_DIR": str(home / "nni"), "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore"}
    jobs = {}
    for command in _commands_of(SCRIPT):
        jobs[command.words[1]] = ["script", [str(ROOT / command.words[1]), "--help"]]
    for command in _commands_of(NNICTL):
        sub = _nnictl_subcommand(command)
        jobs["nnictl " + " ".join(sub)] = ["nnictl", [*sub, "--help"]]
    done = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps(jobs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "HELP-JSON" in done.stdout, done.stdout + done.stderr
    return json.loads(done.stdout.split("HELP-JSON", 1)[1])


def _nnictl_subcommand(command):
    return [w for w in command.words[1:] if not w.startswith("-")][:2 if command.words[1] == "algo" else 1]


@pytest.mark.slow
def test_script_lines_match_the_scripts(help_texts):
    for command in _commands_of(SCRIPT):
        assert command.words[0] in ("python", "python3"), command.text
        assert (ROOT / command.words[1]).is_file(), f"{command.where}: no script {command.words[1]}"
        status, text = help_texts[command.words[1]]
        assert status == 0, f"{command.words[1]} --help failed:\n{text}"
        missing = unknown_flags(command.words[2:], text)
        assert not missing, f"{command.where}: {command.text!r}: {missing} not in {command.words[1]} --help"


@pytest.mark.slow
def test_nnictl_lines_match_nnictl_and_the_configs_load(help_texts, capsys):
    from nni.experiment.config import ExperimentConfig

    for command in _commands_of(NNICTL):
        sub = _nnictl_subcommand(command)
        status, text = help_texts["nnictl " + " ".join(sub)]
        assert status == 0, f"nnictl {' '.join(sub)} --help failed:\n{text}"
        missing = unknown_flags(command.words[1:], text)
        assert not missing, f"{command.where}: {command.text!r}: {missing} not in nnictl --help:\n{text}"
        if "--config" in command.words:
            config = ExperimentConfig.load(str(ROOT / command.words[command.words.index("--config") + 1]))
            config.canonical_copy()  # validated as nnictl create validates it
        for word in command.words:
            if word.startswith("$(") and word.endswith(")"):  # a command substitution runs: nni-pipebd nni-meta
                inner = word[2:-1].split()
                assert inner[0] == "nni-pipebd" and main(inner[1:]) == 0, word
                assert Path(capsys.readouterr().out.strip()).is_file(), word


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with a copy of examples/ (teachers trained for 1 epoch when absent) and its own profile cache: the
    run commands' working directory."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "examples", root / "examples", ignore=shutil.ignore_patterns("__pycache__", "data"))
    for config in (root / "examples").glob("*/config.yaml"):
        config.write_text(re.sub(r"(?m)^(\s*train_epochs:)\s*\d+", r"\1 1", config.read_text()))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("NNI_PIPEBD_CACHE", str(root / "cache"))
        yield root


@pytest.mark.slow
def test_run_commands_run(workspace, caplog, capsys):
    """The quick commands, for real and in doc order (quickstart's library serves its search, finetune and report)."""
    import logging
    import time

    caplog.set_level(logging.INFO)
    times = []
    for command in _commands_of(RUN):
        words = _cli_words(command)
        caplog.clear()
        start = time.perf_counter()
        status = main(words + FAST.get(words[0], []))
        times.append(f"{time.perf_counter() - start:5.1f} s  {command.text}")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert status == 0, f"{command.where}: {command.text!r} exited {status}: {errors}"
        args = _parser().parse_args(words)
        for out in [getattr(args, "out", None)] + ([f"{args.directory}/report/report.md"] if words[0] == "report"
                                                  else []):
            assert out is None or Path(out).exists(), f"{command.where}: {command.text!r} wrote no {out}"
    with capsys.disabled():
        print("\n" + "\n".join(times))
