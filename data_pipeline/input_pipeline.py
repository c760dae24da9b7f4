"""tf.data input pipeline: 3-adjacent-slice samples from the stored whole scans, for JAX.

`make_dataset(config, split, process_index=, process_count=, local_devices=)` returns an iterator of
plain dicts of numpy arrays shaped for `jax.pmap` over the local devices:
- `image` (devices, per_device_batch, 3, H, W, 1) float32 in [0, 1]: the slice and its two
  neighbours (edges repeat the edge slice), HU clipped to [-800, 1200] and scaled (paper);
- `label` (devices, per_device_batch, H, W) int32: the centre slice's 3 calcium classes, or the
  heart mask for the heart task;
- `weight` (devices, per_device_batch, H, W) float32: 1 on real pixels, 0 on pixels outside the scan
  (padding of a smaller scan, or rotated-in corners) and on padding samples; use it in the loss;
- `valid` (devices, per_device_batch) bool: False for padding samples (last evaluation batch);
- `scan_index`, `slice_index` (devices, per_device_batch) int32 and, in evaluation, `scan_id`
  (bytes): where the sample came from; `iterator.scans` describes the scans by `scan_index`.

How (design):
- Each host loads only its shard of scans (`tfds.split_for_jax_process`: whole scans, disjoint,
  covering the split), decodes them once and keeps them in memory (int16 HU + uint8 target, one flat
  buffer each: ~2 bytes + 1 byte per voxel). A sample is a (scan, slice) index; cutting its window is
  three contiguous `tf.slice`s, so storage is never tripled and no Python runs per sample. (A host
  shard must fit in RAM: ~27 MB per 512 x 512 x 70 scan, i.e. thousands of scans on a training host.)
- Training epochs are planned in TF from stateless random numbers keyed by (seed, epoch): every
  positive slice (calcium task: any annotated calcium; heart task: any heart) times
  `positive_fraction`, plus `negative_fraction` of the other slices, re-drawn each epoch, in a random
  order. The epoch size is fixed, so step s of a resumed run starts at sample s * host_batch of the
  same stream: resume is exact with only the step recorded in the checkpoint.
- Augmentation (training only, respects anatomy: no left-right flip): rotation, zoom, translation
  and optional random crop in ONE affine resample per sample (`ImageProjectiveTransformV3`,
  bilinear for the image, nearest for label and weight), then intensity jitter and noise. Its random
  numbers are keyed by (seed, process_index, the host's sample index): deterministic under parallel
  maps and resume, and different on each host (the sample index counts this host's samples, so
  without the process index every host would draw the same fields at each step).
- Evaluation walks each scan's slices in order, pads the last batch (`valid` False, weight 0) and
  places each slice at the top-left of the image_size frame without resampling, so the prediction's
  `[:h, :w]` is the scan's own grid (h, w in `iterator.scans`).
- TensorFlow never sees a GPU; its thread pool is bounded (`config.num_threads`); map parallelism and
  prefetch use AUTOTUNE; element order is deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.errors import InputError
from data_pipeline.labels import HU_WINDOW

_TF_CONFIGURED = False
INFINITE = 2**62
_PURPOSE_POSITIVE, _PURPOSE_NEGATIVE, _PURPOSE_ORDER, _PURPOSE_AUGMENT, _PURPOSE_NOISE = 1, 2, 3, 4, 5


def _drop_tfds_dtype_notice(record: logging.LogRecord) -> bool:
    """TFDS 4.9 logs a deprecation notice each time its own code reads `FeatureConnector.dtype`
    (while decoding, not from our code); it says nothing a user can act on."""
    return "FeatureConnector.dtype` is deprecated" not in record.getMessage()


def _tf():
    """Imports TensorFlow with GPUs hidden (JAX owns the accelerators)."""
    global _TF_CONFIGURED
    import tensorflow as tf

    if not _TF_CONFIGURED:
        logging.getLogger("absl").addFilter(_drop_tfds_dtype_notice)
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices; nothing placed on GPU by us
            pass
        _TF_CONFIGURED = True
    return tf


@dataclasses.dataclass(frozen=True)
class ScanInfo:
    """One scan of a host's shard (index = `scan_index` in the batches)."""

    scan_id: str
    patient_id: str
    protocol: str
    site: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    agatston: float | None
    category: int | None
    num_positive_slices: int


@dataclasses.dataclass
class InputIterator:
    """An iterator of batches (dicts of numpy arrays) plus what the loop needs to know.

    `steps` is the number of batches for evaluation (None: infinite training stream);
    `samples_per_epoch` and `steps_per_epoch` describe the training stream of this host. To resume
    training exactly, record the step in the checkpoint and pass it back as
    `make_dataset(..., start_step=step)` (same seed, config and process count).

    Iteration: an evaluation (finite, `steps` set) iterator starts a fresh, complete pass over
    `dataset` at each `iter()` / `for batch in it`, so it can be evaluated again and again. A
    training stream is one continuing stream: `iter()` returns the iterator itself and every
    `next()` or loop goes on where the last one stopped (restart with `make_dataset(...,
    start_step=)`). `next(it)` on an evaluation iterator walks one pass of its own, independent
    of the `for` loops.
    """

    dataset: object  # tf.data.Dataset
    scans: list[ScanInfo]
    split: str
    train: bool
    host_batch: int
    samples_per_epoch: int
    steps: int | None
    _iterator: Iterator | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch on this host (rounded down)."""
        return self.samples_per_epoch // self.host_batch

    def __iter__(self):
        if self.steps is None:
            return self
        return self.dataset.as_numpy_iterator()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self.dataset.as_numpy_iterator()
        return next(self._iterator)


def _data_config(config):
    """(data config, seed) from a full experiment config or a bare data config."""
    data = config.data if "data" in config else config
    seed = data.get("seed", None)
    if seed is None:
        seed = config.get("seed", 0) if "data" in config else 0
    return data, int(seed or 0)


def dataset_path(data) -> Path:
    """DATA_DIR/NAME/VERSION of the dataset a data config points at."""
    from data_pipeline.tfds_builder import dataset_dir

    return dataset_dir(data.data_dir, data.name, data.version)


def _builder(data):
    import tensorflow_datasets as tfds

    path = dataset_path(data)
    if not (path / "dataset_info.json").exists():
        raise InputError(path, "no dataset here; build it with `cac-jax ingest --manifest M.csv "
                               f"--data-dir {data.data_dir} --name {data.name}`")
    return tfds.builder_from_directory(os.fspath(path))


def _host_split(builder, split: str, process_index: int, process_count: int):
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise InputError(_dataset_path_of(builder), f"dataset has no {split!r} split (it has "
                                                   f"{', '.join(builder.info.splits)})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if process_count == 1:
        return split
    return tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count)


def _dataset_path_of(builder) -> str:
    return os.fspath(builder.data_dir)


def _num_examples(builder, host_split) -> int:
    return int(builder.info.splits[host_split].num_examples)


def _target_keys(task: str) -> tuple[str, str, str]:
    if task == "calcium":
        return "calcium_class", "calcium_slice", "has_calcium_labels"
    if task == "heart":
        return "heart_mask", "heart_slice", "has_heart_mask"
    raise ValueError(f"unknown task {task!r}")


def _load_scans(builder, host_split, task: str, options):
    """Decodes the host's scans that have the task's targets; returns arrays and ScanInfo list."""
    import tensorflow_datasets as tfds

    target_key, flag_key, has_key = _target_keys(task)
    if _num_examples(builder, host_split) == 0:  # TFDS refuses to read an empty sub-split
        return [], [], [], []
    wanted = {"scan_id", "patient_id", "protocol", "site", "hu", target_key, flag_key, has_key,
              "spacing_zyx_mm", "agatston", "category"}
    decoders = tfds.decode.PartialDecoding({k: True for k in wanted})
    ds = builder.as_dataset(split=host_split, shuffle_files=False, decoders=decoders)
    ds = ds.with_options(options)
    scans, hu_parts, target_parts, flags = [], [], [], []
    for ex in tfds.as_numpy(ds):
        if not ex[has_key]:
            continue
        hu, target = ex["hu"], ex[target_key]
        agatston = float(ex["agatston"])
        scans.append(ScanInfo(
            scan_id=ex["scan_id"].decode(), patient_id=ex["patient_id"].decode(),
            protocol=ex["protocol"].decode(), site=ex["site"].decode(),
            shape_zyx=tuple(int(n) for n in hu.shape),
            spacing_zyx_mm=tuple(float(v) for v in ex["spacing_zyx_mm"]),
            agatston=None if math.isnan(agatston) else agatston,
            category=None if int(ex["category"]) < 0 else int(ex["category"]),
            num_positive_slices=int(ex[flag_key].sum())))
        hu_parts.append(hu.reshape(-1))
        target_parts.append(target.reshape(-1).astype(np.uint8, copy=False))
        flags.append(ex[flag_key].astype(bool))
    return scans, hu_parts, target_parts, flags


class _ScanStore:
    """The host's scans as flat int16/uint8 buffers with per-slice lookup tables (TF tensors)."""

    def __init__(self, scans, hu_parts, target_parts):
        tf = _tf()
        self.num_scans = len(scans)
        shapes = np.asarray([s.shape_zyx for s in scans], np.int64).reshape(-1, 3)
        voxels = shapes.prod(axis=1)
        starts = np.concatenate([[0], np.cumsum(voxels)[:-1]]).astype(np.int64)
        slices_per_scan = shapes[:, 0]
        self.num_slices = int(slices_per_scan.sum())
        slice_scan = np.repeat(np.arange(self.num_scans), slices_per_scan)
        first_slice = np.concatenate([[0], np.cumsum(slices_per_scan)[:-1]]).astype(np.int64)
        self.slice_scan_np = slice_scan
        self.slice_z_np = np.arange(self.num_slices) - first_slice[slice_scan]
        self.hu = self._flat(tf, hu_parts, np.int16)
        self.target = self._flat(tf, target_parts, np.uint8)
        self.shapes = tf.constant(shapes)
        self.starts = tf.constant(starts)
        self.slice_scan = tf.constant(slice_scan.astype(np.int64))
        self.slice_z = tf.constant(self.slice_z_np.astype(np.int64))
        self.scan_ids = tf.constant([s.scan_id for s in scans] or [""])

    @staticmethod
    def _flat(tf, parts: list, dtype):
        """One TF buffer from the per-scan arrays; empties `parts` so peak RAM stays ~2x."""
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
        parts.clear()
        return tf.constant(flat)

    def window(self, k):
        """(hu (3, h, w) int16, target (h, w) uint8, scan index, z) of global slice k."""
        tf = _tf()
        scan = self.slice_scan[k]
        z = self.slice_z[k]
        shape = self.shapes[scan]
        nz, h, w = shape[0], shape[1], shape[2]
        hw = h * w
        start = self.starts[scan]
        zs = tf.clip_by_value(tf.stack([z - 1, z, z + 1]), 0, nz - 1)
        hu = tf.stack([tf.slice(self.hu, [start + zz * hw], [hw]) for zz in tf.unstack(zs)])
        target = tf.slice(self.target, [start + z * hw], [hw])
        return tf.reshape(hu, [3, h, w]), tf.reshape(target, [h, w]), scan, z


def _plain(fn):
    """Traces `fn` as written: it has no Python control flow on tensors for AutoGraph to convert."""
    return _tf().autograph.experimental.do_not_convert(fn)


def _key(tf, seed: int, purpose: int, counter):
    """A stateless-RNG seed from (seed, purpose, counter), e.g. (seed, augment, sample index)."""
    base = tf.constant([seed & 0x7FFFFFFF, purpose], tf.int32)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(counter, tf.int64))


def _affine(tf, a00, a01, a10, a11, cx_in, cy_in, cx_out, cy_out):
    """Projective-transform vector (8,) mapping output pixel (x, y) to input pixel."""
    a02 = cx_in - a00 * cx_out - a01 * cy_out
    a12 = cy_in - a10 * cx_out - a11 * cy_out
    zero = tf.zeros_like(a00)
    return tf.stack([a00, a01, a02, a10, a11, a12, zero, zero])


def _window_hu(tf, hu):
    low, high = HU_WINDOW
    return (tf.clip_by_value(tf.cast(hu, tf.float32), low, high) - low) / (high - low)


def _resample(tf, image, target, transform, size: int):
    """One affine resample: image (3, h, w) float -> (3, S, S, 1) bilinear; label, weight nearest.

    The label travels as one uint8 channel holding class + 1, so 0 marks pixels from outside the
    scan (weight 0) and one nearest-neighbour pass gives both (the transform's cost grows with
    the channel count; uint8 is its cheapest dtype).
    """
    out_shape = tf.constant([size, size], tf.int32)
    transforms = tf.reshape(transform, [1, 8])
    img = tf.transpose(image, [1, 2, 0])[None]  # (1, h, w, 3)
    img = tf.raw_ops.ImageProjectiveTransformV3(
        images=img, transforms=transforms, output_shape=out_shape, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    lab = (target + 1)[None, :, :, None]
    lab = tf.raw_ops.ImageProjectiveTransformV3(
        images=lab, transforms=transforms, output_shape=out_shape, fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT")[0, :, :, 0]
    image = tf.transpose(img, [2, 0, 1])[..., None]  # (3, S, S, 1)
    label = tf.maximum(tf.cast(lab, tf.int32) - 1, 0)
    return image, label, tf.cast(lab > 0, tf.float32)


def _augment_key(tf, seed: int, purpose: int, process_index: int, index):
    """Stateless-RNG seed of one training sample's augmentation: (seed, purpose, host, sample)."""
    return tf.random.experimental.stateless_fold_in(
        _key(tf, seed, purpose, process_index), tf.cast(index, tf.int64))


def _train_sample(tf, store: _ScanStore, data, seed: int, index, k, process_index: int = 0):
    """Augmented training sample of global slice k; randomness keyed by (host, sample index)."""
    hu, target, scan, z = store.window(k)
    image = _window_hu(tf, hu)
    h = tf.cast(tf.shape(hu)[1], tf.float32)
    w = tf.cast(tf.shape(hu)[2], tf.float32)
    size = int(data.crop_size or data.image_size)
    aug = data.augment
    u = tf.random.stateless_uniform(
        [8], seed=_augment_key(tf, seed, _PURPOSE_AUGMENT, process_index, index),
        minval=-1.0, maxval=1.0)
    on = 1.0 if aug.enabled else 0.0
    theta = on * u[0] * math.radians(aug.rotation_deg)
    zoom = 1.0 + on * u[1] * aug.scale
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    # Window centre in the input: the scan centre, or a random crop position inside the scan.
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    if data.crop_size:
        half = data.crop_size / 2.0
        cx = cx + u[2] * tf.maximum(0.0, w / 2.0 - half)
        cy = cy + u[3] * tf.maximum(0.0, h / 2.0 - half)
    cx = cx + on * u[4] * aug.translate * size
    cy = cy + on * u[5] * aug.translate * size
    centre_out = (size - 1) / 2.0
    transform = _affine(tf, cos, -sin, sin, cos, cx, cy, tf.constant(centre_out),
                        tf.constant(centre_out))
    image, label, weight = _resample(tf, image, target, transform, size)
    if aug.enabled:
        image = image * (1.0 + u[6] * aug.intensity_scale) + u[7] * aug.intensity_shift
        if aug.noise_std > 0:
            # Uniform noise with the configured standard deviation (half-width sqrt(3) * std):
            # a normal draw costs ~2.5x more per voxel and the shape does not matter here.
            noise = tf.random.stateless_uniform(
                tf.shape(image), seed=_augment_key(tf, seed, _PURPOSE_NOISE, process_index, index),
                minval=-math.sqrt(3.0) * aug.noise_std, maxval=math.sqrt(3.0) * aug.noise_std)
            image = image + noise
        image = tf.clip_by_value(image, 0.0, 1.0)
    return {"image": image, "label": label, "weight": weight, "valid": tf.constant(True),
            "scan_index": tf.cast(scan, tf.int32), "slice_index": tf.cast(z, tf.int32)}


def _eval_sample(tf, store: _ScanStore, size: int, num_real: int, i):
    """Slice i of the host's scans in order, at the top-left of the frame; padding marked."""
    valid = i < num_real
    k = tf.minimum(i, num_real - 1)
    hu, target, scan, z = store.window(k)
    h, w = tf.shape(target)[0], tf.shape(target)[1]
    pad = [[0, size - h], [0, size - w]]  # top-left placement: no resampling
    image = tf.pad(_window_hu(tf, hu), [[0, 0], *pad])[..., None]
    label = tf.pad(tf.cast(target, tf.int32), pad)
    weight = tf.pad(tf.ones_like(target, tf.float32), pad)
    weight = weight * tf.cast(valid, tf.float32)
    return {"image": image, "label": label, "weight": weight, "valid": valid,
            "scan_index": tf.cast(scan, tf.int32), "slice_index": tf.cast(z, tf.int32),
            "scan_id": tf.gather(store.scan_ids, scan)}


def _padding_sample(tf, size: int):
    """An all-padding evaluation sample (valid False, weight 0)."""
    return {"image": tf.zeros([3, size, size, 1]), "label": tf.zeros([size, size], tf.int32),
            "weight": tf.zeros([size, size]), "valid": tf.constant(False),
            "scan_index": tf.constant(-1), "slice_index": tf.constant(-1),
            "scan_id": tf.constant("")}


def _epoch_plan(tf, flags: np.ndarray, positive_fraction: float, negative_fraction: float,
                seed: int):
    """Returns (samples per epoch, fn(epoch) -> int64 tensor of global slice indices)."""
    positives = np.flatnonzero(flags).astype(np.int64)
    negatives = np.flatnonzero(~flags).astype(np.int64)
    n_pos = int(round(positive_fraction * len(positives)))
    n_neg = int(round(negative_fraction * len(negatives)))
    pos_t, neg_t = tf.constant(positives), tf.constant(negatives)

    def pick(pool, count, purpose, epoch):
        if count == 0:
            return tf.zeros([0], tf.int64)
        keys = tf.random.stateless_uniform(tf.shape(pool), seed=_key(tf, seed, purpose, epoch))
        return tf.gather(pool, tf.math.top_k(keys, k=count, sorted=True).indices)

    def plan(epoch):
        chosen = tf.concat([pick(pos_t, n_pos, _PURPOSE_POSITIVE, epoch),
                            pick(neg_t, n_neg, _PURPOSE_NEGATIVE, epoch)], axis=0)
        keys = tf.random.stateless_uniform(tf.shape(chosen),
                                           seed=_key(tf, seed, _PURPOSE_ORDER, epoch))
        return tf.gather(chosen, tf.argsort(keys, stable=True))

    return n_pos + n_neg, plan


def _options(tf, data):
    options = tf.data.Options()
    options.deterministic = True
    threads = int(data.get("num_threads", 0) or 0) or min(8, os.cpu_count() or 1)
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = True
    return options


def _shape_batches(tf, ds, local_devices: int, per_device: int, prefetch: int):
    def reshape(batch):
        return {k: tf.reshape(v, tf.concat([[local_devices, per_device], tf.shape(v)[1:]], 0))
                for k, v in batch.items()}

    ds = ds.batch(local_devices * per_device, drop_remainder=True)
    ds = ds.map(_plain(reshape), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(prefetch or tf.data.AUTOTUNE)


def _host_slice_counts(builder, split: str, task: str, process_count: int) -> list[int]:
    """Slices with the task's targets on each host's shard (for equal evaluation steps)."""
    import tensorflow_datasets as tfds

    _, _, has_key = _target_keys(task)
    decoders = tfds.decode.PartialDecoding({"num_slices": True, has_key: True})
    counts = []
    for index in range(process_count):
        host_split = _host_split(builder, split, index, process_count)
        if _num_examples(builder, host_split) == 0:
            counts.append(0)
            continue
        ds = builder.as_dataset(split=host_split, shuffle_files=False, decoders=decoders)
        counts.append(sum(int(ex["num_slices"]) for ex in tfds.as_numpy(ds) if ex[has_key]))
    return counts


def make_dataset(config, split: str, *, process_index: int = 0, process_count: int = 1,
                 local_devices: int = 1, train: bool | None = None,
                 start_step: int = 0) -> InputIterator:
    """The batches of `split` for this host (see the module docstring for the arrays).

    `train` defaults to `split == "train"`: an infinite sampled, augmented stream; otherwise one
    ordered pass over the host's scans with the last batch padded (and, with several processes,
    as many batches on every host). `start_step` resumes a training stream exactly at that step.
    """
    tf = _tf()
    data, seed = _data_config(config)
    train = split == "train" if train is None else train
    builder = _builder(data)
    host_split = _host_split(builder, split, process_index, process_count)
    options = _options(tf, data)
    scans, hu_parts, target_parts, flags = _load_scans(builder, host_split, data.task, options)
    if train and not scans:
        raise InputError(dataset_path(data), f"no scans with {data.task} targets in the {split!r} "
                                             f"split of process {process_index}/{process_count}")
    store = _ScanStore(scans, hu_parts, target_parts)
    del hu_parts, target_parts
    if train:
        per_device = int(data.per_device_batch)
        host_batch = local_devices * per_device
        samples, plan = _epoch_plan(tf, np.concatenate(flags), float(data.positive_fraction),
                                    float(data.negative_fraction), seed)
        if samples == 0:
            raise InputError(dataset_path(data), "sampling keeps no slices (check the fractions)")
        first_sample = int(start_step) * host_batch
        first_epoch, skip = divmod(first_sample, samples)
        indices = tf.data.Dataset.range(first_epoch, INFINITE).flat_map(
            _plain(lambda epoch: tf.data.Dataset.from_tensor_slices(plan(epoch))))
        ds = tf.data.Dataset.zip(tf.data.Dataset.range(first_sample, INFINITE),
                                 indices.skip(skip))
        ds = ds.map(_plain(lambda index, k: _train_sample(tf, store, data, seed, index, k,
                                                          process_index)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        steps = None
    else:
        per_device = int(data.eval_per_device_batch)
        host_batch = local_devices * per_device
        size = int(data.image_size)
        too_big = [s.scan_id for s in scans if max(s.shape_zyx[1:]) > size]
        if too_big:
            raise InputError(dataset_path(data), f"scan(s) {', '.join(too_big)} larger than "
                                                 f"image_size {size}; raise config.data.image_size")
        num_real = store.num_slices
        counts = ([num_real] if process_count == 1
                  else _host_slice_counts(builder, split, data.task, process_count))
        steps = max(math.ceil(c / host_batch) for c in counts)
        samples = num_real
        ds = tf.data.Dataset.range(steps * host_batch)
        if num_real:
            ds = ds.map(_plain(lambda i: _eval_sample(tf, store, size, num_real, i)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:  # this host's shard is empty but others are not: padding batches only
            ds = ds.map(_plain(lambda i: _padding_sample(tf, size)))
    ds = _shape_batches(tf, ds, local_devices, per_device, int(data.prefetch_batches))
    return InputIterator(dataset=ds.with_options(options), scans=scans, split=split, train=train,
                         host_batch=host_batch, samples_per_epoch=samples, steps=steps)
