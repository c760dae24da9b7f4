"""The scan stores of the tf.data input pipeline: where a host's voxels live and how a sample's
window reaches tf.data.

`_Source` holds the per-slice lookup tables (TF) and cuts each slice's 3-slice window (and, for the
heart frame, its centre and frame resampling: `data_pipeline.frames`); `_MemoryStore` decodes the
host's shard once into one int16 and one uint8 buffer; `_StreamStore` reads scans from the records
when the sampling plan reaches them and holds about two blocks. Both give the same batches
(`data_pipeline.input_pipeline` docstring: `config.data.cache`).
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline import frames as frames_lib
from data_pipeline import labels as labels_lib
from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.errors import InputError
from data_pipeline.records import ScanInfo, _Records, _target_keys, _tf


class _Source:
    """The host's scans for the tf.data graph: per-slice lookup tables (TF) and the voxels (numpy).

    The voxels stay in numpy and reach tf.data through `tf.numpy_function` (one call per sample,
    returning the 3-slice window): a `tf.constant` captured by a tf.data function is copied by
    tf.data's graph rewrites (twice the RAM), and a `tf.Variable` needs a second full-size copy
    while it is created. Subclasses hold the voxels in memory or stream them from the records.
    """

    # Whether `volumes` returns views of voxels held anyway (a caller may keep them), not arrays
    # decoded for the call.
    resident = False

    def __init__(self, scans: list[ScanInfo], records: _Records | None, record_index, task: str,
                 heart_frame: bool = False, frame_spacing_mm: float = 1.0):
        tf = _tf()
        self.scans = scans
        self.records = records
        self.record_index = list(record_index)
        self.target_key = _target_keys(task)[0]
        # Heart frame (data_pipeline.frames): each scan's frame centre (y, x) in its pixels, from
        # the reference heart mask (else the coronary calcium, else the scan centre), found when
        # the scan is decoded.
        self.heart_frame = bool(heart_frame)
        self.centres: dict[int, tuple[float, float]] = {}
        self.shapes = np.asarray([s.shape_zyx for s in scans], np.int64).reshape(-1, 3)
        self.offsets = np.asarray([s.neighbour_offset for s in scans], np.int64)
        slices_per_scan = self.shapes[:, 0]
        self.num_slices = int(slices_per_scan.sum())
        self.slice_scan_np = np.repeat(np.arange(len(scans)), slices_per_scan)
        first_slice = np.concatenate([[0], np.cumsum(slices_per_scan)[:-1]]).astype(np.int64)
        self.slice_z_np = np.arange(self.num_slices) - first_slice[self.slice_scan_np]
        self.slice_scan = tf.constant(self.slice_scan_np.astype(np.int64))
        self.slice_z = tf.constant(self.slice_z_np.astype(np.int64))
        self.shapes_t = tf.constant(self.shapes)
        self.scan_ids = tf.constant([s.scan_id for s in scans] or [""])
        # Heart frame: scan pixels per frame pixel (y, x), per scan.
        frame_mm = float(frame_spacing_mm or 1.0)
        self.ratios_t = tf.constant(np.asarray(
            [[frame_mm / s.spacing_zyx_mm[1], frame_mm / s.spacing_zyx_mm[2]] for s in scans]
            or [[1.0, 1.0]], np.float32))

    @property
    def decoded_bytes(self) -> int:
        """Decoded size of the scans: int16 HU + uint8 target, 3 bytes per voxel."""
        return int(self.shapes.prod(axis=1).sum()) * 3

    def _decode(self, scan: int) -> tuple[np.ndarray, np.ndarray]:
        """(hu (z, y, x) int16, target (z, y, x) uint8) of one scan, read from the records."""
        keys = ("hu", self.target_key, "heart_mask") if self.heart_frame else ("hu",
                                                                               self.target_key)
        ex = self.records.read(self.record_index[scan], keys)
        hu = np.asarray(ex["hu"], np.int16)
        target = np.asarray(ex[self.target_key]).astype(np.uint8, copy=False)
        if hu.shape != tuple(self.shapes[scan]) or target.shape != hu.shape:
            raise InputError(self.scans[scan].scan_id, f"stored volume shape {hu.shape} / "
                                                       f"target {target.shape} differ from "
                                                       f"shape_zyx {tuple(self.shapes[scan])}")
        if self.heart_frame:
            heart = np.asarray(ex["heart_mask"])
            self._set_centre(scan, heart if heart.shape == hu.shape else None, target)
        return hu, target

    def _set_centre(self, scan: int, heart: np.ndarray | None, target: np.ndarray) -> None:
        centre = frames_lib.heart_centre_yx(heart, fallback=target == 1)
        if centre is None:
            _, h, w = self.shapes[scan]
            centre = ((h - 1) / 2.0, (w - 1) / 2.0)
        self.centres[scan] = centre

    def centre(self, scan: int) -> tuple[float, float]:
        """The heart frame's centre (y, x) of `scan` (known once the scan has been decoded)."""
        return self.centres[int(scan)]

    def volumes(self, scan: int, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(hu, target) of `scan` as (z, y, x) arrays; `key` names the sampling block asking."""
        raise NotImplementedError

    def _window_np(self, scan, z, key):
        scan, z = int(scan), int(z)
        hu, target = self.volumes(scan, int(key))
        zs = labels_lib.window_indices(hu.shape[0], np.asarray([z]), int(self.offsets[scan]))[0]
        centre = self.centres.get(scan, (0.0, 0.0))
        return hu[zs], target[z], np.asarray(centre, np.float32)

    def window(self, k, key=0):
        """(hu (3, h, w) int16, target (h, w) uint8, scan index, z, frame centre (y, x)) of
        global slice k.

        The neighbours are `neighbour_offset` slices away (`labels.window_indices`, the function
        inference uses), edges repeated. The centre is the heart frame's (0, 0 without one).
        """
        tf = _tf()
        scan = tf.gather(self.slice_scan, k)
        z = tf.gather(self.slice_z, k)
        hu, target, centre = tf.numpy_function(
            self._window_np, [scan, z, tf.cast(key, tf.int64)], [tf.int16, tf.uint8, tf.float32],
            stateful=False)
        shape = tf.gather(self.shapes_t, scan)
        hu = tf.reshape(hu, [3, shape[1], shape[2]])
        target = tf.reshape(target, [shape[1], shape[2]])
        return hu, target, scan, z, tf.reshape(centre, [2])

    def frame_geometry(self, scan: int, frame_size: int, frame_spacing_mm: float):
        """The heart frame of `scan` (data_pipeline.frames.FrameGeometry)."""
        info = self.scans[int(scan)]
        return frames_lib.geometry(self.centre(scan), info.spacing_zyx_mm[1:],
                                   info.shape_zyx[1:], frame_size, frame_spacing_mm)

    def _frame_window_np(self, scan, z, key, frame_size, frame_spacing_mm):
        """(image (3, S, S) float32 windowed, label (S, S) int32, weight (S, S) float32, Agatston
        candidates (S, S) bool) of one slice in its heart frame: the numpy resampling inference
        uses."""
        hu, target, _ = self._window_np(scan, z, key)
        geom = self.frame_geometry(int(scan), int(frame_size), float(frame_spacing_mm))
        image = frames_lib.to_frame(labels_lib.window_hu(hu), geom, order=1, cval=0.0)
        label = frames_lib.to_frame(target, geom, order=0, cval=0).astype(np.int32)
        weight = frames_lib.inside_scan(geom).astype(np.float32)
        candidate = frames_lib.to_frame(hu[1] >= CALCIUM_THRESHOLD_HU, geom, order=0, cval=False)
        return image.astype(np.float32), label, weight, candidate


class _MemoryStore(_Source):
    """Every scan of the host decoded once into one preallocated int16 and one uint8 buffer.

    The buffers are sized from the stored shapes before any volume is decoded and filled one scan
    at a time, so loading needs the decoded bytes plus one scan in flight, never twice the shard.
    `volumes` returns views of them: holding one costs no memory.
    """

    resident = True

    def __init__(self, scans, records, record_index, task, *, progress: bool = False,
                 heart_frame: bool = False, frame_spacing_mm: float = 1.0):
        super().__init__(scans, records, record_index, task, heart_frame, frame_spacing_mm)
        voxels = self.shapes.prod(axis=1)
        self.starts = np.concatenate([[0], np.cumsum(voxels)[:-1]]).astype(np.int64)
        self.hu = np.empty(int(voxels.sum()), np.int16)
        self.target = np.empty(int(voxels.sum()), np.uint8)
        for scan in range(len(scans)):
            hu, target = self._decode(scan)
            start, count = int(self.starts[scan]), int(voxels[scan])
            self.hu[start:start + count] = hu.reshape(-1)
            self.target[start:start + count] = target.reshape(-1)
            del hu, target

    @classmethod
    def from_arrays(cls, scans: list[ScanInfo], hu_list, target_list, task: str = "calcium",
                    heart_list=None, frame_spacing_mm: float = 1.0):
        """A store of in-memory volumes (tests and tools); no records behind it. `heart_list`
        (reference heart masks) turns the heart frame on."""
        store = cls.__new__(cls)
        _Source.__init__(store, scans, None, range(len(scans)), task, heart_list is not None,
                         frame_spacing_mm)
        for scan, heart in enumerate(heart_list or ()):
            store._set_centre(scan, None if heart is None else np.asarray(heart),
                              np.asarray(target_list[scan]))
        voxels = store.shapes.prod(axis=1)
        store.starts = np.concatenate([[0], np.cumsum(voxels)[:-1]]).astype(np.int64)
        store.hu = np.concatenate([np.asarray(h, np.int16).reshape(-1) for h in hu_list])
        store.target = np.concatenate([np.asarray(t, np.uint8).reshape(-1) for t in target_list])
        return store

    def volumes(self, scan, key):
        del key
        start = int(self.starts[scan])
        count = int(self.shapes[scan].prod())
        shape = tuple(self.shapes[scan])
        return (self.hu[start:start + count].reshape(shape),
                self.target[start:start + count].reshape(shape))


class _StreamStore(_Source):
    """Scans read from the records when the sampling plan reaches them: bounded memory.

    The plan names, for every sample, its block key (training: the epoch's block of
    `shuffle_block_scans` scans; evaluation: the scan). When a key is first asked for, the scans of
    the next key are decoded in the background; a least-recently-used cache holds about two
    blocks of scans. The batches do not depend on the cache (a scan it dropped is read again), so
    they are identical to memory mode's.
    """

    def __init__(self, scans, records, record_index, task, *, block_scans: int,
                 block_of: Callable[[int], Sequence[int]], heart_frame: bool = False,
                 frame_spacing_mm: float = 1.0):
        super().__init__(scans, records, record_index, task, heart_frame, frame_spacing_mm)
        import concurrent.futures

        self.block_of = block_of
        self.capacity = 2 * max(1, block_scans) + 2
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._seen_keys: set[int] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                          thread_name_prefix="scan-stream")
        # The reader thread ends with the store (an iterator dropped mid-stream leaves none).
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self.reads = 0  # scans decoded so far (a dropped scan read again counts again)

    def _load(self, scan):
        self.reads += 1
        return self._decode(scan)

    def _future(self, scan: int):
        future = self._cache.get(scan)
        if future is None:
            future = self._pool.submit(self._load, scan)
            self._cache[scan] = future
        self._cache.move_to_end(scan)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return future

    def volumes(self, scan, key):
        with self._lock:
            future = self._future(scan)
            if key not in self._seen_keys:
                self._seen_keys.add(key)
                for upcoming in self.block_of(key + 1):
                    if upcoming not in self._cache:
                        self._future(int(upcoming))
                    # Keep the asking scan most recent: the prefetch must not evict it.
                self._cache.move_to_end(scan)
        return future.result()
