"""Batch inference: CT study -> heart and calcium models -> masks -> Agatston score (no TensorFlow).

The inference rules are in docs/contracts.md ("Model inputs and targets"). For each study:
1. The 3-slice windows are built exactly as training built them (`data_pipeline.labels`: neighbours
   `neighbour_offset(spacing_z, neighbour_mm)` slices away, edges repeated, HU windowed to
   [-800, 1200] and scaled), but never for the whole volume at once: each batch of B centre slices
   gathers its own windows, so memory is bounded by the batch, not the study (a 512 x 512 x 300
   study never exists as 3 window copies), and every model runs once per slice.
2. Resolution: a model sees what it was trained on. The checkpoint records the in-plane pixel
   spacing of its training scans (min, median, max); its zoom augmentation (`config.data.augment
   .scale` s) stretched that to [min / (1 + s), max / (1 - s)]. A study outside that range is
   resampled in-plane (linear, pixel areas aligned) to the training median for the model (or, where
   the study would then overflow the training frame `config.data.image_size`, to the covered
   spacing that fits it in the frame: `model_spacing_mm`); so is a study at a covered spacing
   that is larger than the training frame (a finer matrix over a large field of view), to the
   spacing that fits it in the frame. The model's class probabilities
   are resampled back (linear) onto the study's grid before the argmax. The score is always
   computed on the study's own HU at its own spacing.
3. Shapes: each batch is padded to (B, 3, H_b, W_b, 1), with H_b, W_b rounded up to a multiple of
   `bucket_px` (and of the model's downsampling factor) and at least the training frame;
   padding is 0 in window units (-800 HU) at the bottom/right, as the evaluation pipeline places
   scans top-left in its frame. One jit-compiled function per model and bucket, so a cohort of
   mixed sizes compiles a handful of times; `Scorer.compilations` counts them.
4. Post-processing (`cac_jax.postprocess`): the heart silhouette (largest 3D component, dilated by
   `heart_dilation_mm`), the calcium model's coronary class inside it at HU >= 130 labelled 4
   (coronary, artery not determined), scored by `cac_jax.scoring.agatston_score`.
5. Order: the heart model runs first, and by default (`Scorer(calcium_slices="heart")`) the
   calcium model runs only on the slices the dilated silhouette reaches, the only ones where its
   coronary class can count; the score and coronary labels are exactly those of running it on
   every slice (`calcium_slices="all"`). `timings` records how many slices each model ran on.
6. Shared slices: a model whose encoder sees each slice on its own (the ConvLSTM's) gets a batch
   as its distinct slices and each window's indices into them (`ConvLSTMAttentionNet(...,
   windows=)`), so a slice that is the centre of one window and the neighbour of two others is
   encoded once, not three times; the outputs are those of the gathered windows (`Scorer(...,
   share_slices=False)` runs the windows themselves; tests/test_inference.py compares both).

Reading and writing of studies and masks goes through `read_study_for_inference` and
`write_mask` below, the one place that knows the `data_pipeline.io` API.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cac_jax import postprocess
from cac_jax.scoring import (
    CALCIUM_THRESHOLD_HU,
    DEFAULT_MIN_AREA_MM2,
    AgatstonResult,
    agatston_score,
    hu_problem,
    study_warnings,
)
from data_pipeline import frames as frames_lib
from data_pipeline import labels as labels_lib
from data_pipeline.errors import InputError

DEFAULT_BATCH_SIZE = 8
# Padded H and W are multiples of this: 512 and 480 px studies share one compiled function,
# while a 64 px test scan is not padded to 512. Our choice.
DEFAULT_BUCKET_PX = 64
# Non-coronary calcium the calcium model finds is written to the saved label map as 5 (orCaScore:
# labels >= 5 are non-coronary and never scored), so the file shows it but scores the same.
NON_CORONARY_LABEL = 5
EXPECTED = {"heart": 2, "calcium": 3}  # task -> number of classes (docs/contracts.md)
# A study whose predicted heart is smaller than this is not scored (status error): the heart
# model found no heart, so a score of 0 would be a claim about nothing. An adult heart's
# pericardial silhouette (what the heart model segments) holds several hundred ml; the synthetic
# cohort's hold 200-700 ml. Used when the heart checkpoint records no training heart volumes;
# where it does, the bound is `TRAINING_HEART_FRACTION` of the smallest of them.
DEFAULT_MIN_HEART_ML = 50.0
TRAINING_HEART_FRACTION = 0.25


class ModelMismatchError(InputError):
    """A checkpoint given for the wrong role (heart vs calcium) or with the wrong class count."""


# ---------------------------------------------------------------------------------------------
# Study I/O: the one place that calls data_pipeline.io
# ---------------------------------------------------------------------------------------------

def read_study_for_inference(path: str | os.PathLike, series: str | None = None):
    """Reads a study with `data_pipeline.io.read_study` (the series `series` of a DICOM folder)."""
    from data_pipeline import io as study_io

    return study_io.read_study(path, series=series)


def write_mask(path: str | os.PathLike, array: np.ndarray, like) -> None:
    """Writes a label map or mask back in the geometry `like` was read from (atomically)."""
    from data_pipeline import io as study_io

    study_io.write_labels(path, array, like=like)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def spatial_multiple(config) -> int:
    """The factor H and W of a model's input must be multiples of (its total downsampling)."""
    cfg = config.model if "model" in config else config
    if cfg.arch == "convlstm":
        return 2 ** len(cfg.convlstm.encoder_widths)
    if cfg.arch == "unet":
        return 2 ** int(cfg.unet.depth)
    raise ValueError(f"unknown model arch {cfg.arch!r}")


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def covered_spacing_mm(trained) -> tuple[float, float] | None:
    """In-plane pixel spacings (mm) a model saw in training, zoom augmentation included.

    None when the checkpoint does not record its training spacing (then studies are never
    resampled). Zoom u in [1 - s, 1 + s] shows a pixel of spacing p as p / u (the input pipeline
    maps output pixels to input pixels scaled by 1 / u).
    """
    spacing = getattr(trained, "pixel_spacing_mm", None) or {}
    if not all(k in spacing and spacing[k] for k in ("min", "max")):
        return None
    augment = trained.config.data.get("augment") if "data" in trained.config else None
    scale = 0.0
    if augment is not None and augment.get("enabled", True):
        scale = float(augment.get("scale", 0.0))
    scale = min(max(scale, 0.0), 0.99)
    return float(spacing["min"]) / (1.0 + scale), float(spacing["max"]) / (1.0 - scale)


def training_frame_px(trained) -> int | None:
    """Side of the square frame (px) the model was validated on (`config.data.image_size`):
    training and evaluation place every slice in it, padding smaller scans. None if unknown."""
    data = trained.config.get("data") if "data" in trained.config else None
    size = data.get("image_size") if data is not None else None
    return int(size) if size else None


def model_spacing_mm(trained, spacing_yx_mm: tuple[float, float],
                     shape_yx: tuple[int, int] | None = None) -> tuple[float, float] | None:
    """The in-plane spacing the model should see a study at: None (as it is) when the study's
    spacing lies inside what training covered, else one spacing for both axes.

    That spacing is the training median, unless the study (of `shape_yx` pixels) would then not
    fit the training frame (`training_frame_px`): then the spacing that makes its field of view
    fill the frame, at most the coarsest covered spacing. A model normalises each sample over
    its whole frame (GroupNorm), so a resampled study that spills over the frame and is padded
    up to the next shape bucket is seen in a context it never had in training (a 64 px-trained
    heart model gave Dice 0.2 instead of 0.8 on its own training scans padded to 128 px).
    """
    if frames_lib.uses_heart_frame(trained.config):
        spacing = float(trained.config.data.frame_spacing_mm)
        return spacing, spacing
    covered = covered_spacing_mm(trained)
    if covered is None:
        return None
    low, high = covered
    frame = training_frame_px(trained)
    # A relative tolerance so a study at exactly the training spacing (stored as float32 in
    # headers) is not resampled for a rounding difference.
    inside = all(low * (1 - 1e-4) <= s <= high * (1 + 1e-4) for s in spacing_yx_mm)
    # A study larger than the training frame at a covered spacing (a 512 px CTAC at 0.9 mm for a
    # model trained on 256 px scans: 2 mm CTAC and 1 mm gated pixels) would be seen at a size and
    # in a frame it never had (a 256 px-trained heart model found a median 62% of such CTAC hearts).
    fits = shape_yx is None or not frame or max(int(n) for n in shape_yx) <= frame
    if inside and fits:
        return None
    median = float(trained.pixel_spacing_mm.get("median") or math.sqrt(low * high))
    target = median
    if shape_yx is not None and frame:
        fov_mm = max(float(n) * float(s) for n, s in zip(shape_yx, spacing_yx_mm, strict=True))
        target = min(max(median, fov_mm / frame), high)
    return target, target


def _neighbour_mm(trained) -> float:
    """The neighbour distance the model was trained with (checkpoint, else config, else 3 mm)."""
    value = getattr(trained, "neighbour_mm", None)
    if value is None and "data" in trained.config:
        value = trained.config.data.get("neighbour_mm")
    return float(labels_lib.DEFAULT_NEIGHBOUR_MM if value is None else value)


class _ModelRunner:
    """One trained model: jit-compiled per padded input shape, streamed over a study's slices."""

    def __init__(self, trained, role: str, batch_size: int, bucket_px: int,
                 share_slices: bool = True):
        import jax

        from cac_jax.models import shares_slices

        self.trained = trained
        self.role = role
        self.batch_size = int(batch_size)
        self.multiple = math.lcm(spatial_multiple(trained.config), int(bucket_px))
        frame = training_frame_px(trained)
        # The smallest bucket is the training frame: a smaller study is padded to it, exactly as
        # the evaluation pipeline pads it (see `model_spacing_mm` for why the frame matters).
        self.min_bucket = _round_up(frame, self.multiple) if frame else self.multiple
        self.neighbour_mm = _neighbour_mm(trained)
        # A heart-frame calcium model (data_pipeline.frames) runs on one fixed-size window
        # around the heart at a fixed spacing, whatever the study's matrix.
        self.heart_frame = frames_lib.uses_heart_frame(trained.config)
        if self.heart_frame:
            data = trained.config.data
            self.frame_size = int(data.frame_size)
            self.frame_spacing_mm = float(data.frame_spacing_mm)
            if self.frame_size % spatial_multiple(trained.config):
                raise ValueError(f"config.data.frame_size={self.frame_size} is not a multiple of "
                                 f"the model's {spatial_multiple(trained.config)}")
        self.traces = 0  # incremented while tracing: one per compiled shape bucket
        self.shapes: set[tuple[int, ...]] = set()
        model = trained.model

        def output(logits, probabilities: bool):
            if probabilities:
                return jax.nn.softmax(logits.astype(np.float32), axis=-1)
            return jax.numpy.argmax(logits, axis=-1).astype(np.uint8)

        def forward(variables, images, probabilities: bool):
            self.traces += 1
            return output(model.apply(variables, images)[0], probabilities)

        def forward_shared(variables, slices, windows, probabilities: bool):
            self.traces += 1
            return output(model.apply(variables, slices, windows=windows)[0], probabilities)

        self._forward = jax.jit(forward, static_argnames="probabilities")
        self._forward_shared = jax.jit(forward_shared, static_argnames="probabilities")
        self.share_slices = bool(share_slices) and shares_slices(model)
        self._variables = jax.device_put(trained.variables)

    def bucket(self, height: int, width: int) -> tuple[int, int]:
        """Padded (H, W) of the compiled function a (height, width) image runs in: rounded up
        to the bucket multiple, and at least the training frame."""
        return (max(self.min_bucket, _round_up(height, self.multiple)),
                max(self.min_bucket, _round_up(width, self.multiple)))

    def predict(self, hu: np.ndarray, spacing_zyx_mm, *, probabilities: bool,
                timings: dict[str, float], slices: np.ndarray | None = None,
                centre_yx: tuple[float, float] | None = None) -> np.ndarray:
        """Class map (z, y, x) uint8, or probabilities (z, y, x, C) float32, on `hu`'s grid.

        `slices` (sorted indices; None: all) are the centre slices the model runs on, each with
        its 3-slice window gathered from the whole study, so a slice's output does not depend on
        which others run. The slices not run are class 0 in the class map and background with
        certainty (probability 1 for class 0, 0 for the others) in the probabilities.

        Adds "preprocess" (window gathering, windowing, resampling, padding), "<role>_model"
        (device compute and transfer not hidden behind the host work) and "postprocess"
        (resampling back) seconds to `timings`, and the number of slices run to
        "<role>_slices".

        A heart-frame model runs on the window of `centre_yx` (the heart's centre in the study's
        pixels; None: the study's centre), resampled back onto the study's grid.
        """
        num_slices, height, width = hu.shape
        selected = (np.arange(num_slices) if slices is None
                    else np.asarray(slices, dtype=np.int64).reshape(-1))
        if selected.size and (selected.min() < 0 or selected.max() >= num_slices
                              or np.any(np.diff(selected) <= 0)):
            raise ValueError(f"slices must be increasing indices below {num_slices}")
        if self.heart_frame:
            return self._predict_frame(hu, spacing_zyx_mm, selected, probabilities, timings,
                                       centre_yx)
        target = model_spacing_mm(self.trained, tuple(spacing_zyx_mm[1:]), (height, width))
        if target is None:
            model_hw = (height, width)
        else:
            model_hw = (max(1, round(height * spacing_zyx_mm[1] / target[0])),
                        max(1, round(width * spacing_zyx_mm[2] / target[1])))
        resample = model_hw != (height, width)
        # A resampled study's model output comes back as probabilities (a linear resample of
        # class indices would not be a class map); the argmax on the study's grid is taken per
        # batch, so only a class map of the whole study is held unless probabilities are asked for.
        want_probs = probabilities or resample
        offset = labels_lib.neighbour_offset(spacing_zyx_mm[0], self.neighbour_mm)
        bucket = self.bucket(*model_hw)
        num_classes = int(self.trained.num_classes)
        full = selected.size == num_slices
        if probabilities:
            out = np.empty((num_slices, height, width, num_classes), np.float32)
            if not full:
                skipped = np.setdiff1d(np.arange(num_slices), selected)
                out[skipped] = 0.0
                out[skipped, ..., 0] = 1.0
        else:
            out = (np.empty if full else np.zeros)((num_slices, height, width), np.uint8)

        start = time.perf_counter()
        host = 0.0
        back = 0.0
        pending: tuple[np.ndarray, Any] | None = None
        for first in range(0, selected.size, self.batch_size):
            t0 = time.perf_counter()
            centres = selected[first:first + self.batch_size]
            shared = self._shared(num_slices, centres, offset)
            if shared is None:
                images = self._batch(hu, centres, offset, model_hw, bucket)
            else:
                images = padded_slices(hu, shared[0], bucket, self._capacity(offset),
                                       model_hw)
            host += time.perf_counter() - t0
            # Dispatch is asynchronous: the device works on this batch while the host fetches
            # the previous one and builds the next.
            result = self._run(images, shared, want_probs)
            if pending is not None:
                back += self._store(out, pending, model_hw, resample)
            pending = (centres, result)
        if pending is not None:
            back += self._store(out, pending, model_hw, resample)
        total = time.perf_counter() - start
        self._add_timings(timings, host, back, total, int(selected.size))
        return out

    def _add_timings(self, timings: dict, host: float, back: float, total: float,
                     slices: int) -> None:
        """Adds one `predict` call's seconds (host preprocessing, resampling back, the rest on
        the device) and slice count to `timings`."""
        timings["preprocess"] = timings.get("preprocess", 0.0) + host
        timings["postprocess"] = timings.get("postprocess", 0.0) + back
        timings[f"{self.role}_model"] = timings.get(f"{self.role}_model", 0.0) + total - host - back
        timings[f"{self.role}_slices"] = timings.get(f"{self.role}_slices", 0) + slices

    def _predict_frame(self, hu, spacing_zyx_mm, selected, probabilities, timings, centre_yx):
        """`predict` for a heart-frame model: windows resampled into the frame, the model's
        probabilities resampled back (`data_pipeline.frames`, as validation does)."""
        num_slices, height, width = hu.shape
        geom = frames_lib.geometry(centre_yx, spacing_zyx_mm[1:], (height, width),
                                   self.frame_size, self.frame_spacing_mm)
        offset = labels_lib.neighbour_offset(spacing_zyx_mm[0], self.neighbour_mm)
        num_classes = int(self.trained.num_classes)
        if probabilities:
            out = np.zeros((num_slices, height, width, num_classes), np.float32)
            out[..., 0] = 1.0
        else:
            out = np.zeros((num_slices, height, width), np.uint8)
        start = time.perf_counter()
        host = back = 0.0
        size = self.frame_size
        pending = None

        def store(pending) -> float:
            t0 = time.perf_counter()
            centres, result = pending
            native = frames_lib.from_frame(np.asarray(result)[:len(centres)], geom)
            out[centres] = native if probabilities else np.argmax(native, axis=-1)
            return time.perf_counter() - t0

        for first in range(0, selected.size, self.batch_size):
            t0 = time.perf_counter()
            centres = selected[first:first + self.batch_size]
            shared = self._shared(num_slices, centres, offset)
            if shared is None:
                windows = labels_lib.model_inputs(hu, centres, offset)[..., 0]
                images = np.zeros((self.batch_size, 3, size, size, 1), np.float32)
                images[:len(centres), ..., 0] = frames_lib.to_frame(windows, geom, order=1,
                                                                    cval=0.0)
            else:
                images = np.zeros((self._capacity(offset), size, size, 1), np.float32)
                images[:len(shared[0]), ..., 0] = frames_lib.to_frame(
                    labels_lib.window_hu(hu[shared[0]]), geom, order=1, cval=0.0)
            host += time.perf_counter() - t0
            result = self._run(images, shared, True)
            if pending is not None:
                back += store(pending)
            pending = (centres, result)
        if pending is not None:
            back += store(pending)
        total = time.perf_counter() - start
        self._add_timings(timings, host, back, total, int(selected.size))
        return out

    def _batch(self, hu, centres, offset, model_hw, bucket) -> np.ndarray:
        return padded_inputs(hu, centres, offset, bucket, self.batch_size, model_hw)

    def _capacity(self, offset: int) -> int:
        """Distinct slices a shared batch holds: enough for `batch_size` consecutive centres."""
        return min(3 * self.batch_size, self.batch_size + 2 * int(offset))

    def _shared(self, num_slices: int, centres: np.ndarray, offset: int):
        """(distinct slice indices, windows (batch_size, 3) into them) for a shared batch, or
        None: the model does not share slices, or the centres are so far apart that their
        windows need more distinct slices than `_capacity` (then the windows run as they are)."""
        if not self.share_slices:
            return None
        return shared_windows(num_slices, centres, offset, self.batch_size,
                              self._capacity(offset))

    def _run(self, images: np.ndarray, shared, probabilities: bool):
        """Dispatches one batch (windows, or distinct slices with `shared`'s indices)."""
        self.shapes.add(images.shape)
        if shared is None:
            return self._forward(self._variables, images, probabilities=probabilities)
        return self._forward_shared(self._variables, images, shared[1],
                                    probabilities=probabilities)

    def _store(self, out, pending, model_hw, resample) -> float:
        """Copies a finished batch into `out`; returns the seconds spent resampling back."""
        centres, result = pending
        count = len(centres)
        # Contiguous centres (every batch of a full run) are written as a view, not scattered.
        rows = (slice(int(centres[0]), int(centres[0]) + count)
                if int(centres[-1]) - int(centres[0]) == count - 1 else centres)
        values = np.asarray(result)[:count, :model_hw[0], :model_hw[1]]
        if not resample:
            out[rows] = values
            return 0.0
        t0 = time.perf_counter()
        # Class planes first: each resampled by two matrix products (frames_lib.resize_planes,
        # `scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")` to float32 rounding).
        planes = frames_lib.resize_planes(np.moveaxis(values, -1, 1), out.shape[1:3])
        out[rows] = np.moveaxis(planes, 1, -1) if out.ndim == 4 else frames_lib.class_map(planes)
        return time.perf_counter() - t0


def shared_windows(num_slices: int, centres: np.ndarray, offset: int, batch_size: int,
                   capacity: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The distinct slices of the centres' 3-slice windows (sorted indices into the study) and
    each window as indices into them, (batch_size, 3) int32, the rows past the centres 0; None
    where the windows need more than `capacity` distinct slices."""
    idx = labels_lib.window_indices(num_slices, centres, offset)
    distinct, inverse = np.unique(idx.reshape(-1), return_inverse=True)
    if distinct.size > capacity:
        return None
    windows = np.zeros((batch_size, 3), np.int32)
    windows[:len(idx)] = inverse.reshape(-1, 3)
    return distinct, windows


def padded_slices(hu: np.ndarray, indices: np.ndarray, bucket_hw: tuple[int, int], count: int,
                  model_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The slices `indices` of `hu` as model input (count, H_b, W_b, 1) float32: HU windowed and
    scaled as training does (`data_pipeline.labels.window_hu`), resampled in-plane to `model_hw`
    when it differs from the study's (linear, pixel areas aligned), placed top-left and padded
    with 0 (-800 HU) to `bucket_hw`, and with all-zero slices to `count`."""
    images = labels_lib.window_hu(hu[np.asarray(indices)])  # (n, h, w)
    height, width = hu.shape[1:]
    model_hw = (height, width) if model_hw is None else tuple(model_hw)
    if model_hw != (height, width):  # scipy's zoom(order=1, grid_mode=True), faster
        images = frames_lib.resize_planes(images, model_hw)
    out = np.zeros((count, *bucket_hw, 1), np.float32)
    out[:len(images), :model_hw[0], :model_hw[1], 0] = images
    return out


def padded_inputs(hu: np.ndarray, centres: np.ndarray, offset: int, bucket_hw: tuple[int, int],
                  batch_size: int, model_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Model inputs (batch_size, 3, H_b, W_b, 1) float32 of the centre slices `centres` of `hu`:
    the 3-slice windows training uses (`data_pipeline.labels.window_indices`), each slice
    prepared by `padded_slices`, and all-zero samples up to `batch_size`."""
    indices = labels_lib.window_indices(hu.shape[0], centres, offset).reshape(-1)
    images = padded_slices(hu, indices, bucket_hw, 3 * batch_size, model_hw)
    return images.reshape(batch_size, 3, *bucket_hw, 1)


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StudyResult:
    """What inference gives for one study (all arrays on the study's own (z, y, x) grid)."""

    score: AgatstonResult            # the Agatston result (`.to_json_dict()`: `cac-jax score`'s JSON)
    # int16: 4 scored coronary calcium, 5 non-coronary calcium (HU >= 130 where the calcium model
    # says non-coronary, on the slices it ran on: see `calcium_slices`), 0 elsewhere.
    calcium_labels: np.ndarray
    heart_mask: np.ndarray           # bool: the predicted heart (largest 3D component)
    heart_volume_ml: float           # volume of `heart_mask`
    # seconds: read, preprocess, heart_model, calcium_model, postprocess, scoring; and the number
    # of slices each model ran on: heart_slices, calcium_slices.
    timings: dict[str, float]
    model_spacing_yx_mm: dict[str, tuple[float, float]]  # in-plane spacing each model ran at
    neighbour_offsets: dict[str, int]  # slices between a centre and its neighbours, per model
    # {"heart", "calcium"}: (z, y, x, C); calcium slices not run are background with certainty.
    probabilities: dict[str, np.ndarray] | None = None
    # Indices of the slices the calcium model ran on (None: given predictions, no model run).
    calcium_slices: np.ndarray | None = None
    # Why the score must not be used (an image not in HU, no heart found); empty when it can.
    # A batch run reports such a study as status=error with these reasons.
    problems: tuple[str, ...] = ()

    @property
    def resampled(self) -> bool:
        """Whether any model ran on an in-plane resampled copy of the study."""
        return any(v is not None for v in self.model_spacing_yx_mm.values())


class Scorer:
    """Scores CT studies with a trained heart model and a trained calcium model.

    `heart` and `calcium` are `cac_jax.checkpoints.TrainedModel`s (or objects with the same
    fields: config, model, variables, step, path, task, num_classes, pixel_spacing_mm,
    neighbour_mm). `batch_size` slices run per model call; `bucket_px` rounds padded sizes.

    `calcium_slices` says where the calcium model runs. "heart" (the default): the heart model
    runs first, and the calcium model only on the slices its dilated silhouette reaches, each
    with its 3-slice window from the whole study. Its coronary class counts only inside that
    silhouette (and at HU >= 130), so the score, the coronary labels (4) and the heart mask are
    exactly those of "all", which runs it on every slice. What differs: non-coronary calcium
    (label 5) is marked only on the slices the calcium model ran on (elsewhere 0: not examined),
    and with `probabilities=True` the calcium probabilities of the other slices are background
    with certainty ([1, 0, 0]); `StudyResult.calcium_slices` lists the slices it ran on.

    `StudyResult.problems` says why a score must not be used: the image does not look like HU
    (`cac_jax.scoring.hu_problem`, the check `cac-jax score` warns with), or the predicted heart
    is empty or smaller than `min_heart_ml` (None: `min_heart_bound`).

    `share_slices` (default True): a ConvLSTM encodes each distinct slice of a batch once
    instead of once per window it appears in (module docstring, point 6); the same outputs.
    """

    CALCIUM_SLICES = ("heart", "all")

    def __init__(self, heart, calcium, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 bucket_px: int = DEFAULT_BUCKET_PX,
                 heart_dilation_mm: float = postprocess.DEFAULT_HEART_DILATION_MM,
                 min_area_mm2: float = DEFAULT_MIN_AREA_MM2,
                 calibration_mg_per_hu_mm3: float | None = None, five_class: bool = False,
                 calcium_slices: str = "heart", min_heart_ml: float | None = None,
                 share_slices: bool = True):
        check_role(heart, "heart")
        check_role(calcium, "calcium")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_px < 1:
            raise ValueError(f"bucket_px must be >= 1, got {bucket_px}")
        if calcium_slices not in self.CALCIUM_SLICES:
            raise ValueError(f"calcium_slices must be one of {self.CALCIUM_SLICES}, "
                             f"got {calcium_slices!r}")
        self.heart = heart
        self.calcium = calcium
        self.calcium_slices = calcium_slices
        self.heart_dilation_mm = float(heart_dilation_mm)
        if min_heart_ml is not None and not (math.isfinite(min_heart_ml) and min_heart_ml >= 0):
            raise ValueError(f"min_heart_ml must be a finite number >= 0, got {min_heart_ml}")
        self.min_heart_ml = min_heart_bound(heart) if min_heart_ml is None else float(min_heart_ml)
        self.score_kwargs = dict(min_area_mm2=min_area_mm2,
                                 calibration_mg_per_hu_mm3=calibration_mg_per_hu_mm3,
                                 five_class=five_class)
        self._runners = {role: _ModelRunner(trained, role, batch_size, bucket_px, share_slices)
                         for role, trained in (("heart", heart), ("calcium", calcium))}

    @classmethod
    def from_checkpoints(cls, heart_path: str | os.PathLike, calcium_path: str | os.PathLike,
                         **kwargs) -> Scorer:
        """Loads both models (a training workdir -> its best checkpoint, or a checkpoint folder)
        with `cac_jax.checkpoints.load_trained` and builds a Scorer (kwargs as `__init__`)."""
        from cac_jax.checkpoints import load_trained

        return cls(load_trained(heart_path), load_trained(calcium_path), **kwargs)

    @property
    def compilations(self) -> dict[str, int]:
        """Times each model's function was traced and compiled (one per shape bucket)."""
        return {role: runner.traces for role, runner in self._runners.items()}

    def score_path(self, path: str | os.PathLike, *, series: str | None = None,
                   probabilities: bool = False):
        """Reads and scores one study; returns (CTVolume, StudyResult) with the read time in
        `timings["read"]`."""
        t0 = time.perf_counter()
        volume = read_study_for_inference(path, series)
        read_s = time.perf_counter() - t0
        result = self.score(volume, probabilities=probabilities)
        result.timings["read"] = read_s
        return volume, result

    def score(self, volume, *, probabilities: bool = False) -> StudyResult:
        """Runs both models on `volume` (a `data_pipeline.io.CTVolume`) and scores it.

        The heart model runs on every slice; the calcium model on the slices the dilated heart
        silhouette reaches (`calcium_slices="heart"`) or on all of them ("all").
        `probabilities=True` also returns each model's class probabilities (z, y, x, C) float32
        (memory: 4 x C bytes per voxel per model).
        """
        hu = volume.hu
        spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
        timings: dict[str, float] = {}
        heart_out = self._runners["heart"].predict(hu, spacing, probabilities=probabilities,
                                                   timings=timings)
        heart_pred = np.argmax(heart_out, axis=-1) if probabilities else heart_out
        heart, silhouette = self._silhouettes(heart_pred, spacing, timings)
        run = (np.flatnonzero(silhouette.any(axis=(1, 2))) if self.calcium_slices == "heart"
               else np.arange(hu.shape[0]))
        calcium_out = self._runners["calcium"].predict(
            hu, spacing, probabilities=probabilities, timings=timings, slices=run,
            centre_yx=frames_lib.heart_centre_yx(heart))
        calcium_pred = np.argmax(calcium_out, axis=-1) if probabilities else calcium_out
        result = self._finish(volume, heart, silhouette, calcium_pred, timings)
        return dataclasses.replace(
            result,
            model_spacing_yx_mm={role: model_spacing_mm(r.trained, spacing[1:], hu.shape[1:])
                                 for role, r in self._runners.items()},
            neighbour_offsets={role: labels_lib.neighbour_offset(spacing[0], r.neighbour_mm)
                               for role, r in self._runners.items()},
            probabilities=({"heart": heart_out, "calcium": calcium_out} if probabilities
                           else None),
            calcium_slices=run)

    def score_predictions(self, volume, heart_pred: np.ndarray, calcium_pred: np.ndarray, *,
                          timings: dict[str, float] | None = None) -> StudyResult:
        """The post-processing and scoring of `score`, on given predictions: `heart_pred`
        (z, y, x), non-zero = heart; `calcium_pred` (z, y, x) classes 0 background, 1 coronary,
        2 non-coronary calcium. Fed the true labels it scores a perfect prediction."""
        spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
        timings = {} if timings is None else timings
        heart, silhouette = self._silhouettes(heart_pred, spacing, timings)
        return self._finish(volume, heart, silhouette, calcium_pred, timings)

    def _silhouettes(self, heart_pred: np.ndarray, spacing, timings: dict[str, float]):
        """(heart mask: the largest 3D component, silhouette: it dilated by heart_dilation_mm)."""
        t0 = time.perf_counter()
        heart = postprocess.heart_silhouette(heart_pred, spacing, 0.0)
        silhouette = (postprocess.heart_silhouette(heart, spacing, self.heart_dilation_mm)
                      if self.heart_dilation_mm > 0 else heart)
        timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t0
        return heart, silhouette

    def _finish(self, volume, heart: np.ndarray, silhouette: np.ndarray,
                calcium_pred: np.ndarray, timings: dict[str, float]) -> StudyResult:
        """Coronary labels inside `silhouette`, the Agatston score, non-coronary labels."""
        hu = volume.hu
        spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
        t0 = time.perf_counter()
        labels = postprocess.coronary_labels(calcium_pred, hu, silhouette)
        timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        score = agatston_score(hu, labels, spacing,
                               slice_thickness_mm=volume.metadata.slice_thickness_mm,
                               **self.score_kwargs)
        notes = study_warnings(volume, check_hu=False)
        if notes:
            score = dataclasses.replace(score, warnings=score.warnings + tuple(notes))
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        non_coronary = ((np.asarray(calcium_pred) == postprocess.NON_CORONARY_CLASS)
                        & (hu >= CALCIUM_THRESHOLD_HU) & (labels == 0))
        labels[non_coronary] = NON_CORONARY_LABEL
        timings["postprocess"] += time.perf_counter() - t0
        voxel_ml = float(np.prod(spacing)) / 1000.0
        heart_ml = float(heart.sum()) * voxel_ml
        return StudyResult(
            score=score, calcium_labels=labels, heart_mask=heart,
            heart_volume_ml=heart_ml, timings=timings,
            model_spacing_yx_mm={}, neighbour_offsets={},
            problems=self.problems(hu, heart_ml))

    def problems(self, hu: np.ndarray, heart_volume_ml: float) -> tuple[str, ...]:
        """Why a study's score must not be used (see the class docstring); () when it can."""
        found = []
        not_hu = hu_problem(hu)
        if not_hu:
            found.append(not_hu)
        if heart_volume_ml <= 0.0:
            found.append("no heart found: predicted heart volume 0 ml")
        elif heart_volume_ml < self.min_heart_ml:
            found.append(f"no heart found: predicted heart volume {heart_volume_ml:.3g} ml, below "
                         f"the smallest plausible heart ({self.min_heart_ml:.3g} ml)")
        return tuple(found)


def min_heart_bound(heart) -> float:
    """The smallest predicted heart (ml) a study is scored with: `TRAINING_HEART_FRACTION` of the
    smallest heart in the heart model's training scans where its checkpoint records them
    (`heart_volume_ml`: {"min", ...}), else `DEFAULT_MIN_HEART_ML`."""
    recorded = getattr(heart, "heart_volume_ml", None) or {}
    smallest = recorded.get("min") if isinstance(recorded, Mapping) else None
    if smallest is not None and math.isfinite(float(smallest)) and float(smallest) > 0:
        return TRAINING_HEART_FRACTION * float(smallest)
    return DEFAULT_MIN_HEART_ML


def check_role(trained, role: str) -> None:
    """Raises ModelMismatchError unless `trained` is a `role` model with the right class count."""
    task = str(getattr(trained, "task", None) or trained.config.get("task", ""))
    num_classes = int(trained.num_classes)
    config_classes = int(trained.config.model.num_classes)
    path = getattr(trained, "path", None)
    expected = EXPECTED[role]
    problems = []
    if task != role:
        problems.append(f"it is a {task or 'unknown-task'} model (task {task!r}), "
                        f"the {role} model must have task {role!r}")
    if num_classes != expected or config_classes != expected:
        problems.append(f"it has {num_classes} classes (config: {config_classes}), "
                        f"a {role} model has {expected}")
    if problems:
        raise ModelMismatchError(path, f"given as the {role} model, but " + "; ".join(problems))


def iter_batches(num_slices: int, batch_size: int) -> Iterator[np.ndarray]:
    """Centre-slice indices of each batch, in order (the last batch may be short)."""
    for first in range(0, num_slices, batch_size):
        yield np.arange(first, min(first + batch_size, num_slices))


# ---------------------------------------------------------------------------------------------
# Batch runs (`cac-jax infer`)
# ---------------------------------------------------------------------------------------------

_GENERIC_NAMES = {"dicom", "dcm", "image", "images", "ct", "series", "study"}


@dataclasses.dataclass(frozen=True)
class Study:
    """One study to score: its id, where it is, the protocol a manifest gives, the series."""

    scan_id: str
    image: Path
    protocol: str = ""
    series: str | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def scan_ids_for(paths: list[Path]) -> list[str]:
    """Scan ids for input paths: the file or folder name without its image suffix; where that
    is generic ("dicom") or not unique, the path below the inputs' common folder, joined by '_'."""
    resolved = [p.resolve() for p in paths]
    ids = [_stem(p) for p in resolved]
    if len(set(ids)) == len(ids) and not any(i.lower() in _GENERIC_NAMES for i in ids):
        return ids
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path()
    if len(resolved) == 1:
        common = resolved[0].parent.parent
    ids = ["_".join([*p.parent.relative_to(common).parts, _stem(p)]) for p in resolved]
    return ids


def safe_name(scan_id: str) -> str:
    """A file name for a scan id: characters other than letters, digits, '.', '_', '-' -> '_'."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in scan_id).lstrip(".")
    return name or "_"


def studies_from_args(inputs: list[str] | None, manifest: str | None,
                      series: str | None = None) -> list[Study]:
    """The studies of `--input PATH...` or `--manifest M.csv` (ids from the manifest, else from
    the paths). Missing files are left for the batch to report per study."""
    if manifest is not None:
        from data_pipeline.manifest import read_manifest

        rows = read_manifest(manifest, check_files=False, inference=True)
        return [Study(r.scan_id, Path(r.image), r.protocol, series if series is not None else r.series)
                for r in rows]
    paths = [Path(p) for p in inputs or ()]
    if not paths:
        raise InputError(None, "no studies given (--input PATH ... or --manifest M.csv)")
    seen: dict[Path, str] = {}
    for p in paths:
        if p.resolve() in seen:
            raise InputError(p, "given twice in --input")
        seen[p.resolve()] = str(p)
    ids = scan_ids_for(paths)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(None, f"inputs give the same scan id {duplicates[0]!r}; use a manifest "
                               "to name the studies")
    return [Study(i, p, "", series) for i, p in zip(ids, paths, strict=True)]
