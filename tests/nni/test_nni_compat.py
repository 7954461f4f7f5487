"""NNI 3.0 workarounds: the JSON loader keeps comment-like text, the nnictl check, a fresh Trainer."""

import importlib
import json

import pytest
import torch

import nni
from nni_pipebd.nni import compat

TRAP = json.dumps({"path": 'a\\"//b', "b": 1})  # an escaped quote before '//' fools json-tricks' comment stripper


@pytest.fixture
def patched():
    compat.patch_json_comments()
    yield
    compat.unpatch_json_comments()


def test_nni_loader_cuts_the_payload_without_the_patch():
    compat.unpatch_json_comments()
    with pytest.raises(json.JSONDecodeError):
        nni.load(TRAP)


def test_patch_keeps_the_payload_in_every_bound_loader(patched):
    assert compat.json_comments_patched()
    for name in compat.PATCHED_MODULES:
        assert importlib.import_module(name).load is compat.load_keeping_comments, name
    assert nni.load(TRAP) == {"path": 'a\\"//b', "b": 1}
    from nni.runtime import msg_dispatcher
    assert msg_dispatcher.load(TRAP)["path"] == 'a\\"//b'


def test_patch_is_idempotent_and_undone(patched):
    compat.patch_json_comments()
    assert nni.load("[1, 2]") == [1, 2]
    compat.unpatch_json_comments()
    assert not compat.json_comments_patched()
    assert nni.load is importlib.import_module("nni.common.serializer").load


def test_nnictl_check_names_the_fix(monkeypatch):
    assert compat.nnictl_problem() is None  # setuptools<81 is a dependency
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: None)
    problem = compat.nnictl_problem()
    assert "pkg_resources" in problem and "setuptools<81" in problem
    with pytest.raises(RuntimeError, match="setuptools<81"):
        compat.require_nnictl()


def test_fresh_trainer_rebuilds_a_traced_trainer():
    @nni.trace
    class Trainer:
        def __init__(self, max_epochs=1):
            self.max_epochs = max_epochs
            self.state = "fresh"

    class Evaluator:
        trainer = Trainer(max_epochs=3)

    evaluator = Evaluator()
    used = evaluator.trainer
    used.state = "ran one model"
    assert compat.fresh_trainer(evaluator) is evaluator
    assert evaluator.trainer is not used
    assert (evaluator.trainer.state, evaluator.trainer.max_epochs) == ("fresh", 3)
    plain = object()
    assert compat.fresh_trainer(plain) is plain


def test_fresh_evaluator_rebuilds_trainer_and_module_and_shares_the_data():
    from nni.nas.evaluator.pytorch import Classification, ClassificationModule, DataLoader, Lightning, Trainer
    from torch.utils.data import TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2)
    for original in (Classification(train_dataloaders=loader, num_classes=2, max_epochs=1, logger=False),
                     Lightning(ClassificationModule(num_classes=2), Trainer(max_epochs=1, logger=False),
                               train_dataloaders=loader)):
        fresh = compat.fresh_evaluator(original)
        assert isinstance(fresh, Lightning) and type(fresh).__name__ == type(original).__name__
        assert fresh is not original
        assert fresh.trainer is not original.trainer and fresh.module is not original.module
        assert fresh.trainer.max_epochs == 1 and fresh.train_dataloaders is loader
    plain = object()
    assert compat.fresh_evaluator(plain) is plain
