"""Data and input-pipeline settings: `data_config(task, local)` -> `config.data` (no TensorFlow).

`cac_jax.config_defaults.get_base_config` puts this under `config.data`; `input_pipeline.make_dataset`
reads it. Override from the command line as `--config.data.negative_fraction=0.2`.
"""

from __future__ import annotations

import ml_collections

from data_pipeline.constants import DEFAULT_NEIGHBOUR_MM

TASKS = ("calcium", "heart")
# Version of the stored dataset format (`tfds_builder` writes it, the input pipeline reads it).
DATASET_VERSION = "1.1.0"


def data_config(task: str = "calcium", local: bool = False) -> ml_collections.ConfigDict:
    """The data settings for `task` ("calcium" | "heart"); `local` gives the tiny test variant."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.task = task
    # Where `cac-jax ingest --data-dir D --name N` wrote the dataset (D/N/VERSION).
    c.data_dir = "data/tfds"
    c.name = "cac_ct"
    c.version = DATASET_VERSION
    # Seed of sampling, shuffling and augmentation; None -> the top-level `config.seed`.
    c.seed = ml_collections.FieldReference(None, field_type=int)

    # Sizes. Every sample is resampled (one affine per sample) onto an image_size x image_size grid
    # at the scan's own pixel size: smaller scans are padded (weight 0), larger ones cropped.
    # crop_size > 0 trains on random crop_size x crop_size crops instead (evaluation never crops).
    c.image_size = 64 if local else 512
    # The calcium model trains on half-size crops, most of them centred near coronary calcium: 4x
    # the samples per second and a plaque in most samples (it is learnt from the pixels around the
    # plaques; evaluation and inference run on whole slices). The heart model sees whole slices
    # (a crop would cut the heart it must outline). A reference: `--config.data.image_size=128`
    # gives 64 px crops; set crop_size to a number (0: none) to fix it.
    if task == "calcium" and not local:
        c.crop_size = c.get_ref("image_size") // 2
    else:
        c.crop_size = 0
    # With crop_size: the fraction of crops centred (give or take a quarter crop) on a class-1
    # pixel (coronary calcium; heart) of the centre slice when it has one; the rest are random.
    c.crop_positive_fraction = 0.8 if task == "calcium" else 0.0
    # What the calcium model sees (data_pipeline.frames; docs/heart_frame.md): "slice", the whole
    # slice at the scan's own spacing (the paper), or "heart", a frame_size x frame_size window at
    # frame_spacing_mm centred on the heart (the reference heart in training and validation,
    # jittered by up to frame_jitter_mm in training; the predicted heart at inference). With the
    # heart frame, crop_size crops are cut inside it at the same spacing. The heart task always
    # sees whole slices.
    c.calcium_frame = "slice"
    c.frame_spacing_mm = 1.0
    c.frame_size = 48 if local else 192
    c.frame_jitter_mm = 10.0
    c.per_device_batch = 2 if local else 8
    c.eval_per_device_batch = 2 if local else 8
    # Which slices validation runs the model on (records.eval_slice_mask): "all", or "heart" (the
    # calcium task only): the slices within 3 mm of the reference heart, the only slices where
    # the scorer counts calcium and those inference runs the calcium model on, so the validation
    # categories are the same and the pass about half as long; the validation loss and Dice are
    # then those of these slices. Scans without a heart mask keep every slice.
    c.eval_slices = "all"

    # Majority-class subset sampling (paper): each epoch keeps this fraction of "positive" slices
    # (calcium task: any annotated calcium; heart task: any heart) and re-draws this fraction of
    # the others. 0.1 of the calcium-free slices is our choice (the paper gives no number).
    if task == "calcium":
        c.positive_fraction = 1.0
        c.negative_fraction = 0.1
    else:
        c.positive_fraction = 1.0
        c.negative_fraction = 0.5

    # Neighbour slices at a physical distance: offset max(1, round(neighbour_mm / slice spacing))
    # per scan (labels.neighbour_offset; inference uses the same function and reads this value
    # from the checkpoint's config). 3 mm = one gated CAC slice, the spacing Agatston scoring is
    # defined on; CTAC at 3-5 mm keeps offset 1, thin series reach 3 mm (0.625 mm -> 5 slices).
    c.neighbour_mm = DEFAULT_NEIGHBOUR_MM

    # Where the host's scans live while training. "memory": decoded once (3 bytes per voxel, e.g.
    # 55 MB for a 512 x 512 x 70 scan); "stream": read from the TFDS records as the sampling plan
    # reaches them, holding about 2 * shuffle_block_scans scans; "auto": memory when the decoded
    # shard fits in memory_budget_gb (0: half the RAM available when the pipeline starts).
    # Both modes give identical batches for the same seed.
    c.cache = "auto"
    c.memory_budget_gb = 0.0
    # Each epoch visits the scans in a random order in blocks of this many scans and shuffles the
    # samples of a block together (0: the whole shard as one block; stream mode would then hold
    # every scan, so keep it > 0 there).
    c.shuffle_block_scans = 4 if local else 8

    # Augmentation (training only; anatomy-respecting: no left-right flips).
    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.rotation_deg = 10.0     # uniform in [-r, r]
    c.augment.scale = 0.1             # zoom uniform in [1 - s, 1 + s]
    c.augment.translate = 0.05        # shift uniform in [-t, t] of the image size, each axis
    c.augment.intensity_scale = 0.05  # contrast: x * (1 + u), u in [-s, s]
    c.augment.intensity_shift = 0.02  # brightness: x + u, u in [-s, s] (in [0, 1] units)
    c.augment.noise_std = 0.01        # per-voxel noise std in [0, 1] units (~20 HU)
    # Scanner variety (0 = off; docs/training.md "Scanner augmentation"): the noise std drawn per
    # sample in [noise_std, noise_std_max]; a reconstruction kernel drawn per sample: a third of
    # the samples smoothed (Gaussian sigma up to blur_sigma input pixels), a third edge-enhanced
    # (x + a (x - G(x)), a up to `sharpen`, G of sharpen_sigma pixels), a third unchanged; and a
    # tube-voltage contrast: CT numbers above water x (1 + u), u in [-kvp_contrast, kvp_contrast].
    c.augment.noise_std_max = 0.0
    c.augment.blur_sigma = 0.0
    c.augment.sharpen = 0.0
    c.augment.sharpen_sigma = 1.0
    c.augment.kvp_contrast = 0.0

    # tf.data: bounded private thread pool (0 -> min(8, CPUs)), batches prefetched ahead.
    c.num_threads = 2 if local else 0
    c.prefetch_batches = 2
    return c
