"""Shared pytest setup: fake CPU devices for data-parallel tests, quiet TensorFlow."""

import os

# Must be set before JAX initialises its backends (i.e. before any test imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _has_accelerator() -> bool:
    import jax

    return any(device.platform in ("gpu", "tpu") for device in jax.devices())


# The longest test files, run first: `make test` spreads whole files over 2 workers (pytest-xdist
# `--dist loadfile`) in collection order, so a long file collected late (the demo's whole path,
# minutes) would keep one worker busy after the other has run out of files.
LONGEST_FIRST = ("test_demo.py", "test_train.py", "test_train_guards.py", "test_benchmark.py")


def pytest_collection_modifyitems(config, items):
    """Runs the longest files first; skips `gpu`-marked tests on machines without a GPU/TPU (CI
    and most workstations)."""
    import pytest

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept

    # The marker, not the keywords: a parameter id such as "gpu" (a config argument) is a keyword.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _has_accelerator():
        skip = pytest.mark.skip(reason="needs a GPU or TPU (none visible to JAX)")
        for item in gpu_items:
            item.add_marker(skip)
