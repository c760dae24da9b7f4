"""Shared pytest setup: fake CPU devices for data-parallel tests, quiet TensorFlow."""

import os

# Must be set before JAX initialises its backends (i.e. before any test imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _has_accelerator() -> bool:
    import jax

    return any(device.platform in ("gpu", "tpu") for device in jax.devices())


def pytest_collection_modifyitems(config, items):
    """Skips `gpu`-marked tests on machines without a GPU/TPU (CI and most workstations)."""
    import pytest

    # The marker, not the keywords: a parameter id such as "gpu" (a config argument) is a keyword.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _has_accelerator():
        skip = pytest.mark.skip(reason="needs a GPU or TPU (none visible to JAX)")
        for item in gpu_items:
            item.add_marker(skip)
