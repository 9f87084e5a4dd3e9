"""Tests never reach the network: the hub is offline, and DeepSpeed uses its CPU accelerator.

Tests marked ``gpu`` are skipped, with the reason, where torch sees no CUDA device; ``pytest -m gpu``
selects only them (tests/test_gpu.py starts its own processes on the GPU).
"""

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
# The versions `make test` prints at its start: the ones the results depend on most.
SHOWN = ("torch", "deepspeed", "transformers", "peft", "datasets", "tokenizers", "huggingface_hub", "safetensors",
         "numpy", "pydantic")

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


def locked_versions() -> dict[str, str]:
    """requirements-lock.txt as {package: version}: the environment the suite and the sweeps were proven in."""
    pins = (re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line) for line in LOCK.read_text().splitlines())
    return {match[1]: match[2] for match in pins if match}


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def pytest_report_header(config):
    shown = ", ".join(f"{name} {installed_version(name)}" for name in SHOWN)
    return [f"versions: python {platform.python_version()}, {shown}"]


# The fixture folder holds the scripts that made its files (run from an old commit), not tests or doctests.
collect_ignore_glob = ["fixtures/*"]
