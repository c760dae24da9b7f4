"""Base experiment configuration shared by every file in configs/.

`get_base_config(task, arch, local)` returns an ml_collections ConfigDict with
- `task`: "calcium" (3 classes: background, coronary, non-coronary calcium) or "heart" (2 classes);
- `seed`: the experiment's random seed;
- `data`: `data_pipeline.config.data_config(task, local)` (sizes, sampling, augmentation);
- `model`: `cac_jax.models.config.model_config(arch, task, local)` (architecture, dtype, norm);
- `train`: `train_config(task, arch, local)` (steps, batch, focal loss, optimiser, plateau schedule,
  early stopping, evaluation, checkpoints, multi-host), read by `cac_jax.train`. `local=True` is
the tiny 64 px variant that tests and smoke runs use (big_vision's `:runlocal`);
`parse_config_arg(arg)` turns the config-file argument (`--config file.py:ARG`) into that flag.

The files of configs/ sit next to the package (`CONFIG_DIR`) in a checkout and in an installed
wheel alike (pyproject.toml ships configs/ beside cac_jax); `resolve_config_path` reads
`configs/NAME.py` from there when the working directory has no such file, so `--config
configs/NAME.py` works outside a checkout.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from cac_jax.models.config import model_config
from data_pipeline.config import data_config

# The config-file arguments every file in configs/ accepts: none ("file.py" or "file.py:") for the
# full configuration, "local" ("file.py:local") for the tiny 64 px variant.
CONFIG_ARGS = (None, "", "local")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse_config_arg(arg: str | None) -> bool:
    """Return True for "local", False for None or ""; raise ValueError for any other argument.

    Unknown arguments are rejected instead of silently giving the full 512 px configuration (a
    typo such as "runlocal" must not start a full-size run).
    """
    if arg not in CONFIG_ARGS:
        raise ValueError(
            f"unknown config argument {arg!r}: expected None or '' (full config) or 'local' "
            "(tiny 64 px variant)"
        )
    return arg == "local"


def _split_arg(path) -> tuple[str, str | None]:
    """("file.py", "arg") from "file.py:arg"; (path, None) when it has no ":arg" suffix."""
    text = str(path)
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py"):
        return head, tail
    return text, None


def resolve_config_path(path) -> str:
    """`path` (which may end in ":arg") as given when its file exists; for a relative
    `configs/NAME.py` that does not, the copy in `CONFIG_DIR` (the installed configs/).

    A path found in neither place comes back unchanged, so the loader's error names it as given.
    """
    text, arg = _split_arg(path)
    file = Path(text)
    if file.exists() or file.is_absolute() or file.parts[:1] != ("configs",):
        return str(path)
    shipped = CONFIG_DIR.joinpath(*file.parts[1:])
    if not shipped.is_file():
        return str(path)
    return str(shipped) if arg is None else f"{shipped}:{arg}"


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """The ConfigDict that `get_config(arg)` of the experiment file at `path` returns (a file in
    configs/, loaded by path as `--config path.py:arg` does; `path` may end in ":arg";
    `resolve_config_path` finds `configs/NAME.py` outside a checkout)."""
    import importlib.util

    text, suffix = _split_arg(resolve_config_path(path))
    if suffix is not None:
        arg = suffix
    file = Path(text)
    spec = importlib.util.spec_from_file_location(f"cac_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def get_base_config(task: str, arch: str, local: bool = False) -> ml_collections.ConfigDict:
    """Combine the data and model settings for `task` and `arch` into one ConfigDict."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = 0
    config.data = data_config(task, local)
    config.model = model_config(arch, task, local)
    config.train = train_config(task, arch, local)
    return config


# The rule that ends a run early (docs/training.md "Early stopping"): it decides when a run stops,
# not what a step computes, so a run may be continued under another.
STOP_KEYS = ("train.early_stop_patience", "train.early_stop_metric", "train.early_stop_min_delta")

# Keys added to the configs after runs were made, with the value a config without one had: a saved
# config (cac_jax.train) or a stamped one (the demo and the study) that lacks a key reads as this.
ADDED_KEYS = {"train.anneal_fraction": 0.0, "train.early_stop_min_delta": 0.0,
              "train.early_stop_metric": "",
              "data.augment.noise_std_max": 0.0, "data.augment.blur_sigma": 0.0,
              "data.augment.sharpen": 0.0, "data.augment.sharpen_sigma": 1.0,
              "data.augment.kvp_contrast": 0.0, "data.eval_slices": "all",
              "train.init_from": "", "train.ema_decay": 0.0}


def train_config(task: str, arch: str, local: bool = False) -> ml_collections.ConfigDict:
    """Training settings (`config.train`); counts of steps are global steps (all hosts agree)."""
    t = ml_collections.ConfigDict()
    # Global steps and batch (all devices of all hosts); the per-device batch is batch_size /
    # device count (config.data.per_device_batch is set from it). Larger `steps` on the same
    # workdir continues a run.
    t.steps = 40 if local else 20000
    t.batch_size = 8 if local else 16
    t.log_every = 5 if local else 50
    t.eval_every = 20 if local else 500
    t.checkpoint_every = 20 if local else 500
    t.keep_checkpoints = 3  # the latest K, plus the best (by best_metric)
    # "val_loss" (lower is better) or any other logged validation metric (higher is better):
    # the calcium model is chosen on the per-scan Agatston category kappa the paper reports, the
    # heart model on its Dice.
    t.best_metric = "val_kappa" if task == "calcium" else "val_dice_mean"
    t.num_devices = 0  # local devices to use (0: all); single-process runs only

    # Paper: Adam, learning rate 1e-3, reduced when the validation loss plateaus.
    t.learning_rate = 1e-3
    # Fine-tuning: "" starts from the seeded initialisation; a trained model of the same task and
    # model config (a training workdir, an exported model such as models/synthetic/..., or a step
    # folder) starts from its parameters, with a fresh optimizer, step 0 and this config's
    # schedule. Ignored when the run resumes from its own checkpoint.
    t.init_from = ""
    # > 0: keep an exponential moving average of the parameters (Polyak averaging; 0.999 averages
    # over about the last 1000 steps). Validation scores the average, so the best checkpoint is
    # picked on a model that does not swing with each step's batch, and checkpoints hand it to
    # inference, export and init_from (docs/training.md, "Parameter averaging").
    t.ema_decay = 0.0
    t.weight_decay = 0.0  # > 0: decoupled weight decay (AdamW)
    t.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
    # optax.contrib.reduce_on_plateau, stepped once per evaluation on the validation loss.
    t.plateau_factor = 0.5
    t.plateau_patience = 3  # evaluations without improvement before the rate is cut
    t.plateau_rtol = 1e-4
    t.plateau_cooldown = 0
    t.plateau_min_scale = 1e-3
    # > 0: the rate falls linearly to 0 over this last fraction of the run's budget (`steps`, or
    # `max_seconds` when that ends the run first; `train.anneal_factor`). 0: the paper's constant
    # rate (with the plateau cuts). A time-boxed run then depends on the machine's speed.
    t.anneal_fraction = 0.0
    # Early stopping: stop after this many evaluations without a better early_stop_metric (0:
    # never); "" stops on best_metric. "val_loss" stops when the loss the plateau schedule follows
    # has converged, whatever a noisy best_metric does meanwhile (the best checkpoint is still
    # chosen on best_metric).
    t.early_stop_patience = 10
    t.early_stop_metric = ""
    # An evaluation counts as better for early stopping only when it beats the value that last
    # reset the patience by more than this (absolute; 0: any improvement). The best checkpoint is
    # still the best value, however small the gain.
    t.early_stop_min_delta = 0.0

    # Focal loss (Lin et al. 2017): gamma 2 is their default; alpha per class. Calcium: background,
    # coronary, non-coronary. A small background alpha keeps the rare coronary class (about 1
    # candidate pixel in 100) from being drowned; with the candidate weighting and the
    # coronary-centred crops below, the calcium model starts calling coronary calcium within
    # minutes on a CPU. The non-coronary alpha sets the operating point between the two calcium
    # classes: at 0.05 a pixel is worth calling coronary from about a 5% chance on, which in
    # low-dose CTAC calls the noise coronary. The ConvLSTM takes 0.5, the UNet (fewer steps in a
    # CPU time box) 0.05: the values that worked best per architecture in the recipe probes
    # (docs/training_notes.md).
    t.focal_gamma = 2.0
    if task != "calcium":
        t.focal_alpha = (0.25, 1.0)
    else:
        t.focal_alpha = (0.1, 1.0, 0.5) if arch == "convlstm" else (0.1, 1.0, 0.05)
    # ConvLSTM only: weight of the auxiliary focal losses on the temporal and spatial branch
    # logits (hierarchical multi-scale attention trains its branches so; Tao et al. 2020).
    t.aux_loss_weight = 0.4 if arch == "convlstm" else 0.0
    # Calcium task: loss weight of pixels whose centre-slice HU is below 130 (the scorer never
    # keeps them; 1.0: every pixel equal, as the paper). `train.loss_weight` applies it.
    t.non_candidate_weight = 0.02 if task == "calcium" else 1.0

    t.progress = True  # tqdm progress bar on process 0
    # > 0: end this run (evaluate, checkpoint) after this many seconds of training; the same
    # command continues it later (time-boxed runs, e.g. the demo).
    t.max_seconds = 0.0

    # Multi-host: jax.distributed.initialize(). "auto": from the environment on SLURM (more than
    # one task) and TPU pods, else single process; "off": never; "explicit": the fields below.
    t.distributed = ml_collections.ConfigDict()
    t.distributed.mode = "auto"
    t.distributed.coordinator_address = ""
    t.distributed.num_processes = 1
    t.distributed.process_id = 0
    return t
