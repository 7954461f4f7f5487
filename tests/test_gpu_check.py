"""benchmarks/gpu_check.sh in its CPU quick mode: every step runs, and it says it ran on CPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: run benchmarks/gpu_check.sh itself (this test proves its CPU mode)")
    out = tmp_path / "results.json"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=850, env={**os.environ, "GPU_CHECK_QUICK": "1", "OMP_NUM_THREADS": "1"})
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "no CUDA" in proc.stdout and "NOT a GPU measurement" in proc.stdout, log
    assert "gpu_check.sh: OK on cpu" in proc.stdout, log
    assert " skipped" in proc.stdout and "needs CUDA (marked gpu)" in proc.stdout, log  # the gpu tests skip cleanly
    run = json.loads(out.read_text())
    assert run["device"] == "cpu" and run["gpu_measurement"] is False and run["mode"] == "quick"
    assert [(e["precision"], e["bitwise_equal"], e["losses_equal"]) for e in run["equivalence"]] == \
        [("fp32", True, True), ("bf16", True, True)]
    workloads = run["sizes"]["workloads"]
    assert workloads == ["tiny"]  # quick mode: the tests' tiny job; the benchmark workloads run the same code
    profiles = {(p["workload"], p["setting"]): p for p in run["profiles"]}
    assert set(profiles) == {(w, s) for w in workloads for s in ("fp32", "bf16", "channels_last")}
    for p in profiles.values():
        assert set(p["simulated"]) == {"2", "4", "8"} and "step_s" in p["simulated"]["2"]["TR+DPU+AHD"]
        assert len(p["block_teacher_ms"]) == len(p["block_student_ms"]) > 1
    for w in workloads:  # relays after block 0 carry bf16: half the bytes (block 0 takes the fp32 data)
        fp32, bf16 = (profiles[(w, s)]["activation_in_bytes_per_sample"] for s in ("fp32", "bf16"))
        assert bf16[0] == fp32[0] and bf16[1:] == [b // 2 for b in fp32[1:]]
    assert run["link_model"]["source"] == "assumed" and "assumed" in run["link_model"]["description"]
