"""The lines train and demo end with: what was made, where it lies, what to run next."""

from nni_pipebd.report.summary import train_summary, where_to_look


def _manifest(choices):
    return {"num_blocks": 2, "executor": "pipebd", "workers": 2, "wall_time_s": 3.21,
            "blocks": [{"losses": [2.0, 1.23456], "choices": choices}, {"losses": [], "choices": {}}]}


def test_train_summary_names_the_library_timeline_report_and_next_step(tmp_path):
    (tmp_path / "trace.json").write_text("[]")
    text = train_summary(_manifest({"s0_i0": ["k3e3", "k5e3"]}), tmp_path, tmp_path / "trace.json")
    lines = text.splitlines()
    assert lines[0] == "trained 2 blocks with pipebd on 2 workers in 3.2 s; final block losses: 1.235, -"
    assert lines[1] == f"block library: {tmp_path}  (library.json, block_<i>.pt)"
    assert lines[2].startswith(f"timeline:      {tmp_path / 'trace.json'}  (open it in https://ui.perfetto.dev")
    assert lines[3] == f"report:        nni-pipebd report {tmp_path}  (Markdown with plots)"
    assert lines[4].startswith(f"next:          nni-pipebd search {tmp_path} --budget params=N")


def test_fixed_student_next_is_finetune_and_an_absent_trace_is_left_out(tmp_path):
    lines = train_summary(_manifest({}), "my lib", tmp_path / "absent.json").splitlines()
    assert not any(line.startswith("timeline:") for line in lines)
    assert lines[-1] == "next:          nni-pipebd finetune 'my lib'  (the student end to end)"  # quoted for the shell
    assert where_to_look("lib", report="lib/report/report.md")[1] == "report:        lib/report/report.md"
