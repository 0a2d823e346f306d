"""Shared by every test folder. This folder is on ``sys.path`` (pytest's rootdir conftest), so tests
import the helper modules here by name (``from browser import screenshot``, ``from tiny_pipelines
import BUILDERS``)."""

import pytest
import torch
from tiny_pipelines import BUILDERS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run much faster on one thread than fighting for a shared machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(name)`` -> the saved folder of the tiny pipeline ``name`` of ``BUILDERS`` (built on
    first use, once per session)."""
    root, built = tmp_path_factory.mktemp("tiny_pipelines"), {}

    def get(name: str):
        if name not in built:
            built[name] = BUILDERS[name](root / name)
        return built[name]

    return get
