"""Layer choices from NNI spaces and search-space dicts; mismatches name the labels."""

import pytest

from conftest import tiny_config
from nni_pipebd.job import build_job
from nni_pipebd.nni.space import SpaceMismatchError, check_space, legacy_search_space, space_choices

LABELS = ["s0_i0", "s1_i0", "s1_i1", "s2_i0", "s2_i1", "s3_i0", "s3_i1"]


@pytest.fixture(scope="module")
def choices():
    return space_choices(build_job(tiny_config()).space)


def test_choices_of_the_student_space(choices):
    assert sorted(choices) == LABELS
    assert all(names == ["k3e2", "k5e2"] for names in choices.values())


def test_legacy_dict_round_trip(choices):
    legacy = legacy_search_space(choices)
    assert legacy["s0_i0"] == {"_type": "choice", "_value": ["k3e2", "k5e2"]}
    assert space_choices(legacy) == choices
    assert space_choices({k: list(v) for k, v in choices.items()}) == choices


def test_mismatch_names_labels_and_candidates(choices):
    given = {k: v for k, v in choices.items() if k != "s3_i1"}
    given["s9_i0"] = ["k3e2"]
    given["s1_i0"] = ["k3e2", "k7e2"]
    with pytest.raises(SpaceMismatchError) as info:
        check_space(given, choices)
    err = info.value
    assert err.only_given == ["s9_i0"] and err.only_library == ["s3_i1"]
    assert err.different == {"s1_i0": (["k3e2", "k7e2"], ["k3e2", "k5e2"])}
    assert "s9_i0" in str(err) and "s3_i1" in str(err) and "k7e2" in str(err) and "student_space()" in str(err)


def test_candidate_order_does_not_matter(choices):
    check_space({k: list(reversed(v)) for k, v in choices.items()}, choices)


def test_bad_search_space_entries():
    with pytest.raises(SpaceMismatchError, match="s0_i0"):
        space_choices({"s0_i0": {"_type": "uniform", "_value": [0, 1]}})
    with pytest.raises(SpaceMismatchError, match="lr"):
        space_choices({"lr": [[0.1], None]})
    with pytest.raises(TypeError, match="legacy search-space dict"):
        space_choices(42)


def test_numeric_choices_are_labels_too_and_other_mutables_are_rejected():
    """Block spaces choose widths, depths and ratios as well as candidate names (issue 12)."""
    import nni
    from nni.nas.nn.pytorch import ModelSpace

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            self.width = self.add_mutable(nni.choice("width", [8, 16]))
            self.ratio = self.add_mutable(nni.choice("ratio", [0.25, 0.5]))

    assert space_choices(Space()) == {"width": [8, 16], "ratio": [0.25, 0.5]}
    assert space_choices({"depth": [0, 1, 2]}) == {"depth": [0, 1, 2]}

    class Uniform(ModelSpace):
        def __init__(self):
            super().__init__()
            self.lr = self.add_mutable(nni.uniform("lr", 0, 1))

    with pytest.raises(SpaceMismatchError, match="lr"):
        space_choices(Uniform())


def test_cli_writes_the_search_space_and_names_the_meta_file(tmp_path, capsys):
    import json

    import yaml

    from nni_pipebd.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path).to_dict()))
    out = tmp_path / "space.json"
    assert main(["nni-space", str(config), "--out", str(out)]) == 0
    space = json.loads(out.read_text())
    assert sorted(space) == LABELS and space["s2_i1"] == {"_type": "choice", "_value": ["k3e2", "k5e2"]}
    assert main(["nni-meta"]) == 0
    from pathlib import Path

    meta = yaml.safe_load(Path(capsys.readouterr().out.strip()).read_text())
    assert meta == {"algoType": "tuner", "builtinName": "PipeBD", "className": "nni_pipebd.nni.tuner.BlockwiseTuner"}


def test_input_choices_and_value_expressions_of_a_user_space(tmp_path):
    """examples/custom/cell_space.py: an InputChoice's values are lists of inputs (NNI's sample format); they survive
    the legacy dict (JSON, as nnictl passes it) and compare in any order; an expression (w * 2) is not a label."""
    import json

    from conftest import user_config
    from nni_pipebd.job import build_student_space

    config = user_config(model={"student": {"class_path": "cell_space:block_space"}})
    choices = space_choices(build_student_space(config))
    assert sorted(choices) == sorted(f"c{i}_{name}" for i in range(3) for name in ("width", "op", "first", "pair"))
    assert choices["c0_width"] == [4, 8] and choices["c0_first"] == [[0], [1]]
    assert choices["c2_pair"] == [[0, 1], [0, 2], [1, 2]]
    again = space_choices(json.loads(json.dumps(legacy_search_space(choices))))
    assert again == choices
    check_space({k: list(reversed(v)) for k, v in again.items()}, choices)
    with pytest.raises(SpaceMismatchError) as info:
        check_space({**choices, "c1_pair": [[0, 1], [0, 2]]}, choices)
    assert info.value.different == {"c1_pair": ([[0, 1], [0, 2]], [[0, 1], [0, 2], [1, 2]])}


def test_what_one_shot_cannot_sample_is_refused_by_name_not_as_a_mismatch():
    import nni
    from nni.nas.nn.pytorch import InputChoice, ModelSpace

    from nni_pipebd.nni.space import UnsupportedChoiceError

    class AnyInputs(ModelSpace):
        def __init__(self):
            super().__init__()
            self.inputs = InputChoice(3, n_chosen=None, label="inputs")

    class Continuous(ModelSpace):
        def __init__(self):
            super().__init__()
            self.ratio = self.add_mutable(nni.uniform("ratio", 0.5, 1.0))

    for space, label, hint in ((AnyInputs(), "inputs", "a fixed n_chosen"), (Continuous(), "ratio", "nni.choice")):
        with pytest.raises(UnsupportedChoiceError) as info:
            space_choices(space)
        message = str(info.value)
        assert f"label {label!r}" in message and hint in message and "does not match" not in message
        assert info.value.only_given == [label]
