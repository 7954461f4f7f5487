import pytest

from nni_pipebd.config import Config, ConfigError, load_config


def test_defaults_and_round_trip(tmp_path):
    config = Config.from_dict({"data": {"batch_size": 8}, "distill": {"lr": 1}})
    assert config.data.batch_size == 8
    assert config.distill.lr == 1.0 and isinstance(config.distill.lr, float)
    again = Config.from_dict(config.to_dict(), tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.base_dir == str(tmp_path)


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError, match=r"data\.batchsize.*batch_size"):
        Config.from_dict({"data": {"batchsize": 8}})
    with pytest.raises(ConfigError, match=r"'modle'.*distill"):
        Config.from_dict({"modle": {}})


def test_wrong_type_names_key_and_types():
    with pytest.raises(ConfigError, match=r"data\.batch_size = '8' has type str; expected int"):
        Config.from_dict({"data": {"batch_size": "8"}})
    with pytest.raises(ConfigError, match=r"execution\.sync_bn"):
        Config.from_dict({"execution": {"sync_bn": "yes"}})
    with pytest.raises(ConfigError, match=r"execution\.workers = True"):
        Config.from_dict({"execution": {"workers": True}})


@pytest.mark.parametrize("section,key,value,match", [
    ("distill", "loss", "l1", r"distill\.loss = 'l1'.*'mse', 'nmse'"),
    ("data", "name", "mnist", r"data\.name = 'mnist'"),
    ("execution", "workers", 0, r"execution\.workers = 0 must be > 0"),
    ("model", "student", {"kernels": [4]}, r"kernels = \[4\] must be odd"),
    ("data", "name", "cifar10", r"data\.root must name"),
])
def test_bad_values(section, key, value, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({section: {key: value}})


def test_load_config_resolves_relative_paths(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  teacher:\n    checkpoint: t.pt\n")
    config = load_config(path)
    assert config.resolve_path(config.model.teacher.checkpoint) == tmp_path / "t.pt"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_replace_validates():
    config = Config()
    assert config.replace(execution={"workers": 3}).execution.workers == 3
    with pytest.raises(ConfigError, match="execution.workers"):
        config.replace(execution={"workers": -1})


@pytest.mark.parametrize("text,match", [
    ("data:\n\tbatch_size: 3\n", r"bad\.yaml:2:1: invalid YAML: found character '\\t'.*indent with spaces, not tabs"),
    ("data: [1, 2\n", r"bad\.yaml:2:1: invalid YAML"),
    ("", r"bad\.yaml is empty; a job needs at least"),
    ("# only a comment\n", r"bad\.yaml is empty"),
    ("- a\n- b\n", r"bad\.yaml: the top level must be a mapping of sections .* got list"),
    ("just text\n", r"bad\.yaml: the top level must be a mapping of sections .* got str"),
])
def test_load_config_names_file_of_bad_yaml(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "\n" not in str(err.value)
