"""Validation during training: loss, Dice per class, and per-scan Agatston categories with the
linearly weighted kappa the paper reports (docs/training.md).

- `evaluate(config, p_eval, state, val_iter, heart_masks)`: the metrics of a replicated state on
  the validation iterator (every host walks the same number of batches; the category tables are
  summed over hosts); with `share_slices` (a ConvLSTM, one process) each batch goes to the
  devices as its distinct slices and the windows' indices (`shared_slices_batch`), as inference
  runs it, so a slice is encoded once, not once per window that holds it;
- `_ScanCollector`: reassembles the per-slice predictions, HU and true classes into whole scans
  (a heart-frame calcium model's probabilities are mapped back onto each scan's grid, as
  inference does);
- `scan_categories`: reference vs predicted category per protocol (calcium model: predicted
  coronary class at HU >= 130 inside the reference heart mask, scored by `cac_jax.postprocess`,
  the code inference uses; heart model: the naive 130 HU threshold inside the predicted heart
  silhouette), and the naive threshold's categories beside them;
- `_reference_heart_masks`, `_train_pixel_spacing`: what validation and the checkpoints' `meta`
  read from the TFDS dataset.
"""

from __future__ import annotations

import hashlib
import math
import os

import jax
import numpy as np

from cac_jax import distributed as dist
from cac_jax.evaluation.statistics import linear_kappa
from data_pipeline import frames as frames_lib
from data_pipeline.constants import NUM_CATEGORIES
from data_pipeline.labels import unwindow_hu
from data_pipeline.manifest import PROTOCOLS

CALCIUM_CLASS_NAMES = ("background", "coronary", "noncoronary")
HEART_CLASS_NAMES = ("background", "heart")
# Distinct slices a shared batch holds beyond one per window, smallest first (each one compiles
# once): consecutive centres at neighbour offset k add 2k, a batch that crosses into another
# scan 2k more (k is 1-2 at 1.5-5 mm slices). A device needing more runs its windows.
SHARED_EXTRA_SLICES = (2, 4, 8)


def metric_names(task: str) -> tuple[str, ...]:
    """Every metric a validation pass of a `task` model can report (`evaluate`'s keys; the
    per-protocol ones only where that protocol is validated): the names `train.best_metric` and
    `train.early_stop_metric` may take."""
    classes = CALCIUM_CLASS_NAMES if task == "calcium" else HEART_CLASS_NAMES
    names = ["val_loss", *(f"val_dice_{c}" for c in classes[1:]), "val_dice_mean",
             "val_kappa", "val_kappa_naive", "val_exact", "val_scans"]
    for protocol in (*PROTOCOLS, CTAC_VS_GATED):
        names += [f"val_kappa_{protocol}", f"val_kappa_naive_{protocol}", f"val_exact_{protocol}"]
    return (*names, "val_kappa_paired")


def _reference_heart_masks(data, split: str, scan_ids: set[str]) -> dict[str, np.ndarray]:
    """The reference heart masks of the given scans, read from the TFDS dataset."""
    import tensorflow_datasets as tfds

    from data_pipeline.input_pipeline import dataset_path

    builder = tfds.builder_from_directory(os.fspath(dataset_path(data)))
    decoders = tfds.decode.PartialDecoding(
        {"scan_id": True, "heart_mask": True, "has_heart_mask": True})
    masks = {}
    if split not in builder.info.splits or not builder.info.splits[split].num_examples:
        return masks
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    for ex in tfds.as_numpy(ds):
        scan_id = ex["scan_id"].decode()
        if scan_id in scan_ids and ex["has_heart_mask"]:
            masks[scan_id] = ex["heart_mask"].astype(bool)
    return masks


def _train_pixel_spacing(data) -> dict:
    """min/median/max in-plane pixel spacing (mm) of the training split, for inference."""
    import tensorflow_datasets as tfds

    from data_pipeline.input_pipeline import dataset_path
    from data_pipeline.scan_index import read_scan_index, split_entries

    builder = tfds.builder_from_directory(os.fspath(dataset_path(data)))
    entries = split_entries(builder, "train", read_scan_index(dataset_path(data)))
    if entries is not None:  # the build-time scan index: no record is read
        values = [float(v) for e in entries for v in e["spacing_zyx_mm"][1:]]
    else:
        decoders = tfds.decode.PartialDecoding({"spacing_zyx_mm": True})
        ds = builder.as_dataset(split="train", shuffle_files=False, decoders=decoders)
        values = [float(v) for ex in tfds.as_numpy(ds) for v in ex["spacing_zyx_mm"][1:]]
    if not values:
        return {}
    return {"min": float(np.min(values)), "median": float(np.median(values)),
            "max": float(np.max(values))}


class _ScanCollector:
    """Reassembles per-slice predictions and HU into whole scans on the host.

    With `frame` (a heart-frame calcium model: the input pipeline's store and the data config),
    each slice's class probabilities in its heart frame are resampled onto the scan's grid and the
    argmax taken (`data_pipeline.frames.from_frame`, what inference does), and the HU and the true
    classes come from the stored scan.
    """

    def __init__(self, scans, frame=None):
        self.scans = scans
        self.frame = frame
        self.pred = [np.zeros(s.shape_zyx, np.uint8) for s in scans]
        self.hu = [np.zeros(s.shape_zyx, np.int16) for s in scans]
        self.true = [np.zeros(s.shape_zyx, np.uint8) for s in scans]

    def add(self, pred: np.ndarray, batch: dict) -> None:
        valid = batch["valid"].reshape(-1)
        scan_index = batch["scan_index"].reshape(-1)
        slice_index = batch["slice_index"].reshape(-1)
        if self.frame is not None:
            self._add_frame(pred.reshape(-1, *pred.shape[-3:]), valid, scan_index, slice_index)
            return
        pred = pred.reshape(-1, *pred.shape[-2:])
        labels = batch["label"].reshape(-1, *batch["label"].shape[-2:])
        centre = batch["image"].reshape(-1, *batch["image"].shape[-4:])[:, 1, ..., 0]
        for i in np.flatnonzero(valid):
            s, z = int(scan_index[i]), int(slice_index[i])
            _, h, w = self.scans[s].shape_zyx
            self.pred[s][z] = pred[i, :h, :w]
            self.true[s][z] = labels[i, :h, :w]
            # The windowed image gives HU back exactly within HU_WINDOW (stored int16 HU, scaled
            # to [0, 1]): enough for the 130/200/300/400 HU rules.
            self.hu[s][z] = np.rint(unwindow_hu(centre[i, :h, :w])).astype(np.int16)

    def _add_frame(self, probs, valid, scan_index, slice_index) -> None:
        store, data = self.frame
        for s in np.unique(scan_index[valid]):
            s = int(s)
            rows = np.flatnonzero(valid & (scan_index == s))
            geom = store.frame_geometry(s, int(data.frame_size), float(data.frame_spacing_mm))
            native = frames_lib.from_frame(probs[rows], geom)
            zs = slice_index[rows].astype(np.int64)
            self.pred[s][zs] = np.argmax(native, axis=-1).astype(np.uint8)
            hu, target = store.volumes(s, s)
            if store.resident:
                # The stored scan whole (no copy): slices not validated have no predicted
                # calcium, and the heart silhouette, where everything is scored, lies within the
                # validated ones (data_pipeline.records.eval_slice_mask).
                self.hu[s], self.true[s] = hu, target
            else:  # decoded for this call (streamed): keep only the validated slices
                self.hu[s][zs] = hu[zs]
                self.true[s][zs] = target[zs]


# The paper's CTAC design: CTAC predictions against the same patient's gated reference category.
CTAC_VS_GATED = "ctac_vs_gated"


def _patient_key(patient: str) -> int:
    """A 63-bit integer naming a patient ID, the same on every host."""
    digest = hashlib.blake2b(str(patient).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _gated_references(scored) -> dict:
    """{patient: gated reference category} of the gated scans scored on every host (all-gathered,
    so a CTAC scan pairs with its patient's gated scan wherever validation sharded that one)."""
    local = {_patient_key(patient): reference for patient, protocol, reference, _, _ in scored
             if protocol == "cac"}
    rows = np.asarray(sorted(local.items()), np.int64).reshape(-1, 2)
    longest = int(dist.allgather(np.asarray(len(rows), np.int64)).max())
    padded = np.full((longest, 2), -1, np.int64)
    padded[:len(rows)] = rows
    gathered = dist.allgather(padded).reshape(-1, 2)
    keys = {int(key): int(category) for key, category in gathered if key >= 0}
    ctac = {patient: _patient_key(patient) for patient, protocol, _, _, _ in scored
            if protocol == "ctac"}
    return {patient: keys[key] for patient, key in ctac.items() if key in keys}


def scan_categories(config, collector: _ScanCollector, heart_masks: dict,
                    cache: dict | None = None) -> dict:
    """{protocol: (model confusion 4x4, naive-threshold confusion 4x4)} of reference vs predicted
    category, for every protocol of the manifest contract (zeros where none was validated, so
    every host sums the same arrays), and under CTAC_VS_GATED the CTAC scans' predicted category
    against the same patient's gated reference (wherever that patient's gated scan was
    validated: every host must call this at the same point, as `evaluate` does).

    `cache` (a dict kept by the caller for one validation set) holds, per scan, what does not
    depend on the model: a calcium model's heart silhouette, and every model's reference and
    naive-threshold categories."""
    from cac_jax.baselines import threshold_score
    from cac_jax.postprocess import DEFAULT_HEART_DILATION_MM, heart_silhouette, predicted_score

    shape = (NUM_CATEGORIES, NUM_CATEGORIES)
    matrices = {protocol: (np.zeros(shape, np.int64), np.zeros(shape, np.int64))
                for protocol in (*PROTOCOLS, CTAC_VS_GATED)}
    cache = {} if cache is None else cache
    scored = []   # (patient, protocol, reference, predicted, naive)
    for info, pred, hu, true in zip(collector.scans, collector.pred, collector.hu, collector.true):
        heart = heart_masks.get(info.scan_id)
        if heart is None or heart.shape != hu.shape or info.protocol not in PROTOCOLS:
            # No reference heart mask: no category for this scan; a protocol outside the
            # manifest contract (ingest refuses those): not scored.
            continue
        if info.scan_id not in cache:
            reference = info.category
            if reference is None and config.task == "calcium":
                # No reference score stored: the true coronary class scored the same way.
                reference = predicted_score(hu, true, heart, info.spacing_zyx_mm).category
            # Inference's rule for a calcium model: coronary calcium counts inside the heart
            # dilated by the Scorer's default margin, so the best checkpoint is picked on the
            # number users get.
            silhouette = (heart_silhouette(heart, info.spacing_zyx_mm, DEFAULT_HEART_DILATION_MM)
                          if config.task == "calcium" else None)
            naive = threshold_score(hu, heart, info.spacing_zyx_mm).category
            cache[info.scan_id] = (reference, silhouette, naive)
        reference, silhouette, naive = cache[info.scan_id]
        if reference is None:
            continue
        if config.task == "calcium":
            predicted = predicted_score(hu, pred, silhouette, info.spacing_zyx_mm).category
        else:
            predicted = threshold_score(hu, heart_silhouette(pred, info.spacing_zyx_mm),
                                        info.spacing_zyx_mm).category
        scored.append((info.patient_id, info.protocol, reference, predicted, naive))
    gated = _gated_references(scored)
    for patient, protocol, reference, predicted, naive in scored:
        cells = [(protocol, reference)]
        if protocol == "ctac" and patient in gated:
            cells.append((CTAC_VS_GATED, gated[patient]))
        for key, row in cells:
            model_cm, naive_cm = matrices[key]
            model_cm[row, predicted] += 1
            naive_cm[row, naive] += 1
    return matrices


def shared_slices_batch(images: np.ndarray, extra=SHARED_EXTRA_SLICES):
    """(slices (n, S, H, W, 1), windows (n, B, 3) int32) of the windows `images`
    (n, B, 3, H, W, 1) of n devices: per device its distinct slices, found by content (a slice
    that is one window's centre and another's neighbour, an edge slice repeated, is the same
    array), zero-padded to S = B + the smallest of `extra` that holds every device's, and each
    window as indices into them; None when a device's windows hold more (or S would reach 3B)."""
    n, batch, depth = images.shape[:3]
    windows = np.empty((n, batch, depth), np.int32)
    for d in range(n):
        seen: dict[bytes, int] = {}
        for i in range(batch):
            for j in range(depth):
                windows[d, i, j] = seen.setdefault(images[d, i, j].tobytes(), len(seen))
    needed = int(windows.max()) + 1
    sizes = [batch + e for e in extra if needed <= batch + e < depth * batch]
    if not sizes:
        return None
    slices = np.zeros((n, sizes[0], *images.shape[3:]), images.dtype)
    for d in range(n):
        # Each distinct slice from the first window slot that holds it (indices count up).
        _, first = np.unique(windows[d].reshape(-1), return_index=True)
        slices[d, :len(first)] = images[d].reshape(batch * depth, *images.shape[3:])[first]
    return slices, windows


def evaluate(config, p_eval, state, val_iter, heart_masks, stop=None,
             cache: dict | None = None, share_slices: bool = False) -> dict | None:
    """Validation metrics of the replicated `state` on `val_iter` (every host, same steps).

    `stop(batch_index)`, polled before each batch (every host at the same batches), ends the
    evaluation early: None is returned (a SIGTERM during validation). `cache`, a dict the caller
    keeps across the passes over one validation set, spares each pass the scans' model-free
    scoring (`scan_categories`). `share_slices`: the model encodes slices on their own (the
    ConvLSTM: `cac_jax.models.shares_slices`); with one process, each batch then runs as its
    distinct slices (the same outputs). Several processes keep the windows: every host must
    call the devices with the same structure, and one host's batch may not fit."""
    num_classes = int(config.model.num_classes)
    names = CALCIUM_CLASS_NAMES if config.task == "calcium" else HEART_CLASS_NAMES
    totals = None
    frame = ((val_iter.store, config.data) if frames_lib.uses_heart_frame(config) else None)
    collector = _ScanCollector(val_iter.scans, frame)
    for index, batch in enumerate(val_iter):
        if stop is not None and stop(index):
            return None
        arrays = dist.shard_batch(batch)
        if share_slices and jax.process_count() == 1:
            packed = shared_slices_batch(np.asarray(batch["image"]))
            if packed is not None:
                arrays = {k: v for k, v in arrays.items() if k != "image"}
                arrays["slices"], arrays["windows"] = packed
        pred, sums = p_eval(state, arrays)
        sums = dist.unreplicate(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        collector.add(dist.local_array(pred), batch)
    metrics = {}
    if totals is None:
        return metrics
    metrics["val_loss"] = float(totals["loss_sum"] / max(float(totals["weight_sum"]), 1e-12))
    dice = []
    for c in range(1, num_classes):
        denom = float(totals["predicted"][c] + totals["true"][c])
        value = 2.0 * float(totals["intersection"][c]) / denom if denom else math.nan
        metrics[f"val_dice_{names[c]}"] = value
        dice.append(value)
    finite = [d for d in dice if math.isfinite(d)]
    metrics["val_dice_mean"] = float(np.mean(finite)) if finite else math.nan
    matrices = {protocol: (dist.sum_processes(m), dist.sum_processes(n))
                for protocol, (m, n) in scan_categories(config, collector, heart_masks, cache).items()}
    model_cm = sum(matrices[p][0] for p in PROTOCOLS)
    naive_cm = sum(matrices[p][1] for p in PROTOCOLS)
    metrics["val_kappa"] = linear_kappa(model_cm)
    metrics["val_kappa_naive"] = linear_kappa(naive_cm)
    metrics["val_exact"] = float(np.trace(model_cm) / max(model_cm.sum(), 1))
    metrics["val_scans"] = int(model_cm.sum())
    # Per protocol (the paper reports gated CAC and CTAC apart); protocols not validated are left
    # out.
    for protocol, (m, n) in matrices.items():
        if m.sum():
            metrics[f"val_kappa_{protocol}"] = linear_kappa(m)
            metrics[f"val_kappa_naive_{protocol}"] = linear_kappa(n)
            metrics[f"val_exact_{protocol}"] = float(np.trace(m) / m.sum())
    # The paper's design pooled: gated scans against their reference, CTAC scans against the
    # same patient's gated reference (`train.best_metric="val_kappa_paired"` ranks on it).
    paired = matrices["cac"][0] + matrices[CTAC_VS_GATED][0]
    if paired.sum():
        metrics["val_kappa_paired"] = linear_kappa(paired)
    return metrics
