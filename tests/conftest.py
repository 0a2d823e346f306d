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


def pytest_configure(config):
    """Keep the order below under ``--dist loadfile``: xdist otherwise reorders files by test count."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, costliest first (``slow_cost`` marks), so that ``-n 2 --dist
    loadfile`` hands their files out to both workers at the start and the many quick files fill the
    gaps, instead of one long file starting last on an otherwise idle worker."""

    def cost(item):
        mark = item.get_closest_marker("slow_cost")
        if mark is not None:
            return mark.args[0]
        return 1 if item.get_closest_marker("slow") else 0

    items.sort(key=cost, reverse=True)  # stable: file order within the same cost
