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
  (bytes): where the sample came from; `iterator.scans` describes the scans by `scan_index`
  (with each scan's `neighbour_offset`); `iterator.cache` and `iterator.neighbour_mm` say how the
  batches were made.

How (design):
- Each host reads only its shard of scans (`tfds.split_for_jax_process`: whole scans, disjoint,
  covering the split; TFDS slicing such as "train[:100]" selects a subset). The scans' metadata
  (ids, shapes, spacing, per-slice flags) is read first without decoding any volume.
- `config.data.cache` says where the voxels live: "memory" decodes the shard once into one
  preallocated int16 HU and one uint8 target buffer (3 bytes per voxel: ~55 MB per 512 x 512 x 70
  scan), filled scan by scan, so loading peaks at the decoded size plus one scan; "stream" reads
  each scan from the TFDS records when the sampling plan reaches it (random access by record
  offset, the next block decoded in the background) and holds about two blocks of scans, whatever
  the dataset's size; "auto" picks memory when the shard fits `memory_budget_gb`. Both modes give
  the same batches for a seed. The voxels stay in numpy and tf.data reaches them through one
  `tf.numpy_function` per sample that returns its window: a `tf.constant` captured by a tf.data
  function is copied by tf.data's graph rewrites (twice the RAM), and creating a `tf.Variable`
  from numpy transiently needs three times the buffer.
- Windows: each slice with its neighbours `neighbour_offset(dz, config.data.neighbour_mm)` slices
  away (a physical distance, 3 mm by default; edges repeat), cut by `labels.window_indices`, the
  function inference uses.
- Training epochs are planned from stateless random numbers keyed by (seed, epoch): every
  positive slice (calcium task: any annotated calcium; heart task: any heart) times
  `positive_fraction`, plus `negative_fraction` of the other slices, re-drawn each epoch; the
  epoch visits the scans in a random order in blocks of `shuffle_block_scans` scans and shuffles
  each block's samples together (what streaming needs; memory mode follows the same plan). The
  epoch size is fixed, so step s of a resumed run starts at sample s * host_batch of the same
  stream: resume is exact with only the step recorded in the checkpoint.
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

Modules: this one builds the tf.data graph (`make_dataset`, the samples, the epoch plan);
`data_pipeline.records` reads the records and the scans' metadata (scan index);
`data_pipeline.scan_store` holds the voxels (memory or streaming store, heart-frame windows).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from collections.abc import Iterator

import numpy as np

from data_pipeline import frames as frames_lib
from data_pipeline import labels as labels_lib
from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.errors import InputError
from data_pipeline.labels import DEFAULT_NEIGHBOUR_MM, HU_WINDOW
from data_pipeline.records import (  # noqa: F401  (re-exported: tests and cac_jax use them here)
    _META_KEYS,
    ScanInfo,
    _builder,
    _data_config,
    _host_slice_counts,
    _host_split,
    _read_meta,
    _Records,
    _target_keys,
    _tf,
    dataset_path,
    eval_slice_mask,
)
from data_pipeline.scan_store import _MemoryStore, _Source, _StreamStore  # noqa: F401

INFINITE = 2**62
_PURPOSE_POSITIVE, _PURPOSE_NEGATIVE, _PURPOSE_ORDER, _PURPOSE_AUGMENT, _PURPOSE_NOISE = 1, 2, 3, 4, 5
_PURPOSE_CROP = 6
_PURPOSE_FRAME = 7
_PURPOSE_SCANNER = 8


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
    cache: str = "memory"  # where the scans are: "memory" or "stream" (config.data.cache)
    neighbour_mm: float = DEFAULT_NEIGHBOUR_MM  # neighbour distance the windows were cut at
    store: object = None  # the scan source (memory or streaming), for inspection
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


def _resample(tf, image, target, transform, size: int, candidate=None):
    """One affine resample: image (3, h, w) float -> (3, S, S, 1) bilinear; label, weight and the
    candidate mask nearest.

    The label travels as one uint8 channel holding class + 1 (+ 4 on a candidate pixel), so 0
    marks pixels from outside the scan (weight 0) and one nearest-neighbour pass gives all three
    (the transform's cost grows with the channel count; uint8 is its cheapest dtype).
    """
    out_shape = tf.constant([size, size], tf.int32)
    transforms = tf.reshape(transform, [1, 8])
    img = tf.transpose(image, [1, 2, 0])[None]  # (1, h, w, 3)
    img = tf.raw_ops.ImageProjectiveTransformV3(
        images=img, transforms=transforms, output_shape=out_shape, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    code = target + 1
    if candidate is not None:
        code = code + 4 * tf.cast(candidate, code.dtype)
    lab = tf.raw_ops.ImageProjectiveTransformV3(
        images=code[None, :, :, None], transforms=transforms, output_shape=out_shape,
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")[0, :, :, 0]
    image = tf.transpose(img, [2, 0, 1])[..., None]  # (3, S, S, 1)
    lab = tf.cast(lab, tf.int32)
    label = tf.maximum(lab % 4 - 1, 0)
    return image, label, tf.cast(lab > 0, tf.float32), lab >= 4


def _augment_key(tf, seed: int, purpose: int, process_index: int, index):
    """Stateless-RNG seed of one training sample's augmentation: (seed, purpose, host, sample)."""
    return tf.random.experimental.stateless_fold_in(
        _key(tf, seed, purpose, process_index), tf.cast(index, tf.int64))


def _positive_crop_centre(tf, data, target, cx, cy, key, ratio_yx=(1.0, 1.0)):
    """Crop centre (x, y): with probability `crop_positive_fraction`, when the centre slice has
    class-1 pixels (coronary calcium; heart), one of them picked at random and moved by up to a
    quarter of the crop each way (so the positive is not always in the middle); else (cx, cy).

    Foreground-centred crops (as nnU-Net oversamples foreground patches): a coronary plaque is a
    few pixels of a slice, so a random crop would rarely hold one.
    """
    u = tf.random.stateless_uniform([4], seed=key, minval=0.0, maxval=1.0)
    positives = tf.cast(tf.where(tf.equal(target, 1)), tf.float32)  # (n, 2): (y, x)
    count = tf.shape(positives)[0]
    # A last row (cy, cx) keeps the gather in range when the slice has no positive pixel.
    positives = tf.concat([positives, tf.reshape(tf.stack([cy, cx]), [1, 2])], axis=0)
    pick = tf.minimum(tf.cast(u[1] * tf.cast(count, tf.float32), tf.int32), count)
    chosen = tf.gather(positives, pick)
    quarter = data.crop_size / 4.0  # output pixels; `ratio_yx` input pixels per output pixel
    use = tf.logical_and(count > 0, u[0] < float(data.crop_positive_fraction))
    px = chosen[1] + (2.0 * u[2] - 1.0) * quarter * ratio_yx[1]
    py = chosen[0] + (2.0 * u[3] - 1.0) * quarter * ratio_yx[0]
    return tf.where(use, px, cx), tf.where(use, py, cy)


def _train_sample(tf, store: _Source, data, seed: int, index, k, process_index: int = 0,
                  key=0):
    """Augmented training sample of global slice k; randomness keyed by (host, sample index).

    Whole-slice frame: the sample's grid is the scan's own, centred on the scan (or a crop of it).
    Heart frame (data_pipeline.frames): the grid has `frame_spacing_mm` pixels (`ratio` scan pixels
    each) centred on the scan's reference heart, jittered by up to `frame_jitter_mm` each way; a
    crop is cut inside that frame at the same spacing.
    """
    hu, target, scan, z, centre = store.window(k, key)
    image = _window_hu(tf, hu)
    h = tf.cast(tf.shape(hu)[1], tf.float32)
    w = tf.cast(tf.shape(hu)[2], tf.float32)
    heart = frames_lib.uses_heart_frame(data)
    frame = int(data.frame_size) if heart else int(data.image_size)
    size = int(data.crop_size or frame)
    aug = data.augment
    u = tf.random.stateless_uniform(
        [8], seed=_augment_key(tf, seed, _PURPOSE_AUGMENT, process_index, index),
        minval=-1.0, maxval=1.0)
    on = 1.0 if aug.enabled else 0.0
    theta = on * u[0] * math.radians(aug.rotation_deg)
    zoom = 1.0 + on * u[1] * aug.scale
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    if heart:
        ry = tf.gather(store.ratios_t, scan)[0]
        rx = tf.gather(store.ratios_t, scan)[1]
        jitter = tf.random.stateless_uniform(
            [2], seed=_augment_key(tf, seed, _PURPOSE_FRAME, process_index, index),
            minval=-1.0, maxval=1.0) * (float(data.frame_jitter_mm) / float(data.frame_spacing_mm))
        cy, cx = centre[0] + jitter[0] * ry, centre[1] + jitter[1] * rx
        if data.crop_size:
            spread = max(0.0, (frame - data.crop_size) / 2.0)
            cx = cx + u[2] * spread * rx
            cy = cy + u[3] * spread * ry
    else:
        ry = rx = tf.constant(1.0)
        # Window centre in the input: the scan centre, or a random crop position inside it.
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        if data.crop_size:
            half = data.crop_size / 2.0
            cx = cx + u[2] * tf.maximum(0.0, w / 2.0 - half)
            cy = cy + u[3] * tf.maximum(0.0, h / 2.0 - half)
    if data.crop_size and float(data.get("crop_positive_fraction", 0.0)) > 0:
        cx, cy = _positive_crop_centre(tf, data, target, cx, cy, _augment_key(
            tf, seed, _PURPOSE_CROP, process_index, index), (ry, rx))
    cx = cx + on * u[4] * aug.translate * size * rx
    cy = cy + on * u[5] * aug.translate * size * ry
    centre_out = (size - 1) / 2.0
    transform = _affine(tf, cos * rx, -sin * rx, sin * ry, cos * ry, cx, cy,
                        tf.constant(centre_out), tf.constant(centre_out))
    # Agatston candidates (centre slice >= 130 HU) decided on the stored HU, before contrast,
    # shift and noise move pixel values across the threshold; the loss weights them
    # (cac_jax.steps.loss_weight).
    candidate = tf.cast(tf.cast(hu[1], tf.float32) >= CALCIUM_THRESHOLD_HU, tf.uint8)
    image, label, weight, candidate = _resample(tf, image, target, transform, size, candidate)
    if aug.enabled:
        # Half-width of the uniform noise: sqrt(3) * std gives the configured standard deviation
        # (a normal draw costs ~2.5x more per voxel and the shape does not matter here).
        half = math.sqrt(3.0) * float(aug.noise_std)
        if _scanner_augmentation(aug):
            image, noise_std = _scanner(tf, image, aug, _augment_key(
                tf, seed, _PURPOSE_SCANNER, process_index, index))
            half = math.sqrt(3.0) * noise_std
        image = image * (1.0 + u[6] * aug.intensity_scale) + u[7] * aug.intensity_shift
        if aug.noise_std > 0 or float(aug.get("noise_std_max", 0.0)) > 0:
            noise = tf.random.stateless_uniform(
                tf.shape(image), seed=_augment_key(tf, seed, _PURPOSE_NOISE, process_index, index),
                minval=-half, maxval=half)
            image = image + noise
        image = tf.clip_by_value(image, 0.0, 1.0)
    return {"image": image, "label": label, "weight": weight, "candidate": candidate,
            "valid": tf.constant(True), "scan_index": tf.cast(scan, tf.int32), "slice_index": tf.cast(z, tf.int32)}


def _scanner_augmentation(aug) -> bool:
    """Whether any of the scanner-variety augmentations is on (all default to off)."""
    return any(float(aug.get(key, 0.0)) > 0 for key in
               ("noise_std_max", "blur_sigma", "sharpen", "kvp_contrast"))


def _gaussian_taps(tf, sigma, radius: int):
    """Normalised 1-D Gaussian of width `sigma` (a scalar tensor, pixels) on 2 * radius + 1 taps."""
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-0.5 * tf.square(t / tf.maximum(sigma, 1e-3)))
    return taps / tf.reduce_sum(taps)


def _smooth(tf, image, sigma, radius: int):
    """Separable Gaussian blur of (3, S, S, 1) slices, mirrored at the edges."""
    taps = _gaussian_taps(tf, sigma, radius)
    padded = tf.pad(image, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.conv2d(padded, tf.reshape(taps, [-1, 1, 1, 1]), 1, "VALID")
    return tf.nn.conv2d(out, tf.reshape(taps, [1, -1, 1, 1]), 1, "VALID")


def _scanner(tf, image, aug, key):
    """Another scanner's image of the same patient (training only): a tube-voltage contrast on CT
    numbers above water, a reconstruction kernel (a third of the samples smoothed, a third edge-
    enhanced, a third as stored) and the noise level to add. Returns (image, noise std).

    The labels and the Agatston candidates stay those of the stored HU: a smoother or sharper
    kernel, or another voltage, images the same calcium (the scoring then thresholds whatever the
    scanner made of it at 130 HU).
    """
    low, high = HU_WINDOW
    water = -low / (high - low)               # 0 HU in the [0, 1] window
    v = tf.random.stateless_uniform([4], seed=key, minval=0.0, maxval=1.0)
    kvp = float(aug.get("kvp_contrast", 0.0))
    if kvp > 0:
        gain = 1.0 + (2.0 * v[0] - 1.0) * kvp
        image = tf.where(image > water, water + (image - water) * gain, image)
    blur, sharpen = float(aug.get("blur_sigma", 0.0)), float(aug.get("sharpen", 0.0))
    if blur > 0 or sharpen > 0:
        sharpen_sigma = float(aug.get("sharpen_sigma", 1.0))
        radius = max(1, int(math.ceil(3.0 * max(blur, sharpen_sigma if sharpen > 0 else 0.0))))
        # v[1] picks the kernel: [0, 1/3) smooth, [1/3, 2/3) sharp, else as stored; v[2] its
        # strength. A kernel whose strength is off is the identity.
        smooth = tf.logical_and(v[1] < 1.0 / 3.0, blur > 0)
        sharp = tf.logical_and(tf.logical_and(v[1] >= 1.0 / 3.0, v[1] < 2.0 / 3.0), sharpen > 0)
        sigma = tf.where(smooth, v[2] * blur, tf.constant(sharpen_sigma))
        amount = tf.where(sharp, v[2] * sharpen, 0.0)
        blurred = _smooth(tf, image, sigma, radius)
        image = tf.where(smooth, blurred, image + amount * (image - blurred))
    std = float(aug.noise_std)
    top = max(std, float(aug.get("noise_std_max", 0.0)))
    return image, tf.constant(std) + v[3] * (top - std)


def _eval_frame_sample(tf, store: _Source, data, order, num_real: int, i):
    """Validated slice i of the host's scans in order (`order`: their store indices), in its heart
    frame (the numpy resampling that inference uses, `data_pipeline.frames`); padding marked."""
    valid = i < num_real
    k = tf.gather(order, tf.minimum(i, num_real - 1))
    scan = tf.gather(store.slice_scan, k)
    z = tf.gather(store.slice_z, k)
    size = int(data.frame_size)
    image, label, weight, candidate = tf.numpy_function(
        store._frame_window_np, [scan, z, scan, size, float(data.frame_spacing_mm)],
        [tf.float32, tf.int32, tf.float32, tf.bool], stateful=False)
    image = tf.reshape(image, [3, size, size])[..., None]
    label = tf.reshape(label, [size, size])
    weight = tf.reshape(weight, [size, size]) * tf.cast(valid, tf.float32)
    return {"image": image, "label": label, "weight": weight,
            "candidate": tf.reshape(candidate, [size, size]), "valid": valid,
            "scan_index": tf.cast(scan, tf.int32), "slice_index": tf.cast(z, tf.int32),
            "scan_id": tf.gather(store.scan_ids, scan)}


def _eval_sample(tf, store: _Source, size: int, order, num_real: int, i):
    """Validated slice i of the host's scans in order (`order`: their store indices), at the
    top-left of the frame; padding marked."""
    valid = i < num_real
    k = tf.gather(order, tf.minimum(i, num_real - 1))
    hu, target, scan, z, _ = store.window(k, tf.gather(store.slice_scan, k))
    h, w = tf.shape(target)[0], tf.shape(target)[1]
    pad = [[0, size - h], [0, size - w]]  # top-left placement: no resampling
    image = tf.pad(_window_hu(tf, hu), [[0, 0], *pad])[..., None]
    label = tf.pad(tf.cast(target, tf.int32), pad)
    weight = tf.pad(tf.ones_like(target, tf.float32), pad)
    weight = weight * tf.cast(valid, tf.float32)
    candidate = tf.pad(tf.cast(hu[1], tf.float32) >= CALCIUM_THRESHOLD_HU, pad)
    return {"image": image, "label": label, "weight": weight, "candidate": candidate,
            "valid": valid,
            "scan_index": tf.cast(scan, tf.int32), "slice_index": tf.cast(z, tf.int32),
            "scan_id": tf.gather(store.scan_ids, scan)}


def _padding_sample(tf, size: int):
    """An all-padding evaluation sample (valid False, weight 0)."""
    return {"image": tf.zeros([3, size, size, 1]), "label": tf.zeros([size, size], tf.int32),
            "weight": tf.zeros([size, size]), "candidate": tf.zeros([size, size], tf.bool),
            "valid": tf.constant(False),
            "scan_index": tf.constant(-1), "slice_index": tf.constant(-1),
            "scan_id": tf.constant("")}


class _EpochPlan:
    """Training samples of each epoch, in order, from stateless per-(seed, epoch) random numbers.

    Every positive slice times `positive_fraction` plus `negative_fraction` of the others, drawn
    anew each epoch (paper's majority-class subset sampling) over the host's whole shard. Order:
    the epoch's random permutation of the scans, cut into blocks of `block_scans` scans; the
    samples of one block are shuffled together and the blocks follow each other. The same plan
    drives memory and streaming mode (streaming holds about two blocks of scans), so both give
    the same batches. The epoch size is fixed, so step s starts at sample s * host_batch of the
    same stream: resume is exact with only the step recorded.
    """

    def __init__(self, flags: np.ndarray, slice_scan: np.ndarray, num_scans: int,
                 positive_fraction: float, negative_fraction: float, seed: int,
                 block_scans: int):
        self.positives = np.flatnonzero(flags).astype(np.int64)
        self.negatives = np.flatnonzero(~flags).astype(np.int64)
        self.n_pos = int(round(positive_fraction * len(self.positives)))
        self.n_neg = int(round(negative_fraction * len(self.negatives)))
        self.slice_scan = np.asarray(slice_scan, np.int64)
        self.num_scans = int(num_scans)
        self.seed = int(seed) & 0x7FFFFFFF
        self.block_scans = int(block_scans) if block_scans > 0 else max(1, self.num_scans)
        self.num_blocks = max(1, math.ceil(self.num_scans / self.block_scans))
        self._lock = threading.Lock()
        self._plans: collections.OrderedDict = collections.OrderedDict()

    @property
    def samples(self) -> int:
        return self.n_pos + self.n_neg

    def _rng(self, purpose: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, purpose, int(epoch)])

    def _compute(self, epoch: int):
        pos = self.positives[self._rng(_PURPOSE_POSITIVE, epoch).permutation(
            len(self.positives))[:self.n_pos]]
        neg = self.negatives[self._rng(_PURPOSE_NEGATIVE, epoch).permutation(
            len(self.negatives))[:self.n_neg]]
        chosen = np.concatenate([pos, neg])
        rng = self._rng(_PURPOSE_ORDER, epoch)
        scan_order = rng.permutation(self.num_scans)
        rank = np.empty(self.num_scans, np.int64)
        rank[scan_order] = np.arange(self.num_scans)
        block = rank[self.slice_scan[chosen]] // self.block_scans
        order = np.lexsort((rng.random(len(chosen)), block))
        keys = int(epoch) * self.num_blocks + block[order]
        return chosen[order], keys, scan_order

    def _get(self, epoch: int):
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._compute(epoch)
                self._plans[epoch] = plan
                while len(self._plans) > 3:
                    self._plans.popitem(last=False)
            return plan

    def plan(self, epoch) -> tuple[np.ndarray, np.ndarray]:
        """(global slice indices, block keys) of the epoch's samples, in order."""
        chosen, keys, _ = self._get(int(epoch))
        return chosen, keys

    def block_of(self, key: int) -> np.ndarray:
        """The scans of block `key` (= epoch * num_blocks + block)."""
        epoch, block = divmod(int(key), self.num_blocks)
        scan_order = self._get(epoch)[2]
        return scan_order[block * self.block_scans:(block + 1) * self.block_scans]


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


CACHE_MODES = ("memory", "stream", "auto")


def _cache_mode(data, scans: list[ScanInfo]) -> str:
    """`config.data.cache`: memory | stream | auto (memory when the host's decoded scans fit in
    `memory_budget_gb`, default half the RAM available now)."""
    mode = str(data.get("cache", "memory"))
    if mode not in CACHE_MODES:
        raise InputError(None, f"config.data.cache must be one of {', '.join(CACHE_MODES)}, "
                               f"got {mode!r}")
    if mode != "auto":
        return mode
    decoded = sum(int(np.prod(s.shape_zyx)) for s in scans) * 3
    budget_gb = float(data.get("memory_budget_gb", 0) or 0)
    if budget_gb > 0:
        budget = budget_gb * 2**30
    else:
        import psutil

        budget = psutil.virtual_memory().available / 2
    return "memory" if decoded <= budget else "stream"


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
    neighbour_mm = float(data.get("neighbour_mm", labels_lib.DEFAULT_NEIGHBOUR_MM))
    from data_pipeline.scan_index import read_scan_index

    # The build-time index (metadata and record offsets) instead of reading every record.
    records = _Records(builder, host_split, read_scan_index(dataset_path(data)))
    scans, record_index, flags = _read_meta(records, data.task, neighbour_mm)
    if train and not scans:
        raise InputError(dataset_path(data), f"no scans with {data.task} targets in the {split!r} "
                                             f"split of process {process_index}/{process_count}")
    mode = _cache_mode(data, scans)
    frames_lib.check_frame_config(data)
    heart = frames_lib.uses_heart_frame(data)
    frame_kwargs = dict(heart_frame=heart,
                        frame_spacing_mm=float(data.get("frame_spacing_mm", 1.0) or 1.0))
    slice_scan = np.repeat(np.arange(len(scans)), [s.shape_zyx[0] for s in scans]).astype(np.int64)
    block_scans = int(data.get("shuffle_block_scans", 0) or 0)
    plan = None
    if train:
        plan = _EpochPlan(np.concatenate(flags) if flags else np.zeros(0, bool), slice_scan,
                          len(scans), float(data.positive_fraction),
                          float(data.negative_fraction), seed, block_scans)
    if mode == "memory":
        store = _MemoryStore(scans, records, record_index, data.task, **frame_kwargs)
    elif train:
        store = _StreamStore(scans, records, record_index, data.task,
                             block_scans=plan.block_scans, block_of=plan.block_of,
                             **frame_kwargs)
    else:  # evaluation walks the scans in order: block key = scan index
        store = _StreamStore(scans, records, record_index, data.task, block_scans=1,
                             block_of=lambda key: [key] if 0 <= key < len(scans) else [],
                             **frame_kwargs)
    if train:
        per_device = int(data.per_device_batch)
        host_batch = local_devices * per_device
        samples = plan.samples
        if samples == 0:
            raise InputError(dataset_path(data), "sampling keeps no slices (check the fractions)")
        first_sample = int(start_step) * host_batch
        first_epoch, skip = divmod(first_sample, samples)

        def epoch_samples(epoch):
            k, key = tf.numpy_function(plan.plan, [epoch], [tf.int64, tf.int64], stateful=False)
            k.set_shape([None])
            key.set_shape([None])
            return tf.data.Dataset.from_tensor_slices((k, key))

        indices = tf.data.Dataset.range(first_epoch, INFINITE).flat_map(_plain(epoch_samples))
        ds = tf.data.Dataset.zip(tf.data.Dataset.range(first_sample, INFINITE),
                                 indices.skip(skip))
        ds = ds.map(_plain(lambda index, kk: _train_sample(tf, store, data, seed, index, kk[0],
                                                           process_index, kk[1])),
                    num_parallel_calls=tf.data.AUTOTUNE)
        steps = None
    else:
        per_device = int(data.eval_per_device_batch)
        host_batch = local_devices * per_device
        size = int(data.frame_size) if heart else int(data.image_size)
        too_big = [s.scan_id for s in scans if max(s.shape_zyx[1:]) > size]
        if too_big and not heart:
            raise InputError(dataset_path(data), f"scan(s) {', '.join(too_big)} larger than "
                                                 f"image_size {size}; raise config.data.image_size")
        # The slices validated (data.eval_slices), as store indices in scan order.
        eval_slices = str(data.get("eval_slices", "all"))
        keep = [eval_slice_mask(s, eval_slices) for s in scans]
        order_np = (np.flatnonzero(np.concatenate(keep)) if keep
                    else np.zeros(0, np.int64)).astype(np.int64)
        order = tf.constant(order_np)
        num_real = int(order_np.size)
        counts = ([num_real] if process_count == 1
                  else _host_slice_counts(builder, split, data.task, process_count,
                                          eval_slices, neighbour_mm))
        steps = max(math.ceil(c / host_batch) for c in counts)
        samples = num_real
        ds = tf.data.Dataset.range(steps * host_batch)
        if num_real and heart:
            ds = ds.map(_plain(lambda i: _eval_frame_sample(tf, store, data, order, num_real, i)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        elif num_real:
            ds = ds.map(_plain(lambda i: _eval_sample(tf, store, size, order, num_real, i)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:  # this host's shard is empty but others are not: padding batches only
            ds = ds.map(_plain(lambda i: _padding_sample(tf, size)))
    ds = _shape_batches(tf, ds, local_devices, per_device, int(data.prefetch_batches))
    return InputIterator(dataset=ds.with_options(options), scans=scans, split=split, train=train,
                         host_batch=host_batch, samples_per_epoch=samples, steps=steps,
                         cache=mode, neighbour_mm=neighbour_mm, store=store)
