"""Tests of the data set names known without importing torchvision."""

from __future__ import annotations

from nni_pipebd.data import names
from nni_pipebd.data.datasets import torchvision_datasets


def test_snapshot_is_the_installed_torchvision_names():
    installed = names.installed_torchvision()
    assert installed == names.TORCHVISION_RELEASE, (
        f"torchvision {installed} is installed, the names are of {names.TORCHVISION_RELEASE}: set TORCHVISION_RELEASE "
        "and _TORCHVISION_NAMES to sorted(nni_pipebd.data.datasets.torchvision_datasets()) of the installed release")
    assert names.torchvision_names() == set(torchvision_datasets())


def test_other_release_reads_torchvision(monkeypatch):
    monkeypatch.setattr(names, "installed_torchvision", lambda: "0.0.1")
    monkeypatch.setattr("nni_pipebd.data.datasets.torchvision_datasets", lambda: {"mydata": object})
    assert names.torchvision_names() == {"mydata"}

