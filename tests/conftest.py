"""Shared pytest setup: fake CPU devices for data-parallel tests, quiet TensorFlow."""

import os

# Must be set before JAX initialises its backends (i.e. before any test imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
