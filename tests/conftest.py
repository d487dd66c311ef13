"""Shared fixtures. Tests never touch a model hub: everything is built in memory or from shipped assets."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small shapes task on disk (24 train / 8 validation images, 112 px) for the recipes' end-to-end tests."""
    from ivl.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, num_train=24, num_validation=8, width=112, height=112)
    return root
