"""Training targets and model inputs from stored scans (numpy only; inference reuses it).

The model inputs and targets of docs/contracts.md:
- calcium classes: 0 background, 1 coronary calcium (label 1-4: LAD, LCX, RCA, undetermined), 2
  non-coronary calcium (label >= 5: aorta, valves, other) and, in every file, any other voxel at
  HU >= 130 that is not coronary (bone, noise), so the model learns to tell them apart. The HU rule
  applies to every file, whether or not it annotates non-coronary calcium.
- heart mask: any non-zero voxel is heart.
- HU window: clip to [-800, 1200] HU and scale to [0, 1] (paper, "Preprocessing").
- 3-slice windows: each axial slice with its two neighbours; the first and last slices repeat
  themselves in place of the missing neighbour.
"""

from __future__ import annotations

import math

import numpy as np

from data_pipeline.constants import (
    CALCIUM_THRESHOLD_HU,
    CORONARY_LABELS,
    DEFAULT_NEIGHBOUR_MM,
    FIRST_NON_CORONARY_LABEL,
)

# Agatston 1990: calcium is 130 HU and above (one source: data_pipeline.constants).
CALCIUM_HU = CALCIUM_THRESHOLD_HU
# Paper, "Preprocessing": min-max thresholding between -800 HU and 1200 HU.
HU_WINDOW = (-800.0, 1200.0)
NUM_CALCIUM_CLASSES = 3  # background, coronary calcium, non-coronary calcium
NUM_HEART_CLASSES = 2
WINDOW = 3  # adjacent slices per sample (the centre and its two neighbours)
# DEFAULT_NEIGHBOUR_MM (3 mm, from data_pipeline.constants): the distance between a centre slice
# and each neighbour the models see; `neighbour_offset` turns it into slices.


def calcium_classes(labels: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Maps an annotation label map and its HU volume to the 3 training classes (uint8).

    1 where the label is coronary (1-4); 2 where the label is >= 5, or where the voxel is not
    coronary and HU >= 130; 0 elsewhere.
    """
    labels = np.asarray(labels)
    hu = np.asarray(hu)
    if labels.shape != hu.shape:
        raise ValueError(f"labels shape {labels.shape} differs from HU shape {hu.shape}")
    coronary = np.isin(labels, CORONARY_LABELS)
    non_coronary = (labels >= FIRST_NON_CORONARY_LABEL) | (~coronary & (hu >= CALCIUM_HU))
    classes = np.zeros(labels.shape, np.uint8)
    classes[non_coronary] = 2
    classes[coronary] = 1
    return classes


def heart_classes(mask: np.ndarray) -> np.ndarray:
    """Heart mask to {0, 1} (uint8): any non-zero voxel is heart."""
    return (np.asarray(mask) != 0).astype(np.uint8)


def window_hu(hu: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Clips HU to [-800, 1200] and scales to [0, 1] (paper)."""
    low, high = HU_WINDOW
    hu = np.asarray(hu, dtype)
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(dtype, copy=False)


def neighbour_offset(spacing_z_mm: float, neighbour_mm: float = DEFAULT_NEIGHBOUR_MM) -> int:
    """Slice offset of the neighbours: max(1, round(neighbour_mm / slice spacing)), half up.

    Training (tf.data) and inference both call this, so a model always sees neighbours at the
    distance it was trained with: 3 mm spacing -> 1, 2.5 mm -> 1, 1.25 mm -> 2, 0.625 mm -> 5.
    """
    spacing_z_mm = float(spacing_z_mm)
    neighbour_mm = float(neighbour_mm)
    if not (math.isfinite(spacing_z_mm) and spacing_z_mm > 0):
        raise ValueError(f"slice spacing must be a positive number of mm, got {spacing_z_mm}")
    if not (math.isfinite(neighbour_mm) and neighbour_mm >= 0):
        raise ValueError(f"neighbour_mm must be a non-negative number of mm, got {neighbour_mm}")
    # Half up with a tolerance, so 3 / 0.6 (= 5.000000000000001) and 2.5 both round as written.
    return max(1, int(math.floor(neighbour_mm / spacing_z_mm + 0.5 + 1e-9)))


def window_indices(num_slices: int, centres: np.ndarray | None = None,
                   offset: int = 1) -> np.ndarray:
    """Slice indices (n, 3) of each centre's window [z-o, z, z+o], clipped to the scan.

    Edges repeat the edge slice; `centres` defaults to every slice 0..num_slices-1, in order;
    `offset` is `neighbour_offset(...)` (1: the directly adjacent slices).
    """
    if offset < 1:
        raise ValueError(f"offset must be >= 1, got {offset}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if centres is None:
        centres = np.arange(num_slices)
    centres = np.asarray(centres, np.int64)
    if centres.size and (centres.min() < 0 or centres.max() >= num_slices):
        raise ValueError(f"centre slice out of range [0, {num_slices})")
    half = WINDOW // 2
    offsets = np.arange(-half, half + 1) * int(offset)
    return np.clip(centres[:, None] + offsets[None, :], 0, num_slices - 1)


def slice_windows(volume: np.ndarray, centres: np.ndarray | None = None,
                  offset: int = 1) -> np.ndarray:
    """The 3-slice windows of a (z, y, x) volume: (n, 3, y, x), edge slices repeated."""
    volume = np.asarray(volume)
    return volume[window_indices(volume.shape[0], centres, offset)]


def model_inputs(hu: np.ndarray, centres: np.ndarray | None = None,
                 offset: int = 1) -> np.ndarray:
    """Model input of each centre slice: (n, 3, y, x, 1) float32 in [0, 1] (below, centre, above).

    The one TF-free preprocessing shared by inference and (through identical arithmetic in
    tf.data) training: 3-slice windows at `offset`, HU windowed to [-800, 1200] and scaled.
    """
    return window_hu(slice_windows(hu, centres, offset))[..., None]


def annotated_calcium_slices(labels: np.ndarray) -> np.ndarray:
    """Per axial slice, whether the annotation marks any calcium, coronary or not (label > 0).

    These are the calcium task's positive slices: the sampler keeps every one each epoch (paper's
    majority-class subset sampling) and draws a fraction of the rest. Slices whose only annotation
    is non-coronary (aorta, valves) count on purpose: telling that calcium from coronary calcium
    is the model's job, and both classes are rare. Unannotated bone at HU >= 130 does not make a
    slice positive, else nearly every slice would be. bool (z,).
    """
    labels = np.asarray(labels)
    return (labels.reshape(labels.shape[0], -1) > 0).any(axis=1)


def heart_slices(mask: np.ndarray) -> np.ndarray:
    """Per axial slice, whether the heart mask is present: bool (z,)."""
    mask = np.asarray(mask)
    return (mask.reshape(mask.shape[0], -1) != 0).any(axis=1)
