"""The demo's whole path at a tiny size: synth, ingest, train (4 models), infer, evaluate, bench,
report; and a second run that reuses every stage."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from cac_jax import demo


def test_demo_whole_path_at_a_tiny_size(tmp_path, capfd, monkeypatch):
    # The commands run as subprocesses; one CPU device keeps the tiny training runs cheap.
    monkeypatch.setenv("XLA_FLAGS", "")
    settings = demo.DemoSettings(
        patients=4, site2_patients=1, size=64, heart_steps=2, calcium_steps=2, batch_size=2,
        eval_every=2, bench_samples=1, bench_size=64, workers=1, heart_seconds=0.0,
        calcium_seconds=0.0, local_models=True, train_jobs=2, eval_jobs=2,
        min_heart_ml=0.0,  # 2-step heart models find small hearts
        reference_models=False)  # scored below, with stand-ins
    summary = demo.run(tmp_path, settings)
    out = capfd.readouterr().out
    assert out.rstrip().splitlines()[-1] == f"report: {tmp_path / 'report.html'}"

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test"] == summary["test"]
    for cohort in ("test", "site2"):
        for model in ("convlstm", "unet", "naive"):
            for protocol in ("cac", "ctac"):
                cell = on_disk[cohort][model][protocol]
                assert {"kappa_linear", "exact_agreement"} <= set(cell), (cohort, model, protocol)
                assert cell["n"] >= 1, (cohort, model, protocol)
                assert 0.0 <= cell["exact_agreement"] <= 1.0
    for stage in ("synth", "ingest", "train", "infer", "evaluate", "bench", "total"):
        assert on_disk["seconds"][stage] >= 0.0, stage

    # Trained workdirs that `cac-jax infer` accepted, and every test scan scored.
    for name in ("heart_convlstm", "calcium_convlstm", "heart_unet", "calcium_unet"):
        assert (tmp_path / "models" / name / "summary.json").exists(), name
    with (tmp_path / "eval" / "test_manifest.csv").open() as handle:
        test_scans = {row["scan_id"] for row in csv.DictReader(handle)}
    with (tmp_path / "infer" / "test_convlstm" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["scan_id"] for row in rows} == test_scans
    assert all(row["status"] == "ok" for row in rows), rows
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["results"]["jax"]

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# cac-jax demo report")
    assert "**Verdict:**" in report and "## Second site" in report
    assert "figures/training_curves.png" in report and "bench/bench.png" in report
    page = (tmp_path / "report.html").read_text()
    assert "cac-jax demo report" in page and page.count("data:image/png;base64,") >= 2
    assert (tmp_path / "infer" / "convlstm" / "report.html").exists()
    assert (tmp_path / "eval" / "test_convlstm" / "report.html").exists()

    # A second run reuses every stage (no training, inference or benchmark again).
    demo.run(tmp_path, settings)
    out = capfd.readouterr().out
    for stage in ("cohort", "site2", "ingest", "train_calcium_convlstm", "infer_unet",
                  "naive_site2", "evaluate_test_convlstm", "evaluate_site2_ctac_vs_gated", "bench"):
        assert f"reusing {stage} " in out, stage
    assert "train convlstm" not in out
    assert "reference" not in json.loads((tmp_path / "summary.json").read_text())["test"]

    # With reference models (here the demo's own, exported as the study exports its models), the
    # same patients are also scored with them and the report compares the two.
    from cac_jax.checkpoints import export_parameters

    reference = tmp_path / "reference_models"
    for name in demo.REFERENCE_MODELS:
        export_parameters(tmp_path / "models" / name, reference / name)
    monkeypatch.setattr(demo, "REFERENCE_DIR", reference)
    summary = demo.run(tmp_path, dataclasses.replace(settings, reference_models=True))
    out = capfd.readouterr().out
    assert "train convlstm" not in out and "reusing infer_convlstm" in out
    # Only the reference's evaluations are new.
    assert "reusing evaluate_test_naive" in out and "reusing evaluate_test_reference" not in out
    for cohort in ("test", "site2"):
        assert summary[cohort]["reference"]["cac"]["n"] >= 1, cohort
    # The stand-ins are the demo's own ConvLSTM models: the same scores.
    assert summary["test"]["reference"] == summary["test"]["convlstm"]
    assert "`reference`: the study's ConvLSTM models" in (tmp_path / "report.md").read_text()
    # The training stamps hold the config files' whole defaults, so a changed default retrains.
    stamp = json.loads((tmp_path / ".stamps" / "train_calcium_convlstm.json").read_text())
    assert stamp["defaults"]["train"]["focal_alpha"] == [0.1, 1.0, 0.5]
    assert stamp["defaults"]["data"]["image_size"] == 64  # the `:local` variant


def test_a_changed_config_default_changes_the_training_stamp(monkeypatch):
    from cac_jax import config_defaults

    before = demo._config_defaults("configs/convlstm_calcium.py")
    assert before["data"]["image_size"] == 512 and before["model"]["arch"] == "convlstm"
    original = config_defaults.train_config

    def changed(*args, **kwargs):
        train = original(*args, **kwargs)
        train.focal_gamma = 3.0
        return train

    monkeypatch.setattr(config_defaults, "train_config", changed)
    after = demo._config_defaults("configs/convlstm_calcium.py")
    assert (before["train"]["focal_gamma"], after["train"]["focal_gamma"]) == (2.0, 3.0)
    assert {**after, "train": {**after["train"], "focal_gamma": 2.0}} == before


# How the demo chose its models before configs/demo_*.py: a config file plus these overrides on
# the `cac-jax train` command line (none for the `:local` variants).
OLD_HALF_WIDTH_CONVLSTM = {
    "model.convlstm.encoder_widths": (16, 32, 64, 128),
    "model.convlstm.lstm_features": (32, 64),
    "model.convlstm.decoder_widths": (16, 32, 64),
    "model.convlstm.temporal_decoder_widths": (16, 32, 64),
    "model.convlstm.attention_width": 16,
}
OLD_MATCHED_UNET = {"model.unet.base_width": 12}
OLD_TRAINED = {
    ("heart", "convlstm"): ("configs/convlstm_heart.py", OLD_HALF_WIDTH_CONVLSTM),
    ("calcium", "convlstm"): ("configs/convlstm_calcium.py", OLD_HALF_WIDTH_CONVLSTM),
    ("heart", "unet"): ("configs/unet_heart.py", OLD_MATCHED_UNET),
    ("calcium", "unet"): ("configs/unet_matched_calcium.py", OLD_MATCHED_UNET),
}


@pytest.mark.parametrize("local", [False, True], ids=["full", "local"])
def test_the_demo_config_files_resolve_as_the_old_overrides_did(local):
    from cac_jax.main import parse_flags

    assert set(demo.TRAINED) == set(OLD_TRAINED)
    suffix = ":local" if local else ""
    for key, (old_file, extra) in OLD_TRAINED.items():
        overrides = [] if local else [f"--config.{k}={v}" for k, v in extra.items()]
        old, _ = parse_flags(["--config", demo._config_path(old_file + suffix), *overrides,
                              "--workdir", "w"])
        new, _ = parse_flags(["--config", demo._config_path(demo.TRAINED[key] + suffix),
                              "--workdir", "w"])
        assert json.loads(new.to_json()) == json.loads(old.to_json()), key
        # The demo's stamps hold the config file's whole configuration, widths included, but
        # not which library runs the convolutions (a run continues under another).
        whole = json.loads(new.to_json())
        assert whole["model"].pop("conv_impl") == "auto"
        assert demo._config_defaults(demo.TRAINED[key] + suffix) == whole
    if not local:
        assert new.model.unet.base_width == 12


def test_calcium_focal_alpha_per_architecture():
    """The ConvLSTM's non-coronary alpha is 0.5; the UNet keeps 0.05."""
    alphas = {name: demo._config_defaults(f"configs/{name}_calcium.py")["train"]["focal_alpha"]
              for name in ("convlstm", "unet", "unet_matched")}
    assert alphas == {"convlstm": [0.1, 1.0, 0.5], "unet": [0.1, 1.0, 0.05],
                      "unet_matched": [0.1, 1.0, 0.05]}


@pytest.mark.parametrize("jobs, expected_ran", [(1, [0, 1]), (2, [0, 1, 2, 3])])
def test_run_all_raises_the_first_failure(jobs, expected_ran):
    ran = []

    def task(k, fails):
        def run():
            ran.append(k)
            if fails:
                raise demo.DemoError(f"stage {k} failed")
            return k
        return run

    tasks = [task(0, False), task(1, True), task(2, False), task(3, True)]
    with pytest.raises(demo.DemoError, match="^stage 1 failed$"):
        demo._run_all(tasks, jobs)
    assert sorted(ran) == expected_ran
    assert demo._run_all([task(5, False), task(6, False)], jobs) == [5, 6]


def test_a_key_added_at_its_neutral_value_keeps_old_stamps(tmp_path):
    stamps = demo._Stamps(tmp_path)
    wanted = {"config": "c.py", "defaults": demo._config_defaults("configs/convlstm_calcium.py")}
    assert wanted["defaults"]["train"]["early_stop_min_delta"] == 0.0
    old = json.loads(json.dumps(wanted))
    del old["defaults"]["train"]["early_stop_min_delta"]  # stamped before the key existed
    stamps.mark("train_x", old)
    assert stamps.same("train_x", wanted)
    changed = json.loads(json.dumps(wanted))
    changed["defaults"]["train"]["early_stop_min_delta"] = 0.01
    assert not stamps.same("train_x", changed)
    changed = json.loads(json.dumps(wanted))
    changed["defaults"]["train"]["focal_gamma"] = 3.0
    assert not stamps.same("train_x", changed)


def test_the_demo_calcium_frame_setting_reaches_only_the_calcium_training(tmp_path):
    slice_ = demo.DemoSettings.full()
    heart = demo.DemoSettings.full(calcium_frame="heart")
    assert "data.calcium_frame" not in demo.train_overrides(tmp_path, slice_, "calcium")
    assert "data.calcium_frame" not in demo.train_overrides(tmp_path, heart, "heart")
    framed = demo.train_overrides(tmp_path, heart, "calcium")
    assert framed["data.calcium_frame"] == "heart"
    assert framed["data.frame_spacing_mm"] == heart.frame_spacing_mm
    # Half-size crops of the window: the same pixels per sample as the slice model's crops.
    assert framed["data.crop_size"] == heart.frame_size // 2 == slice_.image_size // 2
    same = {k: v for k, v in framed.items() if not k.startswith(("data.calcium_frame",
                                                                  "data.frame_", "data.crop"))}
    assert same == demo.train_overrides(tmp_path, slice_, "calcium")


def test_an_evaluation_is_reused_until_its_inputs_change(tmp_path, monkeypatch):
    stamps = demo._Stamps(tmp_path)
    pred, ref, target = tmp_path / "pred.csv", tmp_path / "ref.csv", tmp_path / "eval"
    pred.write_text("scan_id,category\na,1\n")
    ref.write_text("scan_id,category\na,1\n")
    args = ["--pred", str(pred), "--ref", str(ref), "--by", "protocol"]
    runs = []

    def evaluate():
        runs.append(pred.read_text())
        target.mkdir(exist_ok=True)
        (target / "metrics.json").write_text(json.dumps({"run": len(runs)}))
        (target / "report.html").write_text("<html></html>")

    def stage(args=args):
        return demo._evaluation(stamps, "evaluate_x", args, target, evaluate, report=True)

    assert stage() == {"run": 1}
    assert stage() == {"run": 1} and len(runs) == 1  # nothing changed: reused
    pred.write_text("scan_id,category\na,2\n")  # new predictions, same file name
    assert stage() == {"run": 2}
    assert stage([*args, "--ref-protocol", "cac"]) == {"run": 3}  # other arguments
    (target / "report.html").unlink()  # an output gone
    assert stage([*args, "--ref-protocol", "cac"]) == {"run": 4}
    assert demo._evaluation(None, "evaluate_x", args, target, evaluate) == {"run": 5}
    assert stage() == {"run": 6}  # (the last stamp was for other arguments)
    assert stage() == {"run": 6}
    from cac_jax import stages

    monkeypatch.setattr(stages, "_evaluation_code_digest", lambda: "other code")
    assert stage() == {"run": 7}  # the evaluation code changed
    ref.unlink()  # a missing input: the command runs (and says so itself); nothing is stamped
    assert stage() == {"run": 8}
