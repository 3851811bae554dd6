"""Shared pytest setup: the ``gpu`` marker skips without CUDA; assets come from ftcore.testing."""

import pytest


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
