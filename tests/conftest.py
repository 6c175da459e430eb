"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """In-process pipeline tests run tiny models: one thread avoids oversubscribing the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The longest files first: pytest-xdist hands whole files to the workers in collection order,
# so starting with the long ones keeps both workers busy until the end.
LONG_FILES = ("test_lifecycle_cli.py", "test_lifecycle_distributed.py", "test_reproduce.py",
              "test_stbp.py", "test_demo.py", "test_sew_cli.py", "test_tsslbp_pipeline.py",
              "test_packaging.py", "test_mini_replication.py", "test_calibration_cli.py",
              "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
