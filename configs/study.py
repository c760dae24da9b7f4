"""`cac-jax study --config configs/study.py --out study_out` (docs/study.md).

The paper's experiment on a multi-site synthetic cohort: heart and calcium models of the
ConvLSTM-attention network and of a UNet, trained until validation stops improving, scored on
held-out patients of the training sites and on a site never trained on, judged by the linearly
weighted kappa of the four CAC categories against the naive 130 HU threshold.

Arguments (`--config configs/study.py:ARG`):
- none: the CPU study (256 px cohort; the ConvLSTM at half the configs' widths and the UNet
  width-matched to it; sized for hours on 2 cores, resumable);
- "gpu": the GPU variant (full-width ConvLSTM and UNet-64, a larger cohort, larger batches);
- "local": a tiny version of the whole path for tests (minutes on a CPU, numbers meaningless);
- "grooved", alone or after one of the others ("gpu,grooved", "local,grooved"): every cohort with
  the generator's grooved anatomy (epicardial fat deep in the grooves, coronaries on the groove
  floors, metal devices; docs/synthetic_cohort.md) instead of the classic one.
- "mixed", alone or after one of the others: every site's cohorts in both anatomies (the classic
  ones under their usual names, the grooved ones with a "_grooved" suffix), trained on together
  and held out together, so the models see two heart anatomies. On the CPU its calcium models
  (the ConvLSTM and the width-matched UNet) are fine-tuned from the reference ones
  (models/synthetic/calcium_*, the classic study's; `train.init_from`) at half the rate: trained
  from scratch on twice the classic study's data the ConvLSTM had not converged after 6450 steps,
  about 5 h on 2 cores (docs/study.md). The committed calcium models are these fine-tunes, so a
  rerun now starts from them; to repeat the recorded runs, first put the classic models back:
  `git checkout 0c9aa67 -- models/synthetic/calcium_convlstm` and `git checkout db87d00 --
  models/synthetic/calcium_unet` (after removing each folder).
- "calibrated", after any of the above or alone ("calibrated", "gpu,calibrated",
  "mixed,calibrated"): every CTAC scan with the generator's calibrated CTAC imaging
  (`cac-jax synth --ctac-imaging calibrated`: a reconstruction window of 0.3-1.0 of the cardiac
  cycle and half the classic CTAC noise; docs/synthetic_cohort.md). The same patients and gated
  scans; the cohorts get their own stamps, so a study folder is never half one, half the other.
  On the CPU its calcium models are fine-tuned from the reference ones at half the rate, as
  `:mixed` does: the patients are the same, only their CTAC scans show more.

Models are trained from the files in configs/ with `--config.KEY=VALUE` overrides, exactly as a user
would run `cac-jax train`; `trainings` names each workdir under OUT/models/, `systems` pairs a heart
model with a calcium model for `cac-jax infer`. `convlstm_slice` is the ablation: the same ConvLSTM
calcium model on whole slices at the scan's own spacing (the paper's set-up) instead of the heart
frame, scored with the same heart model on the same patients.
"""

from __future__ import annotations

import ml_collections

ARGS = (None, "", "gpu", "local")
MODIFIERS = ("grooved", "mixed")
CTAC_MODIFIERS = ("calibrated",)

HALF_WIDTH_CONVLSTM = (
    "model.convlstm.encoder_widths=(16, 32, 64, 128)",
    "model.convlstm.lstm_features=(32, 64)",
    "model.convlstm.decoder_widths=(16, 32, 64)",
    "model.convlstm.temporal_decoder_widths=(16, 32, 64)",
    "model.convlstm.attention_width=16",
)
MATCHED_UNET = ("model.unet.base_width=12",)
# Scanner variety for the calcium models (docs/training.md, "Scanner augmentation"): kernels from
# a Gaussian of up to 1.5 mm more blur to edge enhancement, noise up to ~50 HU on top of the
# scan's own, and +-15% calcium contrast (another tube voltage). Judged by the `fixedkernel`
# ablation, the same model trained without it.
SCANNER_AUGMENT = (
    "data.augment.noise_std_max=0.025",
    "data.augment.blur_sigma=1.5",
    "data.augment.sharpen=0.5",
    "data.augment.sharpen_sigma=1.0",
    "data.augment.kvp_contrast=0.15",
)


def _training(config_file: str, *overrides: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"config": config_file, "overrides": list(overrides)})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The study settings; see the module docstring for `arg`."""
    parts = [p for p in (arg or "").split(",") if p]
    modifiers = [p for p in parts if p in MODIFIERS]
    ctac = [p for p in parts if p in CTAC_MODIFIERS]
    base = [p for p in parts if p not in MODIFIERS + CTAC_MODIFIERS]
    if (len(base) > 1 or (base and base[0] not in ARGS) or len(modifiers) > 1
            or len(ctac) > 1):
        raise ValueError(f"unknown study config argument {arg!r}: expected none, 'gpu' or 'local', "
                         f"optionally with ',grooved' or ',mixed', and ',calibrated'")
    gpu, local = base == ["gpu"], base == ["local"]
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Cohort: in-plane matrix of every synthetic scan (the field of view is the protocol's).
    c.size = 64 if local else (512 if gpu else 256)
    # Sites trained on (data_pipeline.phantom.sites), and the one held out entirely.
    c.train_sites = ("default", "lowdose") if local else ("default", "lowdose", "sharp")
    c.unseen_site = "site2"
    # Patients per training site for training + validation, the validation share of them (by
    # patient), held-out test patients per training site (other seeds: never ingested), and
    # patients of the unseen site. Every patient has a gated CAC and a CTAC scan.
    c.train_patients_per_site = 4 if local else (200 if gpu else 80)
    c.validation_fraction = 0.25 if local else 0.15
    c.test_patients_per_site = 2 if local else (60 if gpu else 30)
    c.unseen_patients = 3 if local else (80 if gpu else 40)
    c.synth_workers = 2  # processes of `cac-jax synth` and `cac-jax ingest`
    # Anatomy variants of the cohorts (data_pipeline.phantom: "classic", "grooved" for
    # groove-dependent epicardial fat and metal devices; docs/synthetic_cohort.md): each site's
    # cohorts are made in every one, the first under the plain names.
    c.anatomies = {"grooved": ("grooved",), "mixed": ("classic", "grooved")}.get(
        modifiers[0] if modifiers else "", ("classic",))
    # The CTAC imaging model of every cohort (data_pipeline.phantom.acquisition.CTAC_IMAGING).
    c.ctac_imaging = ctac[0] if ctac else "classic"

    heart_common = ["train.log_every=25", "train.progress=True"]
    heart_steps = 8 if local else (6000 if gpu else 4000)
    calcium_steps = 8 if local else 12000
    eval_every = 4 if local else (500 if gpu else 250)
    # Convergence, not a time box: training stops when validation has not improved for
    # early_stop_patience evaluations (the plateau halves the rate after plateau_patience).
    # The heart models: Dice creeps up by thousandths for thousands of steps, and each validation
    # pass segments every slice of the validation scans (minutes on CPU). Gains under 0.002 do not
    # reset the patience (the best checkpoint is still the best Dice).
    heart_every = 4 if local else 500
    heart = [*heart_common, f"train.steps={heart_steps}", f"train.eval_every={heart_every}",
             f"train.checkpoint_every={heart_every}", "train.early_stop_patience=4",
             "train.early_stop_min_delta=0.002",
             f"train.batch_size={16 if gpu else 4}",
             f"data.image_size={64 if local else c.size}"]
    # The calcium model in the heart frame: a 192 mm window at 1.0 mm centred on the heart,
    # trained on 96 px crops centred near coronary calcium (docs/heart_frame.md).
    frame = 64 if local else 192
    # The calcium models stop when their validation loss (the one the plateau schedule follows)
    # has converged: their validation kappa, on 36 scans per protocol, swings by 0.3 between
    # neighbouring checkpoints, and stopping on it ended a run while the loss was still falling
    # and the rate had never been cut (docs/study.md). The best checkpoint is the best kappa in
    # the paper's design (gated scans against their reference, CTAC scans against the same
    # patient's gated reference): ranked on the CTAC scans' own truth, the grooved study kept a
    # step-5250 checkpoint whose last one scored CTAC against gated far better on held-out and
    # foreign scans (docs/study.md).
    converge = ["train.early_stop_patience=8", "train.early_stop_metric=val_loss",
                "train.best_metric=val_kappa_paired"]
    # Validation runs the calcium models only on the slices within 3 mm of the reference heart,
    # where the scorer counts calcium: the same categories as every slice, in 1.7x less time
    # (benchmarks/results/bench_validation/), and a validation pass costs several times the
    # training between two of them.
    calcium = [*heart_common, f"train.steps={calcium_steps}", f"train.eval_every={eval_every}",
               f"train.checkpoint_every={eval_every}", *converge,
               f"train.batch_size={32 if gpu else 16}",
               f"data.image_size={64 if local else c.size}",
               "data.calcium_frame=heart", "data.frame_spacing_mm=1.0",
               f"data.frame_size={frame}", f"data.crop_size={frame // 2}",
               "data.frame_jitter_mm=10.0", "data.eval_slices=heart"]
    fixed_kernel = list(calcium)
    calcium = [*calcium, *SCANNER_AUGMENT]
    # The whole-slice ablation validates on the same slices.
    calcium_slice = [*heart_common, f"train.steps={calcium_steps}",
                     f"train.eval_every={eval_every}", f"train.checkpoint_every={eval_every}",
                     *converge, f"train.batch_size={32 if gpu else 16}",
                     f"data.image_size={64 if local else c.size}", "data.calcium_frame=slice",
                     "data.eval_slices=heart", *SCANNER_AUGMENT]
    suffix = ":local" if local else ""
    convlstm = () if (local or gpu) else HALF_WIDTH_CONVLSTM
    unet_file = "configs/unet_calcium.py" if gpu else "configs/unet_matched_calcium.py"
    # Both CPU UNets are width-matched to the half-width ConvLSTM (base 12: the same parameters).
    matched_unet = () if (local or gpu) else MATCHED_UNET
    # The same loss for both calcium models, as the paper trains them: the UNet's configs default
    # to a non-coronary alpha of 0.05 (tuned for the demo's two-minute boxes, where with more
    # weight it had not yet called a coronary pixel). In the study's first UNet runs with 0.05 the
    # validation CTAC agreement stayed at 17-22% exact (kappa 0.00-0.12) over 1750 steps, so the
    # study trains it with the ConvLSTM's (docs/study.md).
    same_loss = () if local else ("train.focal_alpha=(0.1,1.0,0.5)",)
    c.trainings = ml_collections.ConfigDict({
        "heart_convlstm": _training(f"configs/convlstm_heart.py{suffix}", *convlstm, *heart),
        "calcium_convlstm": _training(f"configs/convlstm_calcium.py{suffix}", *convlstm,
                                      *calcium),
        "heart_unet": _training(f"configs/unet_heart.py{suffix}", *matched_unet, *heart),
        "calcium_unet": _training(f"{unet_file}{suffix}", *matched_unet, *calcium, *same_loss),
        "calcium_convlstm_slice": _training(f"configs/convlstm_calcium.py{suffix}", *convlstm,
                                            *calcium_slice),
        "calcium_convlstm_fixedkernel": _training(f"configs/convlstm_calcium.py{suffix}",
                                                  *convlstm, *fixed_kernel),
    })
    # System name -> (heart training, calcium training). The first two are compared by the
    # z-test; the others are ablations of the ConvLSTM's calcium model.
    c.systems = ml_collections.ConfigDict({
        "convlstm": ("heart_convlstm", "calcium_convlstm"),
        "unet": ("heart_unet", "calcium_unet"),
        "convlstm_slice": ("heart_convlstm", "calcium_convlstm_slice"),
        "convlstm_fixedkernel": ("heart_convlstm", "calcium_convlstm_fixedkernel"),
    })
    if (modifiers == ["mixed"] or ctac) and not (local or gpu):
        for name in ("calcium_convlstm", "calcium_unet"):
            c.trainings[name].overrides.extend(
                [f"train.init_from=models/synthetic/{name}", "train.learning_rate=5e-4"])
    c.compare = ("convlstm", "unet")
    # Ablation name -> (system, the variant z-tested against it): the heart frame against whole
    # slices; the scanner augmentation against the scans' own kernels only.
    c.ablations = ml_collections.ConfigDict({
        "frame": ("convlstm", "convlstm_slice"),
        "scanner": ("convlstm", "convlstm_fixedkernel"),
    })
    # The timing study (`cac-jax bench`): samples of 16 slices at this size per model.
    c.bench_models = "convlstm,unet64" if gpu else "convlstm,unet_matched"
    c.bench_samples = 3 if local else (64 if gpu else 8)
    c.bench_size = 64 if local else 512
    c.bench_local = local
    # `cac-jax infer --min-heart-ml`: None keeps its default; the tiny models of ":local" find
    # hearts far smaller than a real one, which infer would otherwise report as errors.
    c.min_heart_ml = 0.0 if local else None
    return c
