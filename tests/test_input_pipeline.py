"""tf.data input pipeline: windows, sampling, determinism and resume, per-host shards, evaluation."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
from test_tfds_builder import write_tiny_cohort  # noqa: E402

from data_pipeline import labels as labels_lib  # noqa: E402
from data_pipeline.config import DATASET_VERSION, data_config  # noqa: E402
from data_pipeline.errors import InputError  # noqa: E402
from data_pipeline.input_pipeline import make_dataset  # noqa: E402

DEVICES = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A built tiny dataset (10 patients, 14 scans of 32/64 px, 5-7 slices) and its scans."""
    from data_pipeline.tfds_builder import build_dataset

    root = tmp_path_factory.mktemp("pipeline")
    # ctac slices 1.5 mm apart: neighbours 2 slices away at the default 3 mm.
    manifest = write_tiny_cohort(root, patients=10, split_column=True, ctac_spacing_z=1.5)
    build_dataset(manifest, root / "tfds", name="tiny", progress=False)
    loaded = tfds.builder_from_directory(str(root / "tfds" / "tiny" / DATASET_VERSION))
    scans = {}
    for split in loaded.info.splits:
        for ex in tfds.as_numpy(loaded.as_dataset(split=split)):
            scans[ex["scan_id"].decode()] = ex
    return root / "tfds", scans


def _config(data_dir, task="calcium", **overrides):
    config = data_config(task, local=True)
    config.data_dir = str(data_dir)
    config.name = "tiny"
    config.seed = 7
    config.image_size = 64
    for key, value in overrides.items():
        if key == "augment":
            config.augment.enabled = value
        else:
            setattr(config, key, value)
    return config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_layout(dataset):
    data_dir, _ = dataset
    it = make_dataset(_config(data_dir), "train", local_devices=DEVICES)
    batch = next(it)
    assert batch["image"].shape == (DEVICES, 2, 3, 64, 64, 1)
    assert batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (DEVICES, 2, 64, 64) and batch["label"].dtype == np.int32
    assert batch["weight"].shape == (DEVICES, 2, 64, 64)
    assert batch["valid"].shape == (DEVICES, 2) and batch["valid"].all()
    assert set(np.unique(batch["label"])) <= {0, 1, 2}


def test_train_centre_label_matches_scan(dataset):
    data_dir, scans = dataset
    # No augmentation, frame = the 64 px scans' own size: the sample is the slice itself.
    it = make_dataset(_config(data_dir, augment=False, negative_fraction=1.0), "train",
                      local_devices=DEVICES)
    checked = collections.Counter()
    assert {s.protocol: s.neighbour_offset for s in it.scans} == {"cac": 1, "ctac": 2}
    for batch in _take(it, 16):
        for d in range(DEVICES):
            for b in range(2):
                info = it.scans[batch["scan_index"][d, b]]
                z = batch["slice_index"][d, b]
                ex = scans[info.scan_id]
                if ex["hu"].shape[1] != 64:
                    continue
                np.testing.assert_array_equal(batch["label"][d, b], ex["calcium_class"][z])
                # The neighbours at the scan's own offset, as inference cuts them.
                window = labels_lib.model_inputs(ex["hu"], [z], info.neighbour_offset)[0, ..., 0]
                np.testing.assert_allclose(batch["image"][d, b, ..., 0], window, atol=1e-6)
                checked[info.neighbour_offset] += 1
    assert checked[1] > 0 and checked[2] > 0


def test_eval_order_windows_edges_and_padding(dataset):
    data_dir, scans = dataset
    # neighbour_mm 6: the 3 mm validation scans get neighbours 2 slices away.
    it = make_dataset(_config(data_dir, neighbour_mm=6.0), "validation", local_devices=DEVICES)
    assert it.neighbour_mm == 6.0 and {s.neighbour_offset for s in it.scans} == {2}
    seen = []
    batches = list(it)
    assert len(batches) == it.steps
    for batch in batches:
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        for i in range(len(flat["valid"])):
            if not flat["valid"][i]:
                assert flat["weight"][i].max() == 0.0
                continue
            scan_id = flat["scan_id"][i].decode()
            z = int(flat["slice_index"][i])
            assert it.scans[flat["scan_index"][i]].scan_id == scan_id
            seen.append((scan_id, z))
            ex = scans[scan_id]
            nz, h, w = ex["hu"].shape
            image = flat["image"][i, ..., 0]
            expected = labels_lib.window_hu(ex["hu"][[max(z - 2, 0), z, min(z + 2, nz - 1)]])
            np.testing.assert_array_equal(  # the one TF-free function inference uses
                expected, labels_lib.model_inputs(ex["hu"], [z], 2)[0, ..., 0])
            np.testing.assert_allclose(image[:, :h, :w], expected, atol=1e-6)
            np.testing.assert_array_equal(flat["label"][i, :h, :w], ex["calcium_class"][z])
            assert flat["weight"][i, :h, :w].min() == 1.0 and flat["weight"][i].sum() == h * w
            if z == 0:  # edge slices repeat
                np.testing.assert_array_equal(image[0], image[1])
            if z == nz - 1:
                np.testing.assert_array_equal(image[2], image[1])
    # Every slice of every validation scan, once, in order.
    expected_order = [(s.scan_id, z) for s in it.scans for z in range(s.shape_zyx[0])]
    assert seen == expected_order
    assert sum(not v for b in batches for v in b["valid"].ravel()) < it.host_batch


def test_sampling_keeps_all_positive_slices(dataset):
    data_dir, _ = dataset
    config = _config(data_dir, negative_fraction=0.5)
    it = make_dataset(config, "train", local_devices=1)
    # 1 device x 2 per batch; read two epochs' worth of samples.
    epoch = it.samples_per_epoch
    batches = _take(it, epoch)  # 2 * epoch samples
    pairs = [(int(s), int(z)) for b in batches
             for s, z in zip(b["scan_index"].ravel(), b["slice_index"].ravel())]
    positives = set()
    negatives = set()
    for index, info in enumerate(it.scans):
        # tiny_scan: calcium on slices 1, 2 and the last.
        for z in range(info.shape_zyx[0]):
            (positives if z in (1, 2, info.shape_zyx[0] - 1) else negatives).add((index, z))
    assert epoch == len(positives) + round(0.5 * len(negatives))
    draws = []
    for e in range(2):
        chosen = pairs[e * epoch:(e + 1) * epoch]
        counts = collections.Counter(chosen)
        assert max(counts.values()) == 1
        assert positives <= set(chosen)
        assert len(set(chosen) & negatives) == round(0.5 * len(negatives))
        draws.append(set(chosen) & negatives)
    assert draws[0] != draws[1]  # calcium-free slices are re-drawn each epoch


def test_heart_task(dataset):
    data_dir, scans = dataset
    it = make_dataset(_config(data_dir, task="heart", augment=False, negative_fraction=0.0),
                      "train", local_devices=DEVICES)
    for batch in _take(it, 4):
        assert set(np.unique(batch["label"])) <= {0, 1}
        for s, z in zip(batch["scan_index"].ravel(), batch["slice_index"].ravel()):
            assert scans[it.scans[s].scan_id]["heart_slice"][z]  # only slices with heart


def test_deterministic_and_resume(dataset):
    data_dir, _ = dataset
    config = _config(data_dir)
    first = _take(make_dataset(config, "train", local_devices=DEVICES), 6)
    again = _take(make_dataset(config, "train", local_devices=DEVICES), 6)
    resumed = _take(make_dataset(config, "train", local_devices=DEVICES, start_step=4), 2)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(first[4:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    config.seed = 8
    other = _take(make_dataset(config, "train", local_devices=DEVICES), 1)[0]
    assert not np.array_equal(other["image"], first[0]["image"])


def test_augmentation_changes_images_but_keeps_range(dataset):
    data_dir, _ = dataset
    plain = next(make_dataset(_config(data_dir, augment=False), "train", local_devices=DEVICES))
    aug = next(make_dataset(_config(data_dir), "train", local_devices=DEVICES))
    np.testing.assert_array_equal(plain["slice_index"], aug["slice_index"])  # same samples
    assert not np.allclose(plain["image"], aug["image"])
    assert 0.0 <= aug["image"].min() and aug["image"].max() <= 1.0
    crop = next(make_dataset(_config(data_dir, crop_size=32), "train", local_devices=DEVICES))
    assert crop["image"].shape[-4:] == (3, 32, 32, 1) and crop["label"].shape[-2:] == (32, 32)


def test_two_processes_cover_each_sample_once(dataset):
    data_dir, _ = dataset
    config = _config(data_dir)
    # validation has 3 scans: with 4 processes one host has none and runs padding batches only.
    for split, processes in (("train", 2), ("validation", 2), ("validation", 4)):
        single = make_dataset(config, split, local_devices=DEVICES, train=False)
        everything = [(s.scan_id, z) for s in single.scans for z in range(s.shape_zyx[0])]
        seen, steps = [], []
        for index in range(processes):
            it = make_dataset(config, split, process_index=index, process_count=processes,
                              local_devices=DEVICES, train=False)
            batches = list(it)
            steps.append(len(batches))
            for batch in batches:
                for valid, scan_id, z in zip(batch["valid"].ravel(), batch["scan_id"].ravel(),
                                             batch["slice_index"].ravel()):
                    if valid:
                        seen.append((scan_id.decode(), int(z)))
        assert len(set(steps)) == 1  # every host runs the same number of evaluation steps
        assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    # Training shards hold disjoint scans.
    train_scans = [{s.scan_id for s in make_dataset(config, "train", process_index=i,
                                                    process_count=2).scans} for i in range(2)]
    assert train_scans[0] and train_scans[1] and not train_scans[0] & train_scans[1]


def test_full_experiment_config_uses_top_level_seed(dataset):
    import ml_collections

    data_dir, _ = dataset
    bare = _config(data_dir)  # data.seed = 7
    data = _config(data_dir)
    data.seed = None
    full = ml_collections.ConfigDict({"seed": 7, "task": "calcium"})
    full.data = data
    a = next(make_dataset(bare, "train", local_devices=DEVICES))
    b = next(make_dataset(full, "train", local_devices=DEVICES))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_iterator_restarts_each_pass_train_stream_continues(dataset):
    data_dir, _ = dataset
    it = make_dataset(_config(data_dir), "validation", local_devices=DEVICES)
    first, second = list(it), list(it)  # a second evaluation used to yield nothing
    assert len(first) == len(second) == it.steps > 0
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Training: one continuing stream; iter() does not restart it.
    config = _config(data_dir)
    train = make_dataset(config, "train", local_devices=DEVICES)
    reference = _take(make_dataset(config, "train", local_devices=DEVICES), 3)
    got = [next(train)]
    assert iter(train) is train
    for batch in train:
        got.append(batch)
        if len(got) == 3:
            break
    for a, b in zip(reference, got):
        np.testing.assert_array_equal(a["image"], b["image"])


def _one_scan_store(hu, target):
    from data_pipeline import input_pipeline as ip

    info = ip.ScanInfo("s", "p", "cac", "site", tuple(hu.shape), (3.0, 0.7, 0.7), None, None, 0)
    return ip._MemoryStore.from_arrays([info], [hu], [target])


def test_augmentation_differs_between_hosts_and_is_deterministic():
    from data_pipeline import input_pipeline as ip

    tf = ip._tf()
    rng = np.random.default_rng(0)
    hu = rng.integers(-800, 1200, (3, 32, 32)).astype(np.int16)
    store = _one_scan_store(hu, (hu > 600).astype(np.uint8))
    data = data_config("calcium", local=True)

    def sample(process_index, index=5):
        return ip._train_sample(tf, store, data, 7, tf.constant(index, tf.int64),
                                tf.constant(1, tf.int64), process_index)

    host0, host0_again, host1 = sample(0), sample(0), sample(1)
    for key in ("image", "label", "weight"):
        np.testing.assert_array_equal(host0[key].numpy(), host0_again[key].numpy())
    # Same seed and sample index on another host: other rotation/zoom/shift and noise.
    assert not np.array_equal(host0["weight"].numpy(), host1["weight"].numpy())
    assert not np.allclose(host0["image"].numpy(), host1["image"].numpy())
    assert not np.allclose(sample(0, index=6)["image"].numpy(), host0["image"].numpy())


def test_resume_is_exact_on_every_host(dataset):
    """Per host, a run resumed at step 3 continues the stream exactly, in either cache mode (here
    a memory-mode run resumed in stream mode)."""
    data_dir, _ = dataset
    for index in range(2):
        kwargs = dict(process_index=index, process_count=2, local_devices=1)
        first = _take(make_dataset(_config(data_dir, cache="memory"), "train", **kwargs), 5)
        resumed = make_dataset(_config(data_dir, cache="stream"), "train", start_step=3, **kwargs)
        assert resumed.cache == "stream"
        _same_batches(first[3:], _take(resumed, 2))


def test_label_stays_on_its_structure_under_rotation_and_zoom():
    """Image and label take the same affine: labelled pixels land on the bright pixels they mark."""
    from data_pipeline import input_pipeline as ip

    tf = ip._tf()
    rng = np.random.default_rng(0)
    bright = rng.random((3, 64, 64)) < 0.03  # isolated bright voxels, each labelled
    hu = np.where(bright, 1200, -800).astype(np.int16)
    store = _one_scan_store(hu, bright.astype(np.uint8))
    data = data_config("calcium", local=True)
    data.augment.rotation_deg = 30.0
    data.augment.scale = 0.2
    for index in range(6):
        s = ip._train_sample(tf, store, data, 3, tf.constant(index, tf.int64),
                             tf.constant(1, tf.int64))
        image = s["image"].numpy()[1, ..., 0]  # centre slice
        label = s["label"].numpy() == 1
        assert label.sum() > 20 and not np.array_equal(label, bright[1])  # really transformed
        on_label = image[label].mean()
        shifted = max(image[np.roll(label, shift, axis)].mean()
                      for axis in (0, 1) for shift in (-1, 1))
        assert on_label > 2.0 * shifted, (index, on_label, shifted)


def _same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_stream_mode_gives_memory_mode_batches(dataset):
    """Same seed, same batches whether the scans are held in memory or streamed from the records,
    for training (also resumed) and evaluation; streaming holds a bounded number of scans."""
    data_dir, _ = dataset
    memory_cfg = _config(data_dir, cache="memory", shuffle_block_scans=2)
    stream_cfg = _config(data_dir, cache="stream", shuffle_block_scans=2)
    memory = make_dataset(memory_cfg, "train", local_devices=DEVICES)
    stream = make_dataset(stream_cfg, "train", local_devices=DEVICES)
    assert (memory.cache, stream.cache) == ("memory", "stream")
    steps = 2 * memory.steps_per_epoch + 1  # past an epoch boundary (new plan, new blocks)
    from_stream = _take(stream, steps)
    _same_batches(_take(memory, steps), from_stream)
    store = stream.store
    assert len(store._cache) <= store.capacity == 2 * 2 + 2
    assert store.reads > len(stream.scans)  # scans were dropped and read again: it streams
    resumed = make_dataset(stream_cfg, "train", local_devices=DEVICES, start_step=3)
    _same_batches(from_stream[3:6], _take(resumed, 3))
    for split in ("validation", "test"):
        _same_batches(list(make_dataset(memory_cfg, split, local_devices=DEVICES)),
                      list(make_dataset(stream_cfg, split, local_devices=DEVICES)))


def test_blocks_shuffle_scans_and_keep_the_sampled_set(dataset):
    """Each epoch visits the scans block by block (block_scans scans at a time); a block's samples
    are shuffled together, and the epoch's set is the same whatever the block size."""
    data_dir, _ = dataset
    its = {b: make_dataset(_config(data_dir, cache="memory", shuffle_block_scans=b), "train",
                           local_devices=1) for b in (0, 2)}
    epoch = {}
    for blocks, it in its.items():
        samples = it.samples_per_epoch
        batches = _take(it, samples // it.host_batch)
        epoch[blocks] = [(int(b["scan_index"][0, i]), int(b["slice_index"][0, i]))
                         for b in batches for i in range(it.host_batch)]
    assert collections.Counter(epoch[0]) == collections.Counter(epoch[2])
    assert epoch[0] != epoch[2]  # but in another order


def test_epoch_plan_blocks():
    """The plan's samples come block after block; each block's samples are from its own scans."""
    from data_pipeline import input_pipeline as ip

    slices = np.array([5, 6, 7, 5, 6, 7, 5])
    slice_scan = np.repeat(np.arange(len(slices)), slices)
    flags = np.arange(slice_scan.size) % 3 == 0
    plan = ip._EpochPlan(flags, slice_scan, len(slices), 1.0, 0.5, seed=4, block_scans=3)
    assert plan.num_blocks == 3
    for epoch in (0, 1):
        chosen, keys = plan.plan(epoch)
        assert len(chosen) == plan.samples == flags.sum() + round(0.5 * (~flags).sum())
        assert set(chosen[flags[chosen]]) == set(np.flatnonzero(flags))  # every positive
        assert np.all(np.diff(keys) >= 0)  # block after block
        assert set(keys) <= set(range(epoch * 3, epoch * 3 + 3))
        scans_seen = set()
        for key in np.unique(keys):
            scans = set(slice_scan[chosen[keys == key]])
            assert scans <= set(plan.block_of(key)) and len(plan.block_of(key)) <= 3
            scans_seen |= scans
        assert scans_seen == set(range(len(slices)))
    assert not np.array_equal(plan.plan(0)[0], plan.plan(1)[0])  # redrawn each epoch


def test_auto_cache_mode_streams_over_budget_and_rejects_unknown_modes(dataset):
    data_dir, _ = dataset
    # TFDS slicing picks a subset of the split's scans (here the first two).
    small = make_dataset(_config(data_dir, cache="auto", memory_budget_gb=1e-6), "train[:2]",
                         train=True)
    assert small.cache == "stream" and len(small.scans) == 2
    assert small.train and small.steps is None
    large = make_dataset(_config(data_dir, cache="auto", memory_budget_gb=1.0), "train")
    assert large.cache == "memory"
    with pytest.raises(InputError, match="config.data.cache"):
        make_dataset(_config(data_dir, cache="disk"), "train")


def test_positive_centred_crops_hold_the_positive_class(dataset):
    """With crop_positive_fraction 1, every crop of a slice with coronary calcium holds some; with
    0 (plain random crops) a good share of them miss it."""
    data_dir, scans = dataset

    def crops_with_coronary(fraction):
        config = _config(data_dir, crop_size=16, crop_positive_fraction=fraction, augment=False,
                         negative_fraction=0.0)
        it = make_dataset(config, "train", local_devices=DEVICES)
        hits = total = 0
        for batch in _take(it, 12):
            for label, scan, z in zip(batch["label"].reshape(-1, 16, 16),
                                      batch["scan_index"].ravel(), batch["slice_index"].ravel()):
                stored = scans[it.scans[scan].scan_id]["calcium_class"][z]
                if (stored == 1).any():
                    total += 1
                    hits += int((label == 1).any())
        return hits, total

    hits, total = crops_with_coronary(1.0)
    assert total >= 10 and hits == total
    random_hits, random_total = crops_with_coronary(0.0)
    assert random_total >= 10 and random_hits < random_total


def test_candidate_mask_is_decided_on_stored_hu_before_augmentation(dataset):
    """Contrast and shift move pixel values across 130 HU; the `candidate` mask the loss weights
    by (cac_jax.train.loss_weight) is the stored centre slice's HU >= 130, carried through the
    geometry with the label."""
    data_dir, scans = dataset
    config = _config(data_dir, negative_fraction=1.0)
    aug = config.augment
    aug.rotation_deg, aug.scale, aug.translate, aug.noise_std = 0.0, 0.0, 0.0, 0.0
    aug.intensity_scale, aug.intensity_shift = 0.0, 0.1  # up to +-200 HU, no geometry
    it = make_dataset(config, "train", local_devices=DEVICES)
    checked = moved = 0
    for batch in _take(it, 8):
        for d in range(DEVICES):
            for b in range(2):
                info = it.scans[batch["scan_index"][d, b]]
                ex = scans[info.scan_id]
                if ex["hu"].shape[1] != 64:
                    continue
                stored = ex["hu"][batch["slice_index"][d, b]] >= 130
                np.testing.assert_array_equal(batch["candidate"][d, b], stored)
                shown = batch["image"][d, b, 1, ..., 0] >= (130 + 800) / 2000
                moved += int(np.sum(shown != stored))
                checked += 1
    assert checked > 0 and moved > 0  # the augmented image alone would have decided otherwise


def test_start_up_reads_the_build_time_scan_index_not_the_records(dataset, tmp_path, monkeypatch):
    """Stream mode's start-up takes the scans' metadata and record offsets from the index that
    the build wrote (scan_index.json); without it (a dataset built before) every record is read,
    and both give the same scans."""
    import shutil

    from data_pipeline import input_pipeline
    from data_pipeline.scan_index import INDEX_FILE

    data_dir, _ = dataset
    assert (data_dir / "tiny" / DATASET_VERSION / INDEX_FILE).is_file()
    reads = collections.Counter()
    read = input_pipeline._Records.read
    offsets = input_pipeline._Records._offsets

    def counting_read(self, index, keys):
        reads["meta" if "scan_id" in keys else "volume"] += 1
        return read(self, index, keys)

    def counting_offsets(self, path):
        reads["offsets"] += 1
        return offsets(self, path)

    monkeypatch.setattr(input_pipeline._Records, "read", counting_read)
    monkeypatch.setattr(input_pipeline._Records, "_offsets", counting_offsets)
    indexed = make_dataset(_config(data_dir, cache="stream"), "train", local_devices=DEVICES)
    assert reads["meta"] == 0 and reads["offsets"] == 0
    old = tmp_path / "tfds"
    shutil.copytree(data_dir, old)
    (old / "tiny" / DATASET_VERSION / INDEX_FILE).unlink()
    unindexed = make_dataset(_config(old, cache="stream"), "train", local_devices=DEVICES)
    assert reads["meta"] > 0 and reads["offsets"] > 0
    assert indexed.scans == unindexed.scans
    # The calcium task's scans carry their reference heart's slices either way (one read each).
    assert all(s.heart_slices == tuple(range(1, s.shape_zyx[0] - 1)) for s in indexed.scans)
    assert reads["meta"] == len(unindexed.scans)
    np.testing.assert_array_equal(next(indexed)["image"], next(unindexed)["image"])


def _scanner_aug(**keys):
    import ml_collections

    aug = ml_collections.ConfigDict({"noise_std": 0.0, "noise_std_max": 0.0, "blur_sigma": 0.0,
                                     "sharpen": 0.0, "sharpen_sigma": 1.0, "kvp_contrast": 0.0})
    aug.update(keys)
    return aug


def test_scanner_smoothing_is_a_mirrored_gaussian():
    """The kernel augmentation's blur equals scipy's Gaussian filter (mirrored edges) on the same
    taps; the edge enhancement is x + a (x - G(x)), so it raises a lone peak and keeps the mean."""
    import tensorflow as tf
    from scipy import ndimage

    from data_pipeline.input_pipeline import _smooth

    rng = np.random.default_rng(0)
    image = rng.uniform(0.3, 0.7, size=(3, 20, 20, 1)).astype(np.float32)
    sigma, radius = 1.3, 4
    got = _smooth(tf, tf.constant(image), tf.constant(sigma), radius).numpy()
    want = np.stack([ndimage.gaussian_filter(image[k, ..., 0], sigma, mode="reflect",
                                             truncate=radius / sigma) for k in range(3)])
    np.testing.assert_allclose(got[..., 0], want, atol=1e-5)


def test_scanner_augmentation_kernels_voltage_and_noise():
    import tensorflow as tf

    from data_pipeline.input_pipeline import _scanner
    from data_pipeline.labels import HU_WINDOW

    low, high = HU_WINDOW
    water = -low / (high - low)
    image = np.full((3, 15, 15, 1), water, np.float32)
    image[:, 7, 7] = (400.0 - low) / (high - low)       # one 400 HU pixel on water
    image[:, 0, 0] = (-500.0 - low) / (high - low)      # lung, below water

    seen = collections.Counter()
    for k in range(60):
        key = tf.constant([k, 3], tf.int64)
        out, std = _scanner(tf, tf.constant(image), _scanner_aug(blur_sigma=1.5, sharpen=0.6),
                            key)
        out = out.numpy()
        peak = out[1, 7, 7, 0]
        if np.isclose(peak, image[1, 7, 7, 0]) and np.allclose(out, image):
            seen["stored"] += 1
        elif peak < image[1, 7, 7, 0]:
            seen["smooth"] += 1
            assert out[1, 7, 7, 0] == out[1].max()      # a blurred spot, centred where it was
        else:
            seen["sharp"] += 1
            assert out[1, 6, 7, 0] < water              # the overshoot ring of a sharp kernel
        assert float(std) == 0.0
        np.testing.assert_allclose(out[1].mean(), image[1].mean(), atol=2e-3)
    # Each kernel is drawn about a third of the time (60 draws).
    assert all(seen[k] >= 8 for k in ("stored", "smooth", "sharp")), seen

    gains, stds = [], []
    for k in range(40):
        out, std = _scanner(tf, tf.constant(image),
                            _scanner_aug(kvp_contrast=0.15, noise_std=0.01, noise_std_max=0.03),
                            tf.constant([k, 5], tf.int64))
        out = out.numpy()
        hu = out[1, 7, 7, 0] * (high - low) + low
        gains.append(hu / 400.0)
        stds.append(float(std))
        np.testing.assert_allclose(out[1, 0, 0], image[1, 0, 0])  # below water: unchanged
        np.testing.assert_allclose(out[1, 3, 3, 0], water, atol=1e-6)  # water stays 0 HU
    assert 0.85 <= min(gains) < 0.95 and 1.05 < max(gains) <= 1.15
    assert 0.01 <= min(stds) < 0.015 and 0.025 < max(stds) <= 0.03


def test_scanner_augmentation_off_leaves_batches_unchanged_and_on_keeps_labels(dataset):
    """The new keys at their neutral values give the batches of a config without them; turned
    on they change the images, never the labels, weights or Agatston candidates."""
    data_dir, _ = dataset
    plain = make_dataset(_config(data_dir), "train", local_devices=DEVICES)
    config = _config(data_dir)
    config.augment.update({"blur_sigma": 1.2, "sharpen": 0.6, "noise_std_max": 0.02,
                           "kvp_contrast": 0.15})
    varied = make_dataset(config, "train", local_devices=DEVICES)
    neutral = _config(data_dir)
    neutral.augment.update({"blur_sigma": 0.0, "sharpen": 0.0, "noise_std_max": 0.0,
                            "kvp_contrast": 0.0})
    same = make_dataset(neutral, "train", local_devices=DEVICES)
    differ = 0
    for a, b, c in zip(_take(plain, 3), _take(varied, 3), _take(same, 3)):
        for key in ("label", "weight", "candidate", "scan_index", "slice_index"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a["image"], c["image"])
        differ += int(not np.allclose(a["image"], b["image"]))
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert differ == 3


def test_eval_slice_mask_holds_every_slice_the_dilated_heart_reaches():
    """"heart": the reference heart's slices and HEART_REACH_MM around them, a superset of the
    slices of the silhouette the scorer counts calcium in, whatever the slice spacing."""
    from cac_jax.postprocess import DEFAULT_HEART_DILATION_MM, heart_silhouette
    from data_pipeline.records import HEART_REACH_MM, ScanInfo, eval_slice_mask

    assert HEART_REACH_MM == DEFAULT_HEART_DILATION_MM
    heart = np.zeros((30, 16, 16), bool)
    heart[12:17, 4:12, 4:12] = True
    for dz in (0.5, 1.25, 2.5, 3.0, 5.0):
        spacing = (dz, 0.7, 0.7)
        info = ScanInfo("s", "p", "cac", "x", heart.shape, spacing, None, None, 0,
                        heart_slices=tuple(range(12, 17)))
        keep = eval_slice_mask(info, "heart")
        reached = heart_silhouette(heart, spacing, DEFAULT_HEART_DILATION_MM).any(axis=(1, 2))
        assert keep[reached].all() and reached.sum() <= keep.sum() < heart.shape[0], dz
        reach = int(np.ceil(3.0 / dz))
        np.testing.assert_array_equal(np.flatnonzero(keep), np.arange(12 - reach, 17 + reach))
        assert eval_slice_mask(info, "all").all()
    # Two separate runs near the edges: clipped, each grown on its own.
    info = ScanInfo("s", "p", "cac", "x", (12, 4, 4), (3.0, 1, 1), None, None, 0,
                    heart_slices=(0, 9))
    np.testing.assert_array_equal(np.flatnonzero(eval_slice_mask(info, "heart")),
                                  [0, 1, 8, 9, 10])
    # No heart mask: every slice; a mask without heart: none (the scorer counts nothing there).
    no_mask = ScanInfo("s", "p", "cac", "x", (5, 4, 4), (3.0, 1, 1), None, None, 0)
    assert eval_slice_mask(no_mask, "heart").all()
    empty = ScanInfo("s", "p", "cac", "x", (5, 4, 4), (3.0, 1, 1), None, None, 0,
                     heart_slices=())
    assert not eval_slice_mask(empty, "heart").any()
    with pytest.raises(ValueError, match="eval_slices"):
        eval_slice_mask(no_mask, "lungs")


@pytest.fixture(scope="module")
def short_heart_dataset(tmp_path_factory):
    """The tiny cohort with each heart on slice 2 only: 3 mm slices keep 1-3 under "heart"."""
    from data_pipeline.tfds_builder import build_dataset

    root = tmp_path_factory.mktemp("short_heart")
    manifest = write_tiny_cohort(root, patients=10, split_column=True, heart_slices=slice(2, 3))
    build_dataset(manifest, root / "tfds", name="tiny", progress=False)
    return root / "tfds"


def _validated(iterator) -> dict[tuple[str, int], dict]:
    """{(scan_id, z): that sample's arrays} of one evaluation pass, checking the order."""
    seen = {}
    for batch in iterator:
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        for i in np.flatnonzero(flat["valid"]):
            key = (flat["scan_id"][i].decode(), int(flat["slice_index"][i]))
            assert key not in seen
            seen[key] = {k: v[i] for k, v in flat.items()}
    return seen


def test_eval_slices_heart_validates_the_heart_slab_only(short_heart_dataset):
    from data_pipeline.records import eval_slice_mask

    config = _config(short_heart_dataset)
    every = _validated(make_dataset(config, "validation", local_devices=DEVICES))
    config.eval_slices = "heart"
    it = make_dataset(config, "validation", local_devices=DEVICES)
    heart = _validated(it)
    assert list(heart) == [(s.scan_id, z) for s in it.scans
                           for z in np.flatnonzero(eval_slice_mask(s, "heart"))]
    assert {z for _, z in heart} == {1, 2, 3}  # heart on slice 2, reach 1 slice at 3 mm
    assert set(heart) < set(every) and len(heart) < len(every)
    for key, sample in heart.items():  # the same samples as the full pass gives for them
        for name in ("image", "label", "weight", "candidate"):
            np.testing.assert_array_equal(sample[name], every[key][name])
    # Several processes: equal evaluation steps, every kept slice once.
    for processes in (2, 4):
        seen, steps = [], []
        for index in range(processes):
            shard = make_dataset(config, "validation", process_index=index,
                                 process_count=processes, local_devices=DEVICES)
            batches = list(shard)
            steps.append(len(batches))
            seen += [(s.decode(), int(z)) for b in batches for v, s, z in
                     zip(b["valid"].ravel(), b["scan_id"].ravel(), b["slice_index"].ravel())
                     if v]
        assert len(set(steps)) == 1 and sorted(seen) == sorted(heart), processes
