"""Data side of cac-jax: CT study I/O, the synthetic cohort, manifests and the TFDS/tf.data input.

Importing this package (and `data_pipeline.io`, `data_pipeline.manifest`, `data_pipeline.phantom`)
never imports TensorFlow; only `data_pipeline.tfds_builder` and `data_pipeline.input_pipeline` do,
so a workstation that only scores studies does not pay for it.
"""
