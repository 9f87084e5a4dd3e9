"""Tests never reach the network: the hub is offline, and DeepSpeed uses its CPU accelerator.

Tests marked ``gpu`` are skipped, with the reason, where torch sees no CUDA device; ``pytest -m gpu``
selects only them (tests/test_gpu.py starts its own processes on the GPU).
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False); "
                                   "on a GPU machine run `pytest -m gpu`")
    for item in gpu_tests:
        item.add_marker(skip)
