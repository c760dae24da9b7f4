"""Orbax checkpoints of training runs, and `load_trained(path)` for inference (no TensorFlow).

A training workdir (`cac-jax train --workdir DIR`) holds `DIR/config.json` and `DIR/checkpoints/`,
an Orbax `CheckpointManager` directory with one folder per saved step. Each step folder is
self-sufficient; it holds four items:
- `variables`: the model variables for `model.apply` (`{"params": ...}` plus `"batch_stats"` with
  BatchNorm), as host arrays (float32 master weights);
- `train_state`: optimizer state and step (resume only);
- `meta` (JSON): step (the seeded input pipeline resumes exactly from it), validation metrics of
  that step, plateau and early-stopping state, and the dataset's in-plane pixel spacing;
- `config` (JSON): the resolved training config, so inference rebuilds the model from the
  checkpoint alone.
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
during a write leaves no folder that reads as a checkpoint; `load_trained` also refuses a step
folder whose items are missing.

Training builds its checkpoints with `training_items`, resumes with `load_state_if_possible`
(the latest intact checkpoint, agreed between processes) and saves with `save_training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

import ml_collections

from data_pipeline.errors import InputError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
ITEMS = ("variables", "train_state", "meta", "config")
# Orbax marks a finished step folder with this file (written last, before the rename).
_FINALIZED_MARKER = "_CHECKPOINT_METADATA"


@dataclasses.dataclass
class TrainedModel:
    """A trained model restored from a checkpoint (what inference needs, nothing of training)."""

    config: ml_collections.ConfigDict  # the resolved training config stored with the checkpoint
    model: Any  # flax.linen.Module: cac_jax.models.build_model(config)
    variables: dict  # for model.apply: {"params": ...} (+ "batch_stats" with BatchNorm)
    step: int
    path: pathlib.Path  # the checkpoint step folder that was loaded
    workdir: pathlib.Path
    task: str  # "calcium" | "heart"
    num_classes: int
    pixel_spacing_mm: dict  # {"min", "median", "max"}: in-plane spacing of the training scans
    neighbour_mm: float
    metrics: dict  # validation metrics recorded at that step ({} if none)
    # {"min", "median", "max"} ml of the training scans' hearts where the checkpoint's meta records
    # them ({} if not): inference's smallest plausible heart (`cac_jax.inference.min_heart_bound`).
    heart_volume_ml: dict = dataclasses.field(default_factory=dict)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON-compatible data (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def config_from_dict(data: dict) -> ml_collections.ConfigDict:
    """Inverse of `config_to_dict` (lists stay lists; the models accept any sequence)."""
    return ml_collections.ConfigDict(data)


def metric_mode(name: str) -> str:
    """"min" for a loss (lower is better), else "max"."""
    return "min" if name.endswith("loss") else "max"


def best_options(config) -> tuple[str, str]:
    """(metric name, "min" | "max") that chooses the best checkpoint of a run."""
    name = str(config.train.best_metric)
    return name, metric_mode(name)


def _best_value(metrics: dict, name: str) -> float:
    value = metrics.get(name) if metrics else None
    if value is None or not math.isfinite(float(value)):
        return math.nan
    return float(value)


def make_manager(workdir: str | pathlib.Path, config, *, keep: int | None = None,
                 read_only: bool = False):
    """An Orbax CheckpointManager for `workdir/checkpoints`: the latest `keep` plus the best.

    The best is ranked on `config.train.best_metric` among checkpoints saved with validation
    metrics (`save(step, args=..., metrics=...)`).
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    name, mode = best_options(config)
    keep = int(config.train.keep_checkpoints if keep is None else keep)

    def metric(metrics):
        value = _best_value(metrics, name)
        if math.isnan(value):  # a failed evaluation ranks last
            return -math.inf if mode == "max" else math.inf
        return value

    # BestN keeps the highest after an ascending sort; reverse it when lower is better.
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=metric, reverse=(mode == "min"), n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=metric, best_mode=mode,
        keep_checkpoints_without_metrics=True, create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    from etils import epath

    if not read_only:  # a save without validation metrics is expected (a SIGTERM's, say)
        logging.getLogger("absl").addFilter(_NO_METRICS_NOTICE)
    # epath keeps a gs:// workdir a URL (pathlib would make it a local "gs:" folder).
    text = os.fspath(workdir)
    root = epath.Path(text if "://" in text else os.path.abspath(text))
    return ocp.CheckpointManager(root / CHECKPOINT_DIR, options=options, item_names=ITEMS)


def save_args(variables, train_state, meta: dict, config):
    """The Orbax Composite argument that saves one step's four items."""
    import orbax.checkpoint as ocp

    return ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        train_state=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(meta),
        config=ocp.args.JsonSave(config_to_dict(config)))


def training_items(state) -> tuple[dict, dict]:
    """(`variables`, `train_state`) items of a training state (params, batch_stats, opt_state,
    step), as one step folder holds them. With a moving average of the parameters
    (`train.ema_decay`), `variables` holds the average (what validation scored and what
    inference, export and `init_from` read) and `train_state` the optimizer's own parameters."""
    import numpy as np

    ema = state.ema_params
    variables = {"params": state.params if ema is None else ema}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    items = {"opt_state": state.opt_state, "step": np.asarray(state.step)}
    if ema is not None:
        items["params"] = state.params
    return variables, items


# The keys of a step's `meta` that hold `variables_digest` of its `variables` item and of its
# `train_state` item (the optimizer's moments and step: damaged, they would resume into NaNs).
DIGEST_KEY = "variables_sha256"
TRAIN_STATE_DIGEST_KEY = "train_state_sha256"


def variables_digest(variables) -> str:
    """SHA-256 over every array of `variables` (its tree path, dtype, shape and bytes), in path
    order: saved with each checkpoint and checked when it is loaded, since a storage fault that
    flips bytes inside an array file leaves a checkpoint that restores without any error."""
    import hashlib

    import jax
    import numpy as np

    def name(path) -> str:  # "params/Conv_0/kernel", independent of JAX's keystr format
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda item: name(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name(path)}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_digest(variables, meta: dict, where, key: str = DIGEST_KEY,
                 what: str = "the parameters") -> None:
    """Raise InputError when `meta` holds a digest under `key` and `variables` (any tree of
    arrays) do not match it (checkpoints saved before digests existed have none, and are not
    checked)."""
    saved = meta.get(key)
    if saved and variables_digest(variables) != saved:
        raise InputError(where, f"{what} do not match the checksum saved with them ({key}): the "
                                "checkpoint is corrupt")


def restore_training(manager, template, step: int) -> dict:
    """The items of checkpoint `step` restored into the structure of the training state
    `template` (host arrays); a step whose parameters fail their checksum raises."""
    import orbax.checkpoint as ocp

    variables, train_items = training_items(template)
    directory = os.fspath(manager.directory)
    if "://" not in directory:  # a damaged array file: one quiet error, not Orbax's tracebacks
        for item in ("variables", "train_state"):
            _check_readable(pathlib.Path(directory) / str(step) / item)
    items = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables),
        train_state=ocp.args.StandardRestore(train_items),
        meta=ocp.args.JsonRestore()))
    step_dir = pathlib.Path(os.fspath(manager.directory)) / str(step)
    meta = dict(items["meta"] or {})
    check_digest(items["variables"], meta, step_dir / "variables")
    check_digest(items["train_state"], meta, step_dir / "train_state", TRAIN_STATE_DIGEST_KEY,
                 "the optimizer state")
    return items


def load_state_if_possible(manager, template, where, is_main: bool = True):
    """(step, items) of the latest intact checkpoint in `where` (the manager's folder), restored
    into the structure of `template`; (None, None) for a fresh run. Damaged checkpoints are
    skipped (`cac_jax.train_support.restore_intact`) and every process must find the same step
    (`cac_jax.distributed.agree_on_step`)."""
    import functools

    from cac_jax import distributed as dist
    from cac_jax import train_support as support

    restored, items = support.restore_intact(
        manager, functools.partial(restore_training, manager, template), where, is_main)
    dist.agree_on_step(restored, where)
    return restored, items


def save_training(manager, step: int, state, meta: dict, metrics: dict | None, config) -> None:
    """Save the host training `state` as checkpoint `step` with its `meta` and, when evaluated,
    its finite validation `metrics` (what the manager ranks the best on)."""
    variables, train_items = training_items(state)
    meta = {**meta, DIGEST_KEY: variables_digest(variables),
            TRAIN_STATE_DIGEST_KEY: variables_digest(train_items)}
    clean = None
    if metrics:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(float(v))}
    manager.save(step, args=save_args(variables, train_items, meta, config), metrics=clean,
                 force=True)


def _is_step_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and path.name.isdigit() and path.parent.name == CHECKPOINT_DIR


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` holds a step folder (finalised or not) of a training run."""
    folder = pathlib.Path(workdir) / CHECKPOINT_DIR
    return folder.is_dir() and any(_is_step_folder(p) for p in folder.iterdir())


def _check_complete(step_dir: pathlib.Path) -> None:
    if not (step_dir / _FINALIZED_MARKER).exists():
        raise InputError(step_dir, "incomplete checkpoint (not finalised: the run was probably "
                                   "killed while writing it)")
    try:
        json.loads((step_dir / _FINALIZED_MARKER).read_text())
    except (OSError, ValueError) as err:
        raise InputError(step_dir / _FINALIZED_MARKER, f"corrupt checkpoint: unreadable step "
                                                       f"metadata ({err})") from None
    missing = [item for item in ("variables", "meta", "config") if not (step_dir / item).is_dir()]
    if missing:
        raise InputError(step_dir, f"incomplete checkpoint: missing item(s) {', '.join(missing)}")


def _read_json_item(step_dir: pathlib.Path, item: str) -> dict:
    """A JsonSave item: Orbax's JsonCheckpointHandler writes it as `ITEM/metadata`."""
    path = step_dir / item / "metadata"
    if not path.is_file():
        raise InputError(step_dir / item, "incomplete checkpoint: item has no data")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable checkpoint item: {err}") from None


class _DropNoMetricsNotice(logging.Filter):
    """Orbax warns on every save without metrics when checkpoints are ranked; a step saved
    between two evaluations (a SIGTERM's, the last step's) has none by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


_NO_METRICS_NOTICE = _DropNoMetricsNotice()  # one instance: adding it again is a no-op


class _DropReadOnlyNotices(logging.Filter):
    """Orbax warns that a read-only manager is read-only; for loading that is the point. It also
    logs an error for each step whose metadata file is not JSON while it lists the steps; the
    step that is loaded is checked by `_check_complete`, which says so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return ("read_only" not in message and "read only" not in message
                and "Failed to json parse Metadata file" not in message)


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    drop = _DropReadOnlyNotices()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(step folder, workdir) for a training workdir (its best, else latest step) or a step folder."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise InputError(path, "no such checkpoint or training workdir")
    if not path.is_dir():
        raise InputError(path, "not a training workdir or checkpoint folder (a file)")
    path = path.absolute()
    if _is_step_folder(path):
        return path, path.parent.parent
    if path.name.isdigit() or ".orbax-checkpoint-tmp" in path.name:
        if ".orbax-checkpoint-tmp" in path.name:
            raise InputError(path, "incomplete checkpoint (a temporary folder of an unfinished "
                                   "write)")
        raise InputError(path, f"a step folder must lie in a training workdir's "
                               f"{CHECKPOINT_DIR}/ folder")
    ckpt_dir = path / CHECKPOINT_DIR
    if not (path / CONFIG_FILE).is_file() or not ckpt_dir.is_dir():
        raise InputError(path, f"not a cac-jax training workdir (needs {CONFIG_FILE} and "
                               f"{CHECKPOINT_DIR}/)")
    try:
        config = config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
        with _quiet_absl():
            manager = make_manager(path, config, read_only=True)
    except (ValueError, KeyError, AttributeError) as err:
        raise InputError(path / CONFIG_FILE, f"unreadable training config: {err}") from None
    try:
        step = manager.best_step()
        if step is None:
            step = manager.latest_step()
    finally:
        manager.close()
    if step is None:
        raise InputError(path, "training workdir has no complete checkpoint yet")
    return ckpt_dir / str(step), path


def _check_readable(item_dir: pathlib.Path) -> None:
    """Raise InputError if any stored byte of a checkpoint item cannot be read.

    Orbax stores arrays in an OCDBT database (tensorstore) and reads them concurrently; when one
    read fails (a truncated, missing or damaged file), its event loop closes while the other
    reads are in flight, and each of those prints a traceback. Reading every stored array first
    with tensorstore, one at a time and synchronously (the variables are tens of MB), finds the
    damage with one error. An item not stored as OCDBT is left to the restore.
    """
    import tensorstore as ts

    if not (item_dir / "manifest.ocdbt").exists():
        return
    base = str(item_dir) if "://" in str(item_dir) else f"file://{item_dir.absolute()}"
    store = {"driver": "ocdbt", "base": base.rstrip("/") + "/"}
    drivers = {".zarray": "zarr", "zarr.json": "zarr3"}
    try:
        keys = ts.KvStore.open(store).result().list().result()
        for key in keys:
            name, _, leaf = key.decode().rpartition("/")
            if leaf in drivers:
                spec = {"driver": drivers[leaf], "kvstore": {**store, "path": name + "/"}}
                ts.open(spec, open=True).result().read().result()
    except ValueError as err:
        raise InputError(item_dir, f"corrupt checkpoint (a damaged or missing file): "
                                   f"{_first_clause(err)}") from None


def _first_clause(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, cut before tensorstore's JSON spec dump."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = text.split(" [tensorstore_spec=")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _check_stored_shapes(step_dir: pathlib.Path, abstract) -> None:
    """Raise InputError naming the first parameter whose stored shape differs from the model's.

    Compares the checkpoint's array metadata with the model's abstract variables before any array
    is read, so a mismatch is reported by parameter name (and Orbax never starts reads that would
    then fail). Metadata that cannot be read is left to the restore, which reports it.

    The metadata is read with the item's own handler: `Checkpointer.metadata` would also look for
    the step-level `_CHECKPOINT_METADATA` file inside the item folder (it lies one level up, in
    the step folder) and log a warning on every load.
    """
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    handler = ocp.StandardCheckpointHandler()
    try:
        meta = handler.metadata(epath.Path(step_dir) / "variables")
    except (FileNotFoundError, ValueError, KeyError):
        return  # restore() raises the same error with its message
    finally:
        handler.close()
    item = getattr(meta, "item_metadata", meta)
    stored = dict(jax.tree_util.tree_flatten_with_path(getattr(item, "tree", item))[0])
    expected = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    for key, want in expected.items():
        name = jax.tree_util.keystr(key)
        if key not in stored:
            raise InputError(step_dir, f"checkpoint does not match its config's model: {name} "
                                       "is missing from the stored variables")
        have = tuple(getattr(stored[key], "shape", ()) or ())
        if have != tuple(want.shape):
            raise InputError(step_dir, f"checkpoint does not match its config's model: {name} "
                                       f"is stored as {have}, the model needs {tuple(want.shape)}")


def load_trained(path: str | pathlib.Path) -> TrainedModel:
    """Restore the model of a training workdir (best, else latest checkpoint) or of a step folder.

    Parameters are restored by Orbax into abstract shapes (`jax.eval_shape(model.init, ...)`) on
    this process's first device, so a GPU-trained checkpoint loads on a CPU-only machine. Raises
    `InputError` naming the path for anything that is not a complete cac-jax checkpoint.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from cac_jax.models import build_model
    from data_pipeline.labels import DEFAULT_NEIGHBOUR_MM

    step_dir, workdir = resolve_checkpoint(path)
    _check_complete(step_dir)
    meta = _read_json_item(step_dir, "meta")
    try:
        config = config_from_dict(_read_json_item(step_dir, "config"))
        model = build_model(config)
        task = str(config.task)
        num_classes = int(config.model.num_classes)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise InputError(step_dir / "config", f"checkpoint config does not build a model: "
                                              f"{err}") from None
    size = int(config.data.get("crop_size", 0) or config.data.image_size)
    sample = jax.ShapeDtypeStruct((1, 3, size, size, 1), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), sample)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    _check_readable(step_dir / "variables")
    _check_stored_shapes(step_dir, abstract)
    checkpointer = ocp.StandardCheckpointer()
    try:
        variables = checkpointer.restore(step_dir / "variables", abstract)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise InputError(step_dir, f"checkpoint cannot be restored (corrupt, or it does not "
                                   f"match its config's model): {_first_clause(err)}") from None
    finally:
        checkpointer.close()
    check_digest(variables, meta, step_dir / "variables")
    spacing = meta.get("pixel_spacing_mm") or {}
    neighbour = config.data.get("neighbour_mm", None)
    return TrainedModel(
        config=config, model=model, variables=dict(variables), step=int(meta["step"]),
        path=step_dir, workdir=workdir, task=task, num_classes=num_classes,
        pixel_spacing_mm=dict(spacing),
        neighbour_mm=float(DEFAULT_NEIGHBOUR_MM if neighbour is None else neighbour),
        metrics=dict(meta.get("metrics") or {}),
        heart_volume_ml=dict(meta.get("heart_volume_ml") or {}))


# Items of a step folder that inference reads; `train_state` (optimizer state) is left out of an
# exported model.
EXPORTED_ITEMS = ("variables", "meta", "config", "metrics")


def export_parameters(source: str | pathlib.Path, out: str | pathlib.Path, *,
                      overwrite: bool = False) -> pathlib.Path:
    """Copy the model of a training workdir (its best step, else latest) or of a step folder into
    a new workdir `out` holding that one step without its optimizer state.

    `out` loads with `load_trained` (and `cac-jax infer --heart-checkpoint/--calcium-checkpoint`)
    exactly as the source does. The copy is assembled in a temporary folder beside `out`, loaded
    back and compared with the source's variables, then renamed into place, so a failed export
    leaves no partial model. Returns `out`'s step folder.
    """
    import shutil

    import jax
    import numpy as np

    step_dir, _ = resolve_checkpoint(source)
    _check_complete(step_dir)
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        step_out = tmp / CHECKPOINT_DIR / step_dir.name
        step_out.mkdir(parents=True)
        for item in EXPORTED_ITEMS:
            if (step_dir / item).is_dir():
                shutil.copytree(step_dir / item, step_out / item)
        (tmp / CONFIG_FILE).write_text(json.dumps(_read_json_item(step_dir, "config"), indent=2)
                                       + "\n")
        # The finalisation marker last: until it exists the folder does not read as a checkpoint.
        shutil.copy2(step_dir / _FINALIZED_MARKER, step_out / _FINALIZED_MARKER)
        original, copy = load_trained(step_dir), load_trained(tmp)
        for a, b in zip(jax.tree.leaves(original.variables), jax.tree.leaves(copy.variables),
                        strict=True):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise InputError(tmp, "exported variables differ from the source's")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:
        raise InputError(out, f"cannot write the exported model: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / CHECKPOINT_DIR / step_dir.name


def check_init_source(path: str | pathlib.Path) -> pathlib.Path:
    """`train.init_from` as a step folder to load, or an `InputError` naming it: a folder on this
    machine that holds a trained model."""
    if "://" in str(path):
        raise InputError(path, "train.init_from must be a folder on this machine (copy the model "
                               "out of the bucket first)")
    return resolve_checkpoint(path)[0]


def warm_start_variables(path: str | pathlib.Path, variables: dict, config) -> tuple[dict, dict]:
    """The variables of the trained model at `path` (`check_init_source`'s step folder) in place
    of a fresh model's `variables`, and a record of where they came from (`train.init_from`:
    fine-tuning, docs/training.md).

    The source must be a model of the same task, architecture and widths: every parameter and
    BatchNorm statistic of `variables` must be in it with the same shape and nothing else, or
    an `InputError` names the first difference. The optimizer state, step, plateau and
    early-stopping state are not taken: the run starts at step 0 with its own schedule.
    """
    import jax
    import numpy as np

    source = load_trained(path)
    if source.task != str(config.task):
        raise InputError(source.path, f"train.init_from: a {source.task} model cannot start a "
                                      f"{config.task} training")
    arch = str(source.config.model.get("arch", ""))
    if arch != str(config.model.arch):
        raise InputError(source.path, f"train.init_from: a {arch} model cannot start a "
                                      f"{config.model.arch} training")
    want = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(source.variables)[0])
    for key, leaf in want.items():
        name = jax.tree_util.keystr(key)
        if key not in have:
            raise InputError(source.path, f"train.init_from: {name} of this training's model is "
                                          f"not in the checkpoint (another model config)")
        if tuple(np.shape(have[key])) != tuple(np.shape(leaf)):
            raise InputError(source.path, f"train.init_from: {name} is {tuple(np.shape(have[key]))}"
                                          f" in the checkpoint, this training's model needs "
                                          f"{tuple(np.shape(leaf))} (another model config)")
    extra = sorted(jax.tree_util.keystr(k) for k in have if k not in want)
    if extra:
        raise InputError(source.path, f"train.init_from: the checkpoint has {extra[0]}, which this "
                                      f"training's model lacks (another model config)")
    restored = jax.tree.map(lambda fresh, old: np.asarray(old, dtype=np.asarray(fresh).dtype),
                            variables, {k: source.variables[k] for k in variables})
    record = {"path": str(source.workdir), "step": source.step,
              "metrics": {k: v for k, v in source.metrics.items() if isinstance(v, int | float)}}
    return restored, record
