"""cac-jax: coronary artery calcium scoring with ConvLSTM and UNet models in JAX/Flax.

Importing `cac_jax` (and its scoring, inference and evaluation modules) never imports TensorFlow.
"""

__version__ = "0.1.0"
