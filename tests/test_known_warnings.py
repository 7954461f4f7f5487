"""Scripts and ``python -m`` entry points print no known third-party warning, as the CLI does."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_SCRIPTS = """
import importlib.util, sys
sys.path.insert(0, {benchmarks!r})
for path in {scripts!r}:
    spec = importlib.util.spec_from_file_location(path.split('/')[-1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the module-level imports, not main()
from nni_pipebd.nni.trial import main
main(['--params', {params!r}])
"""


@pytest.mark.slow
def test_benchmark_scripts_and_the_trial_entry_point_print_no_third_party_warning(tmp_path):
    scripts = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py") if p.name != "docgen.py")
    params = tmp_path / "params.json"
    params.write_text('{"task": "nothing"}')  # refused after the imports: the warnings would be out by then
    code = _IMPORT_SCRIPTS.format(benchmarks=str(ROOT / "benchmarks"), scripts=scripts, params=str(params))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    assert "task" in done.stderr  # the trial ran as far as reading its parameters (and refused them)
