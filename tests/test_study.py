"""`cac-jax study`: its configs make valid training runs, and the whole path runs (slow)."""

from __future__ import annotations

import json
import pathlib

import pytest

from cac_jax import cli
from cac_jax.config_defaults import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study.py"


@pytest.mark.parametrize("arg", [None, "gpu", "local"])
def test_every_training_of_the_study_parses_as_cac_jax_train_would(arg, tmp_path):
    """Each training's config file and overrides parse with `cac-jax train`'s parser and pass its
    checks; calcium trainings are heart-frame models except the ablation's."""
    from cac_jax import study
    from cac_jax.main import parse_flags
    from cac_jax.train import check_config

    config = load_config_file(STUDY, arg)
    assert set(config.systems) == {"convlstm", "unet", "convlstm_slice", "convlstm_fixedkernel"}
    for system, variant in config.ablations.values():
        assert system in config.systems and variant in config.systems
    for name, spec in config.trainings.items():
        path, relative = study._config_file(spec.config)
        argv = ["--config", path, "--workdir", str(tmp_path / name),
                *(f"--config.{item}" for item in spec.overrides)]
        parsed, _ = parse_flags(argv)
        check_config(parsed)
        assert parsed.task == name.split("_")[0]
        if parsed.task == "calcium":
            frame = "slice" if name.endswith("_slice") else "heart"
            assert parsed.data.calcium_frame == frame, name
            # Scanner augmentation everywhere but in its own ablation.
            varied = parsed.data.augment.blur_sigma > 0 and parsed.data.augment.kvp_contrast > 0
            assert varied == (not name.endswith("_fixedkernel")), name
            # Validated only on the slices the scorer counts (the same categories, a shorter pass).
            assert parsed.data.eval_slices == "heart", name
        if arg != "local":
            assert parsed.train.max_seconds == 0  # convergence, not a time box
            assert parsed.train.early_stop_patience > 0
            # The calcium models stop on their converged loss, the heart models on their Dice.
            stop = "val_loss" if parsed.task == "calcium" else ""
            assert parsed.train.early_stop_metric == stop, name
            # The calcium models' best checkpoint is the best kappa in the paper's CTAC design.
            best = "val_kappa_paired" if parsed.task == "calcium" else "val_dice_mean"
            assert parsed.train.best_metric == best, name
    for heart, calcium in config.systems.values():
        assert heart in config.trainings and calcium in config.trainings


def test_a_training_is_continued_when_only_its_length_or_stop_rule_changed(tmp_path):
    from cac_jax import stages, study

    stamps = stages._Stamps(tmp_path)
    stamped = {"config": "configs/x.py", "dataset": {"scans": 3}, "defaults": {"train": {}},
               "overrides": ["seed=0", "train.steps=100", "train.early_stop_patience=8"]}
    stamps.mark("train_x", stamped)

    def changed(*overrides):
        return {**stamped, "overrides": ["seed=0", *overrides]}

    keys = study.continue_keys()
    assert stamps.continues("train_x", changed("train.steps=200", "train.early_stop_patience=8",
                                               "train.early_stop_metric=val_loss"), keys)
    assert stamps.continues("train_x", changed("train.steps=100"), keys)
    assert not stamps.continues("train_x", changed("train.steps=100", "train.early_stop_patience=8",
                                                   "train.learning_rate=0.01"), keys)
    assert not stamps.continues("train_x", {**stamped, "dataset": {"scans": 4}}, keys)
    assert not stamps.continues("train_y", stamped, keys)  # nothing stamped


def test_unknown_stage_or_training_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["study", "--out", str(tmp_path / "s"), "--stages", "train,fly"]) == 2
    assert "unknown stage(s) fly" in capsys.readouterr().err
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(tmp_path / "s"),
                     "--only", "heart_lstm"]) == 2
    assert "--only names no training heart_lstm" in capsys.readouterr().err
    assert cli.main(["study", "--config", str(tmp_path / "none.py"), "--out",
                     str(tmp_path / "s")]) == 2
    assert "no such study config file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_local_study_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    # The commands run as subprocesses on one CPU device (the suite's 8 would not divide the
    # tiny batches).
    monkeypatch.setenv("XLA_FLAGS", "")
    out = tmp_path / "study"
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for cohort in ("test", "unseen"):
        for model in ("convlstm", "unet", "convlstm_slice", "convlstm_fixedkernel", "naive"):
            assert summary[cohort][model]["cac"]["n"] >= 2
        for ablation in ("ablation_frame", "ablation_scanner"):
            assert set(summary[cohort][ablation]) == {"cac", "ctac"}
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "concordance_cac.png" in report
    assert len(summary["targets"]) == 9
    assert any("gated reference" in t["target"] for t in summary["targets"])
    for name in ("heart_convlstm", "calcium_convlstm", "heart_unet", "calcium_unet",
                 "calcium_convlstm_slice", "calcium_convlstm_fixedkernel"):
        card = (out / "reference" / name / "MODEL.md").read_text()
        assert "not for clinical use" in card and "## The study's results" in card
    before = (out / "models" / "calcium_convlstm" / "summary.json").stat().st_mtime
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(out)]) == 0
    assert (out / "models" / "calcium_convlstm" / "summary.json").stat().st_mtime == before


def _saved_run(workdir: pathlib.Path, config_file: str, step: int) -> None:
    """A workdir as `cac-jax train` leaves it: one checkpoint with validation metrics and
    summary.json (random weights: the export and the card do not look at their values)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cac_jax import checkpoints as ckpt
    from cac_jax.models import build_model

    config = load_config_file(str(ROOT / "configs" / config_file), "local")
    abstract = jax.eval_shape(build_model(config).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 3, 32, 32, 1), jnp.float32))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), abstract)
    workdir.mkdir(parents=True)
    (workdir / ckpt.CONFIG_FILE).write_text(json.dumps(ckpt.config_to_dict(config)))
    metric = ckpt.best_options(config)[0]
    manager = ckpt.make_manager(workdir, config)
    manager.save(step, args=ckpt.save_args(variables, {"step": np.asarray(step)},
                                           {"step": step, "metrics": {metric: 0.5}}, config),
                 metrics={metric: 0.5}, force=True)
    manager.wait_until_finished()
    manager.close()
    (workdir / "summary.json").write_text(json.dumps({
        "steps": step + 100, "best_step": step, "best_metric": metric, "best_value": 0.5,
        "stopped_early": True, "wall_time_s": 600.0}))


def test_export_stage_writes_loadable_models_with_cards(tmp_path):
    from cac_jax import study
    from cac_jax.checkpoints import load_trained

    config = load_config_file(str(STUDY), "local")
    out = tmp_path / "study"
    _saved_run(out / "models" / "heart_convlstm", "convlstm_heart.py", 30)
    _saved_run(out / "models" / "calcium_convlstm", "convlstm_calcium.py", 40)
    systems = {"convlstm": ("heart_convlstm", "calcium_convlstm")}
    cell = {"kappa_linear": 0.9, "kappa_linear_ci95": [0.8, 1.0], "exact_agreement": 0.9,
            "n": 7}
    summary = {cohort: {m: {p: dict(cell) for p in study.PROTOCOLS}
                        for m in ("convlstm", "naive")} for cohort in study.COHORTS}
    summary["unseen"]["convlstm"]["ctac"]["kappa_linear"] = 0.42
    summary["test"]["ctac_vs_gated"] = {"convlstm": {**cell, "kappa_linear": 0.45}}
    folders = study.export_models(out, config, summary, systems)
    assert set(folders) == {"heart_convlstm", "calcium_convlstm"}
    for name, step in (("heart_convlstm", 30), ("calcium_convlstm", 40)):
        folder = out / "reference" / name
        assert load_trained(folder).step == step
        assert not (folder / "checkpoints" / str(step) / "train_state").exists()
        card = (folder / "MODEL.md").read_text()
        assert "not for clinical use" in card.splitlines()[2]
        assert ("| unseen site site2 | 0.90 (0.80-1.00), n=7 | 0.42 (0.80-1.00), n=7 | n/a | "
                "0.90 / 0.90 |") in card
        assert ("| held-out, training sites | 0.90 (0.80-1.00), n=7 | 0.90 (0.80-1.00), n=7 | "
                "0.45 (0.80-1.00), n=7 |") in card
        assert f"this checkpoint is step {step}" in card
        assert "default, lowdose" in card and "generator version" in card
        assert "ended by early stopping" in card
    # Run again (a resumed study): the folders are replaced, not refused.
    study.export_models(out, config, summary, systems)
    assert load_trained(out / "reference" / "heart_convlstm").step == 30


def test_targets_say_what_is_met_by_how_much_and_what_was_not_measured():
    from cac_jax import study

    def cell(k):
        return {"kappa_linear": k}

    summary = {
        "test": {"convlstm": {"cac": cell(0.9), "ctac": cell(0.6)},
                 "naive": {"cac": cell(0.6), "ctac": cell(0.0)},
                 "comparison": {"cac": {"p": 0.01, "difference": 0.1},
                                "ctac": {"p": 0.01, "difference": -0.2}}},
        "unseen": {"convlstm": {"cac": cell(0.85), "ctac": cell(float("nan"))}},
    }
    rows = {r["target"]: r for r in study.targets(summary)}
    paper = "convlstm CTAC kappa against the same patients' gated reference (the paper's design)"
    assert rows[f"{paper} >= 0.65"]["met"] is None  # not evaluated
    summary["test"]["ctac_vs_gated"] = {"convlstm": cell(0.45), "unet": cell(0.5)}
    rows = {r["target"]: r for r in study.targets(summary)}
    assert rows[f"{paper} >= 0.65"]["met"] is False
    assert rows[f"{paper} >= 0.65"]["value"] == pytest.approx(0.45)
    assert rows["convlstm CAC kappa >= 0.85"]["met"] is True
    assert rows["convlstm CTAC kappa >= 0.65"]["met"] is False
    assert rows["convlstm CAC kappa >= naive + 0.2"]["value"] == pytest.approx(0.3)
    assert rows["convlstm CAC unseen site within 0.1 of the held-out patients"]["met"] is True
    ctac_unseen = rows["convlstm CTAC unseen site within 0.1 of the held-out patients"]
    assert ctac_unseen["met"] is None and ctac_unseen["value"] is None
    # Significantly better is met; significantly worse is not.
    assert [r["met"] for t, r in rows.items() if t.startswith("convlstm vs unet")] == [True, False]


def test_the_cpu_study_matches_the_unets_to_its_half_width_convlstm():
    from cac_jax.main import parse_flags

    config = load_config_file(str(STUDY))
    parsed_configs = {}
    for name in ("calcium_convlstm", "calcium_unet", "heart_unet"):
        spec = config.trainings[name]
        parsed, _ = parse_flags(["--config", str(ROOT / spec.config), "--workdir", "w",
                                 *(f"--config.{o}" for o in spec.overrides)])
        parsed_configs[name] = parsed
    assert parsed_configs["calcium_unet"].model.unet.base_width == 12
    assert parsed_configs["heart_unet"].model.unet.base_width == 12
    # Both calcium models train with the same loss (the UNet configs' own default differs).
    assert tuple(parsed_configs["calcium_unet"].train.focal_alpha) == (0.1, 1.0, 0.5)
    assert (tuple(parsed_configs["calcium_unet"].train.focal_alpha)
            == tuple(parsed_configs["calcium_convlstm"].train.focal_alpha))


def test_summary_and_report_carry_each_named_ablation(tmp_path):
    """Every `config.ablations` pair gets its z-test in summary.json and a line in the report."""
    from cac_jax import study

    config = load_config_file(str(STUDY), "local")
    systems = {name: tuple(pair) for name, pair in config.systems.items()}

    def block(k, z=None):
        cell = {"kappa_linear": k, "kappa_linear_ci95": [k - 0.1, k + 0.1],
                "exact_agreement": 0.8, "n": 9}
        if z is not None:
            cell["z_test"] = {"p": z, "difference": 0.05}
        return {"by_protocol": {p: dict(cell) for p in study.PROTOCOLS}}

    metrics = {}
    for cohort in study.COHORTS:
        for model in (*systems, "naive"):
            metrics[(cohort, model)] = block(0.7)
        metrics[(cohort, "comparison")] = block(0.7, z=0.3)
        metrics[(cohort, "ablation_frame")] = block(0.7, z=0.02)
        metrics[(cohort, "ablation_scanner")] = block(0.7, z=0.4)
    paper = block(0.45)
    paper["by_protocol"]["ctac"].update(kappa_linear_2=0.5, kappa_linear_2_ci95=[0.4, 0.6])
    metrics[("test", "ctac_vs_gated")] = paper
    summary = study.summarise(config, metrics, systems)
    assert summary["test"]["ctac_vs_gated"]["convlstm"]["kappa_linear"] == 0.45
    assert summary["test"]["ctac_vs_gated"]["unet"]["kappa_linear_ci95"] == [0.4, 0.6]
    assert "ctac_vs_gated" not in summary["unseen"]
    assert summary["test"]["ablation_frame"]["cac"]["p"] == 0.02
    assert summary["unseen"]["ablation_scanner"]["ctac"]["p"] == 0.4
    (tmp_path / "eval").mkdir()
    report = study.write_report(tmp_path, config, summary, {}, systems).read_text()
    assert "z-test (ablation_frame)" in report and "z-test (ablation_scanner)" in report
    assert "| convlstm_fixedkernel |" in report


def test_grooved_modifier_changes_only_the_anatomy():
    """`configs/study.py:grooved` (alone or after gpu/local) is the same study on the grooved
    anatomy, `:mixed` on both; a bad argument is refused with the accepted ones named."""
    for base in ("", "gpu", "local"):
        plain = load_config_file(str(STUDY), base or None)
        grooved = load_config_file(str(STUDY), ",".join(p for p in (base, "grooved") if p))
        mixed = load_config_file(str(STUDY), ",".join(p for p in (base, "mixed") if p))
        assert plain.anatomies == ("classic",) and grooved.anatomies == ("grooved",)
        assert mixed.anatomies == ("classic", "grooved")
        plain.anatomies = ("grooved",)
        assert plain.to_dict() == grooved.to_dict()
        plain.anatomies = ("classic", "grooved")
        # The CPU mixed study fine-tunes the reference calcium models (the same widths); the
        # full-width GPU and tiny local models train from scratch.
        for name in ("calcium_convlstm", "calcium_unet"):
            tuned = mixed.trainings[name].overrides
            start = [f"train.init_from=models/synthetic/{name}", "train.learning_rate=5e-4"]
            assert (tuned[-2:] == start) == (base == "")
            if base == "":
                del tuned[-2:]
        assert plain.to_dict() == mixed.to_dict()
    for bad in ("grooves", "gpu,local", "grooved,x", "grooved,mixed"):
        with pytest.raises(ValueError, match="optionally with ',grooved' or ',mixed'"):
            load_config_file(str(STUDY), bad)


def test_calibrated_modifier_images_every_ctac_with_the_calibrated_model(tmp_path, monkeypatch):
    """`:calibrated` (alone or after the others) changes only `ctac_imaging`; its cohorts are
    synthesised with --ctac-imaging calibrated and stamped with that generator identity, so a
    classic study folder's cohorts are made again, never reused."""
    from cac_jax import stages, study
    from data_pipeline.manifest import ManifestRow, write_manifest
    from data_pipeline.phantom.cohort import generator_identity

    for base in ("", "gpu", "local", "mixed", "local,grooved"):
        plain = load_config_file(str(STUDY), base or None)
        calibrated = load_config_file(str(STUDY), ",".join(p for p in (base, "calibrated") if p))
        assert (plain.ctac_imaging, calibrated.ctac_imaging) == ("classic", "calibrated")
        plain.ctac_imaging = "calibrated"
        # On the CPU the calcium models are fine-tuned from the reference ones, as :mixed does.
        for name in ("calcium_convlstm", "calcium_unet"):
            tuned = calibrated.trainings[name].overrides
            start = [f"train.init_from=models/synthetic/{name}", "train.learning_rate=5e-4"]
            assert (tuned[-2:] == start) == (base in ("", "mixed")), (base, tuned)
            if base == "":
                del tuned[-2:]
        assert plain.to_dict() == calibrated.to_dict()
    with pytest.raises(ValueError, match="and ',calibrated'"):
        load_config_file(str(STUDY), "calibrated,calibrated")

    calls = {}

    def fake_cli(*args, stage):
        folder = pathlib.Path(args[args.index("--out") + 1])
        calls[folder.name] = args[args.index("--ctac-imaging") + 1] if (
            "--ctac-imaging" in args) else "classic"
        folder.mkdir(parents=True)
        (folder / "x").write_text("")
        write_manifest(folder / "manifest.csv", [
            ManifestRow(f"{folder.name}-0", f"{folder.name}-0_{p}", p, folder / "x", None, None,
                        "synthetic", None) for p in ("cac", "ctac")])

    monkeypatch.setattr(study.demo, "_cli", fake_cli)
    out = tmp_path / "study"
    study.make_cohorts(out, load_config_file(str(STUDY), "local"), stages._Stamps(out))
    assert set(calls.values()) == {"classic"}
    calls.clear()
    config = load_config_file(str(STUDY), "local,calibrated")
    study.make_cohorts(out, config, stages._Stamps(out))
    assert set(calls) == {"train_default", "test_default", "train_lowdose", "test_lowdose",
                          "unseen"} and set(calls.values()) == {"calibrated"}
    stamp = json.loads((out / ".stamps" / "cohort_unseen.json").read_text())
    assert stamp["generator"] == generator_identity("classic", "calibrated") == "2+calibrated1"
    assert study._generator_version(config) == "2+calibrated1"


def test_mixed_study_makes_and_trains_on_every_sites_cohorts_in_both_anatomies(tmp_path,
                                                                               monkeypatch):
    """`:local,mixed`: every site's cohorts in the classic anatomy (plain names, as the classic
    study makes them) and the grooved one ("_grooved", synthesised with --anatomy grooved); the
    training manifest holds both, with the classic validation draw of the classic study."""
    from cac_jax import stages, study
    from data_pipeline.manifest import ManifestRow, read_manifest, write_manifest
    from data_pipeline.phantom.cohort import generator_identity

    synthesised = {}

    def fake_cli(*args, stage):
        folder = pathlib.Path(args[args.index("--out") + 1])
        anatomy = args[args.index("--anatomy") + 1] if "--anatomy" in args else "classic"
        synthesised[folder.name] = anatomy
        patients = int(args[args.index("--patients") + 1])
        folder.mkdir(parents=True)
        (folder / "x").write_text("")   # an image path the manifest reader finds
        write_manifest(folder / "manifest.csv", [
            ManifestRow(f"{folder.name}-{k}", f"{folder.name}-{k}_{p}", p, folder / "x", None,
                        None, "synthetic", None) for k in range(patients) for p in ("cac", "ctac")])

    monkeypatch.setattr(study.demo, "_cli", fake_cli)
    out = tmp_path / "study"
    mixed = load_config_file(str(STUDY), "local,mixed")
    manifests = study.make_cohorts(out, mixed, stages._Stamps(out))
    sites = ("default", "lowdose")
    plain = [f"{kind}_{s}" for s in sites for kind in ("train", "test")] + ["unseen"]
    assert synthesised == {**{n: "classic" for n in plain},
                           **{f"{n}_grooved": "grooved" for n in plain}}
    assert set(manifests) == set(synthesised)
    stamp = json.loads((out / ".stamps" / "cohort_train_default_grooved.json").read_text())
    assert stamp["generator"] == generator_identity("grooved")
    assert json.loads((out / ".stamps" / "cohort_train_default.json").read_text())[
        "generator"] == generator_identity("classic")
    rows = read_manifest(study._training_manifest(out, mixed, manifests))
    assert {r.patient_id.rsplit("-", 1)[0] for r in rows} == {
        f"train_{s}{a}" for s in sites for a in ("", "_grooved")}
    # The classic cohorts keep the classic study's validation patients.
    classic = load_config_file(str(STUDY), "local")
    classic_rows = read_manifest(study._training_manifest(tmp_path / "c", classic, manifests))
    split = {r.scan_id: r.split for r in rows}
    assert all(split[r.scan_id] == r.split for r in classic_rows)
    assert {r.split for r in rows if "grooved" in r.patient_id} == {"train", "validation"}
    assert study._generator_version(mixed) == (f"{generator_identity('classic')} and "
                                               f"{generator_identity('grooved')}")
    # Held out: the test sites and the unseen site, each in both anatomies.
    monkeypatch.setattr(study.demo, "naive_results",
                        lambda manifest, path: (path.parent.mkdir(parents=True, exist_ok=True),
                                                path.write_text("")))
    cohorts = study.score_cohorts(out, mixed, manifests, stages._Stamps(out), {})
    held_out = {name: {r.patient_id.rsplit("-", 1)[0] for r in read_manifest(path)}
                for name, path in cohorts.items()}
    assert held_out == {"test": {f"test_{s}{a}" for s in sites for a in ("", "_grooved")},
                        "unseen": {"unseen", "unseen_grooved"}}


def test_a_fine_tuned_training_resolves_its_start_and_stamps_it(tmp_path):
    """`train.init_from` in a study training is relative to the checkout (like configs/): the
    command gets the resolved path, the stamp keeps the relative one and the starting model's
    checkpoint steps, so a changed starting model trains again."""
    from cac_jax import study

    config = load_config_file(str(STUDY), "mixed")
    out = tmp_path / "study"
    (out / ".stamps").mkdir(parents=True)
    (out / ".stamps" / "ingest.json").write_text(json.dumps({"scans": 3}))
    _, overrides, wanted = study.training_stamp(out, config, "calcium_convlstm")
    given = [o for o in overrides if o.startswith("train.init_from=")]
    path = pathlib.Path(given[0].partition("=")[2])
    assert path == ROOT / "models" / "synthetic" / "calcium_convlstm" and path.is_dir()
    assert "train.init_from=models/synthetic/calcium_convlstm" in wanted["overrides"]
    assert wanted["init_from"]["path"] == "models/synthetic/calcium_convlstm"
    assert wanted["init_from"]["sha256"] == study._model_fingerprint(path, "x")
    # Another starting model (here: a copy with one byte changed) changes the stamp.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    meta = next(copy.glob("checkpoints/*/meta/*"))
    meta.write_bytes(meta.read_bytes() + b" ")
    assert study._model_fingerprint(copy, "x") != wanted["init_from"]["sha256"]
    with pytest.raises(study.InputError, match="not a folder here"):
        study._model_fingerprint(tmp_path / "absent", "calcium_convlstm")
    _, _, plain = study.training_stamp(out, config, "heart_convlstm")
    assert "init_from" not in plain
    # Its card says it was fine-tuned, and from which model.
    line = study._init_line({"initialised_from": {"path": str(path), "step": 3000},
                             "overrides": wanted["overrides"]})
    assert line == ["- Fine-tuned: it started from the parameters of "
                    "`models/synthetic/calcium_convlstm` (that model's step 3000), not from a "
                    "random initialisation."]
    assert study._init_line({"initialised_from": None, "overrides": []}) == []
