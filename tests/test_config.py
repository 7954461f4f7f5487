import pytest
import torch

from nni_pipebd.config import Config, ConfigError, load_config


def test_defaults_and_round_trip(tmp_path):
    config = Config.from_dict({"data": {"batch_size": 8}, "distill": {"lr": 1},
                               "model": {"teacher": {"checkpoint": "t.pt"}}})
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
    ("data", "name", "mnist2", r"data\.name = 'mnist2'.*torchvision data set"),
    ("data", "class_path", 3, r"data\.class_path = 3 has type int"),
    ("model", "teacher", {"arch": "resnet18", "class_path": "m:f"}, "sets arch and class_path; give one"),
    ("model", "teacher", {"init_args": {"a": 1}}, "init_args .* without class_path"),
    ("model", "teacher", {"class_path": "m:f", "kwargs": {"a": 1}}, "kwargs .* apply to an arch"),
    ("model", "teacher", {"module": "t.pt", "checkpoint": "c.pt"}, "module holds the weights already"),
    ("model", "teacher", {"boundaries": ["layer2", 1.5]}, r"\[1\.5\] are neither module names"),
    ("model", "teacher", {"leaf_modules": "Gate"}, r"model\.teacher\.leaf_modules = 'Gate' has type str"),
    ("model", "teacher", {"autowrap_functions": ["f", 3]},
     r"model\.teacher\.autowrap_functions = \['f', 3\] must be a list of names or import paths"),
    ("execution", "workers", 0, r"execution\.workers = 0 must be > 0"),
    ("execution", "placement", "any", r"placement = 'any' is not valid; choose one of \['free', 'stages'\]"),
    ("execution", "grad_sync", "avg", r"grad_sync = 'avg' is not valid; choose one of \['flat', 'ddp'\]"),
    ("model", "student", {"kernels": [4]}, r"kernels = \[4\] must be odd"),
    ("model", "student", {"heads": [2]}, r"model\.student\.heads = \[2\] is an option of kind: vit, but kind = 'dna'"),
    ("model", "student", {"kind": "vit", "mlp_ratios": [0]}, r"mlp_ratios = \[0\] must be a non-empty list of ints"),
    ("model", "student", {"kind": "vit", "attention": ["se"]}, r"attention = \['se'\] is an option of kind: donna"),
    ("model", "student", {"kind": "vit", "widths": [0]}, r"widths = \[0\] must be a non-empty list of numbers > 0"),
    ("data", "name", "cifar10", r"data\.root must name"),
    ("model", "teacher", {"train_precision": "bf16"},
     r"model\.teacher\.train_precision = 'bf16' is not valid; choose one of \['32-true', '16-mixed', 'bf16-mixed'"),
    ("model", "teacher", {"train_devices": 0}, r"model\.teacher\.train_devices = 0 must be an int >= 1"),
    ("model", "teacher", {"train_strategy": "dp"}, r"model\.teacher\.train_strategy = 'dp' is not valid; .*'ddp_spawn'"),
    ("model", "teacher", {"train_epochs": 0}, r"model\.teacher\.train_epochs = 0 must be > 0"),
    ("execution", "precision", "fp8", r"execution\.precision = 'fp8'.*'fp32', 'bf16', 'fp16'"),
    ("execution", "channels_last", "yes", r"execution\.channels_last = 'yes' has type str"),
])
def test_bad_values(section, key, value, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({section: {key: value}})


def test_data_names_and_user_data_keys():
    random_teacher = {"teacher": {"pretrained": False}}
    assert Config.from_dict({"data": {"name": "MNIST", "root": "x"}, "model": random_teacher}).data.name == "MNIST"
    with pytest.raises(ConfigError, match="data.name = 'digits' and data.class_path"):
        Config.from_dict({"data": {"name": "digits", "class_path": "m:f"}})
    with pytest.raises(ConfigError, match="data.init_args .* without data.class_path"):
        Config.from_dict({"data": {"init_args": {"n": 1}}})


def test_load_config_resolves_relative_paths(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  teacher:\n    checkpoint: t.pt\n")
    config = load_config(path)
    assert config.resolve_path(config.model.teacher.checkpoint) == tmp_path / "t.pt"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_no_silent_random_teacher():
    for raw in ({}, {"model": {"teacher": {"arch": "resnet18"}}}, {"model": {"teacher": {"class_path": "m:f"}}}):
        with pytest.raises(ConfigError, match="no weights .*pretrained: false to distil a random teacher"):
            Config.from_dict(raw)
    for weights in ({"checkpoint": "t.pt"}, {"weights": "IMAGENET1K_V1"}, {"module": "m.pt", "arch": None}):
        assert Config.from_dict({"model": {"teacher": weights}}).model.teacher.pretrained
        with pytest.raises(ConfigError, match="pretrained is false but the teacher has weights"):
            Config.from_dict({"model": {"teacher": {**weights, "pretrained": False}}})
    assert not Config.from_dict({"model": {"teacher": {"pretrained": False}}}).model.teacher.pretrained


def test_replace_validates():
    config = Config.from_dict({"model": {"teacher": {"checkpoint": "t.pt"}}})
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


def test_fp16_needs_cuda(tmp_path):
    """fp16 autocast needs a GPU: refused in the config with device: cpu, at run time when auto finds none."""
    from conftest import tiny_config
    from nni_pipebd.executors.launch import train

    with pytest.raises(ConfigError, match=r"execution\.precision = 'fp16' needs CUDA, but execution\.device = 'cpu'; "
                                          r"use precision: bf16"):
        tiny_config(tmp_path, execution={"precision": "fp16", "device": "cpu"})
    tiny_config(tmp_path, execution={"precision": "fp16", "device": "cuda"})  # a GPU machine's job file loads anywhere
    if torch.cuda.is_available():
        pytest.skip("auto resolves to CUDA here")

    with pytest.raises(ValueError, match=r"execution\.precision = 'fp16' needs CUDA, but execution\.device = 'auto' "
                                         r"\(no GPU visible\) gives cpu; use precision: bf16 \(or fp32\) on CPU"):
        train(tiny_config(tmp_path, execution={"precision": "fp16"}), tmp_path / "run")
    assert not (tmp_path / "run" / "library.json").exists()
