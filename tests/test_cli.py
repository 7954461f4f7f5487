"""The README's main job, shrunk: `nni-pipebd train` on digits with a teacher trained and cached first."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import FP64_CLOSE, assert_same_blocks
from nni_pipebd.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "config.yaml"
pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def digits_config(tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model"]["teacher"]["train_epochs"] = 1      # the example trains longer; the flow is the same
    raw["model"]["teacher"]["checkpoint"] = "teacher.pt"
    raw["execution"]["threads_per_worker"] = 1
    raw["distill"]["optimizer"] = "sgd"  # Adam turns rounding-size gradient differences into lr-size steps
    raw["distill"].update({"epochs": 2, "until": "epochs"})
    raw["execution"]["precision"] = "fp64"  # dp splits the batch: float64, where rounding cannot move the weights
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_train_digits_reference_then_dp(digits_config, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", str(digits_config), "--executor", "reference", "--max-steps", "2", "--out", str(a)]) == 0
    assert "is absent: training mobilenet_v2 on digits" in caplog.text
    assert (tmp_path / "teacher.pt").is_file()
    manifest = json.loads((a / "library.json").read_text())
    assert manifest["num_blocks"] == 6 and manifest["executor"] == "reference"
    assert manifest["config"]["data"]["name"] == "digits"
    assert all(len(block["losses"]) == 2 and block["steps"] == 4 for block in manifest["blocks"])  # 2 epochs x 2
    student = yaml.safe_load(EXAMPLE.read_text())["model"]["student"]
    assert manifest["blocks"][0]["choices"]["s0_i0"] == [f"k{k}e{e}" for k in student["kernels"]
                                                          for e in student["expansions"]]
    capsys.readouterr()
    assert main(["train", str(digits_config), "--executor", "dp", "--workers", "2", "--max-steps", "2",
                 "--out", str(b), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["executor"] == "dp" and summary["workers"] == 2
    assert summary["counters"]["teacher_block_forwards_per_sample"] == 21
    assert_same_blocks(a, b, 6, **FP64_CLOSE)


def test_cli_errors_exit_2_with_message(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batchsize: 3\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key 'data.batchsize'" in caplog.text
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in caplog.text


@pytest.mark.slow
def test_train_pipebd_cli_matches_reference(tmp_path):
    from conftest import tiny_config

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path).to_dict()))
    a, b = tmp_path / "ref", tmp_path / "pipe"
    assert main(["train", str(path), "--out", str(a)]) == 0
    assert main(["train", str(path), "--executor", "pipebd", "--workers", "2", "--boundaries", "0,3",
                 "--no-decoupled", "--trace", str(tmp_path / "t.json"), "--out", str(b)]) == 0
    assert_same_blocks(a, b, 5, exact=True)
    manifest = json.loads((b / "library.json").read_text())
    assert manifest["config"]["execution"]["boundaries"] == [0, 3]
    assert manifest["config"]["execution"]["decoupled"] is False
    assert [r["label"] for r in manifest["ranks"]] == ["stage 0: blocks 0-2", "stage 1: blocks 3-4"]
    assert (tmp_path / "t.json").is_file()
    assert main(["train", str(path), "--executor", "pipebd", "--boundaries", "0,x", "--out", str(b)]) == 2


@pytest.mark.slow
def test_blocks_and_train_with_user_teacher_and_data(tmp_path, capsys):
    """examples/custom: a class_path teacher and a class_path data set, beside a config in the user's folder."""
    import shutil

    custom = EXAMPLE.parents[1] / "custom"
    for module in ("custom_teacher.py", "custom_data.py", "custom_space.py"):
        shutil.copy(custom / module, tmp_path / module)
    raw = yaml.safe_load((custom / "config.yaml").read_text())
    raw["model"]["teacher"].update(init_args={"in_channels": 1, "width": 4}, train_epochs=1)
    raw["model"]["teacher"]["boundaries"] = ["stage1", "stage2", "adaptive_avg_pool2d"]
    raw["data"]["batch_size"] = 16
    raw["execution"].update(threads_per_worker=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["blocks", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "TinyResNet on input (1, 16, 16)" in listing
    assert "model.teacher.boundaries: ['stage1', 'stage2', 'adaptive_avg_pool2d']" in listing
    out = tmp_path / "lib"
    assert main(["train", str(config), "--max-steps", "2", "--epochs", "1", "--out", str(out)]) == 0
    assert (tmp_path / "teacher.pt").is_file()  # trained on the user's data first (train_if_missing)
    assert (out / "logs" / "teacher_teacher").is_dir() and not (tmp_path / "logs").exists()  # its logs: the run's
    manifest = json.loads((out / "library.json").read_text())
    assert manifest["num_blocks"] == 4 and manifest["executor"] == "pipebd" and manifest["workers"] == 2
    assert manifest["config"]["data"]["class_path"] == "custom_data:digits"
    assert set(manifest["blocks"][0]["choices"]) == {"b0_width", "b0_op", "b0_depth"}  # the user's NNI space


def test_blocks_shows_a_vision_transformers_default_blocks(tmp_path, capsys):
    """A teacher whose resolution never drops (torchvision's ViT by class_path): its encoder layers in balanced blocks,
    each block's share of the MACs listed."""
    from conftest import tiny_config

    teacher = {"arch": None, "kwargs": {}, "class_path": "torchvision.models.vision_transformer.VisionTransformer",
               "init_args": {"image_size": 16, "patch_size": 4, "num_layers": 4, "num_heads": 2, "hidden_dim": 16,
                             "mlp_dim": 32, "num_classes": 10}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, model={"teacher": teacher}).to_dict()))
    assert main(["blocks", str(config)]) == 0
    listing = capsys.readouterr().out
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(1, 4)]
    assert f"model.teacher.boundaries: {layers + ['getitem_13']}" in listing
    shares = [float(v.rstrip("%")) for v in listing.split("MACs per block: ")[1].splitlines()[0].split(", ")]
    assert len(shares) == 5 and abs(sum(shares) - 100) < 0.5 and max(shares[1:4]) - min(shares[1:4]) < 0.1
    for layer in layers:
        assert next(row for row in listing.splitlines() if row.startswith(layer + " ")).endswith("used (default)")


def _error_rows(tmp_path):
    """(argv, expected message) for every kind of error the package knows, set up in ``tmp_path``."""
    from conftest import tiny_config

    def job(name, **sections):
        raw = tiny_config(tmp_path).to_dict()
        for section, values in sections.items():
            for key, value in values.items():
                raw[section][key] = {**raw[section][key], **value} if isinstance(value, dict) else value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    (tmp_path / "tab.yaml").write_text("data:\n\tbatch_size: 3\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a_file").write_text("")
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "config.json").write_text(json.dumps(tiny_config(tmp_path).to_dict()))
    good = job("good")
    return [
        (["train", str(tmp_path / "tab.yaml")], r"ConfigError: .*tab\.yaml:2:1: invalid YAML: .*not tabs"),
        (["train", str(tmp_path / "empty.yaml")], r"ConfigError: .*empty\.yaml is empty"),
        (["train", job("value", data={"batch_size": 0})], r"ConfigError: data\.batch_size = 0 must be > 0"),
        (["train", job("teacher", model={"teacher": {"checkpoint": "absent.pt", "pretrained": True}})], r"absent\.pt"),
        (["train", job("random", model={"teacher": {"pretrained": True}})], r"ConfigError: model\.teacher has no weights"),
        (["train", job("split", model={"teacher": {"boundaries": ["stage2_dwn"]}})],
         r"TeacherError: .*no module 'stage2_dwn'; close names: \['stage2_down'"),
        (["train", job("import", model={"teacher": {"arch": None, "kwargs": {}, "class_path": "no_such_mod:f"}})],
         r"TeacherError: .*no module named 'no_such_mod'"),
        (["train", job("data", data={"name": "imagefolder", "root": "no_such_folder"})], r"no_such_folder"),
        (["train", job("nan", distill={"lr": 1e30, "max_steps_per_epoch": 6})],
         r"NonFiniteLossError: block \d: loss is (nan|inf) at step \d"),
        (["train", good, "--resume", str(interrupted), "--epochs", "3"],
         r"CheckpointError: cannot resume .* changed config: distill\.epochs \(1 -> 3\)"),
        (["train", good, "--out", str(tmp_path / "a_file")], r"FileExistsError: --out .*a_file is a file, not a folder"),
        (["train", good, "--out", str(tmp_path / "a_file" / "sub")], r"--out .*a_file/sub: cannot create or write"),
        (["train", good, "--executor", "pipebd", "--workers", "9"], r"9 workers > 5 blocks"),
    ]


def test_every_known_error_is_one_line_exit_2(tmp_path, caplog):
    import re

    for argv, match in _error_rows(tmp_path):
        caplog.clear()
        assert main(argv) == 2, argv
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is None, (argv, caplog.text)
        message = errors[0].getMessage()
        assert "\n" not in message and re.search(match, message), (argv, message)
    assert not list(tmp_path.glob("**/library.json"))


@pytest.mark.slow
def test_error_traceback_only_with_debug(tmp_path):
    import subprocess
    import sys

    (tmp_path / "tab.yaml").write_text("data:\n\tbatch_size: 3\n")
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    plain = subprocess.run([sys.executable, "-m", "nni_pipebd.cli", "train", "tab.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "nni_pipebd.cli", "--debug", "train", "tab.yaml"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "tab.yaml:2:1: invalid YAML" in plain.stderr
    assert "Traceback" in debug.stderr


@pytest.mark.slow
def test_train_output_is_clean_and_verbose_shows_third_party_warnings(tmp_path):
    """A first run prints our lines only: no third-party warning (lead or spawned workers), each rank's progress line
    once, and where the results lie; ``-v`` shows NNI's import warnings again."""
    import subprocess
    import sys
    from conftest import tiny_config

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2}).to_dict()))
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*flags):
        verbose, options = [f for f in flags if f == "-v"], [f for f in flags if f != "-v"]
        done = subprocess.run([sys.executable, "-m", "nni_pipebd.cli", *verbose, "train", "job.yaml", "--out", "lib",
                               "--overwrite", *options],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return done

    plain = run()
    lines = (plain.stdout + plain.stderr).splitlines()
    assert not [line for line in lines if "Warning" in line or "warnings.warn" in line], plain.stderr
    assert [line.split(":")[0] for line in plain.stderr.splitlines() if line.startswith("rank ")] == \
        ["rank 0 stage 0", "rank 1 stage 1"]  # one line per rank (stderr is not a terminal), labelled once
    assert plain.stdout.startswith("trained 5 blocks with pipebd on 2 workers in ")
    assert "block library: lib" in plain.stdout and "timeline:      lib/trace.json" in plain.stdout
    assert "nni-pipebd report lib" in plain.stdout and "nni-pipebd search lib --budget" in plain.stdout
    verbose = run("-v", "--workers", "1")  # one process: enough to see the filters lifted
    assert "RuntimeWarning: <class 'torch.nn.parameter.Buffer'> is found to be not a nn.Module" in verbose.stderr


def test_known_warnings_hidden_and_others_kept():
    import warnings

    from nni_pipebd.known_warnings import hide_known_warnings

    def shown(message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hide_known_warnings()
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        return len(caught) == 1

    nni_layers = "nni.nas.nn.pytorch.layers"
    assert not shown("<class 'torch.nn.parameter.Buffer'> is found to be not a nn.Module, which is unexpected.",
                     RuntimeWarning, nni_layers)
    assert not shown("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "pytorch_lightning.utilities")
    assert not shown("pkg_resources is deprecated as an API", DeprecationWarning, "nni.tools.nnictl")
    assert shown("something else went wrong", RuntimeWarning, nni_layers)  # NNI's other warnings stay visible
    assert shown("old API", FutureWarning, "custom_teacher")  # so do the user's own and ours
    assert shown("old API", FutureWarning, "nni_pipebd.job")


_PROBE = """
import contextlib, io, json, logging, sys
from nni_pipebd.cli import main

HEAVY = ("torch", "torchvision", "nni", "pytorch_lightning", "lightning")
rows = []
for argv in json.loads(sys.argv[1]):
    logging.root.handlers.clear()  # main configures logging again, onto this command's stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as stop:  # --help, --version
            status = stop.code
    rows.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(),
                 "heavy": [name for name in HEAVY if name in sys.modules]})
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_errors_before_heavy_imports(tmp_path):
    """Bad arguments, configs and library folders fail, one line and exit 2, before torch, torchvision, NNI or
    Lightning is imported; ``--help`` and ``--version`` too (one fresh interpreter runs every command in turn)."""
    import importlib.metadata
    import re
    import subprocess
    import sys

    from conftest import tiny_config

    def job(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    library = tmp_path / "lib"  # a library.json that checks (a fake library: nothing here loads its blocks)
    library.mkdir()
    (library / "library.json").write_text(json.dumps({"format": "nni_pipebd.library/1", "base_dir": str(tmp_path),
                                                      "config": tiny_config(tmp_path).to_dict()}))
    good = str(tmp_path / "good.yaml")
    Path(good).write_text(yaml.safe_dump(tiny_config(tmp_path).to_dict()))
    nolib = str(tmp_path / "nolib")
    errors = [
        (["train", job("typo.yaml", "model: {}\ndistil: {}\n")], r"ConfigError: unknown key 'distil' in the config"),
        (["blocks", job("type.yaml", "data: {batch_size: '32'}\n")],
         r"ConfigError: data\.batch_size = '32' has type str; expected int"),
        (["profile", job("range.yaml", "distill: {min_improvement: 1.5}\n")],
         r"ConfigError: distill\.min_improvement = 1\.5 must be in \[0, 1\)"),
        (["plan", job("both.yaml", "execution: {plan: p.json, boundaries: [0, 2]}\n"), "--workers", "2"],
         r"ConfigError: execution\.plan = 'p\.json' and execution\.boundaries = \[0, 2\] both set"),
        (["nni-space", job("name.yaml", "data: {name: MNST, root: x}\n")],
         r"ConfigError: data\.name = 'MNST' is not valid; choose one of \['digits'"),
        (["demo", "--config", str(tmp_path / "absent.yaml")], r"ConfigError: config file .*absent\.yaml' does not exist"),
        (["demo", "--workers", "0"], r"ConfigError: execution\.workers = 0 must be > 0"),
        (["train", good, "--boundaries", "0,x"], r"ValueError: --boundaries '0,x' must be comma-separated integers"),
        (["train", good, "--resume", "a", "--out", "b"], r"ValueError: --resume a and --out b name different folders"),
        (["train", good, "--memory-limit", "-1"], r"ConfigError: execution\.memory_limit_mb = -1\.0 must be > 0"),
        (["search", nolib, "--budget", "params=1X"], r"BudgetError: budget 'params=1X': '1X' is not a non-negative"),
        (["search", nolib, "--budget", "params=1M"], r"LibraryError: .*nolib holds no library\.json"),
        (["search", str(library), "--budget", "params=1M", "--max-paths", "0"],
         r"SearchError: ranking setting max_paths = 0 must be an int >= 1"),
        (["finetune", nolib, "--epochs", "-1"], r"SearchError: finetune setting epochs = -1 must be an int >= 0"),
        (["finetune", str(library), "--arch", str(tmp_path / "absent.json")],
         r"SearchError: architecture file .*absent\.json' does not exist"),
        (["report", nolib], r"LibraryError: .*nolib holds no library\.json"),
    ]
    light = [["--help"], ["--version"], ["train", "--help"], ["nni-meta"]]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([argv for argv, _ in errors] + light)],
                          cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for (argv, match), row in zip(errors, rows):
        lines = row["stderr"].splitlines()
        assert row["status"] == 2 and len(lines) == 1 and re.search(r" ERROR nni_pipebd: " + match, lines[0]), \
            (argv, row)
        assert not row["heavy"], (argv, row["heavy"])
    help_, version, train_help, meta = rows[len(errors):]
    assert help_["status"] == 0 and "{train,blocks,profile,plan,demo,report,search,finetune" in help_["stdout"]
    assert version["status"] == 0 and version["stdout"] == f"nni-pipebd {importlib.metadata.version('nni-pipebd')}\n"
    assert train_help["status"] == 0 and "--resume DIR" in train_help["stdout"]
    assert meta["status"] == 0 and meta["stdout"].strip().endswith("nni_meta.yml")
    assert not rows[-1]["heavy"], rows[-1]["heavy"]
    assert not Path(nolib).exists()  # report made no folder for a library that is not there
