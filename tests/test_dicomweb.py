"""`cac-jax infer --dicomweb`: pull, score and push against a real Orthanc with its DICOMweb
plugin (Debian packages orthanc and orthanc-dicomweb), started here on a loopback port with a
temporary storage folder (docs/clinical.md). Skipped with the reason where Orthanc is missing."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from test_dicom_outputs import threshold_scorer, write_dicom_study  # noqa: E402

from cac_jax import dicom_outputs, dicomweb, inference  # noqa: E402
from cac_jax.cli import main  # noqa: E402
from data_pipeline.errors import InputError  # noqa: E402
from data_pipeline.io import read_study  # noqa: E402

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "cacjax", "test-secret"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """The DICOMweb root URL of a fresh Orthanc (user USER, password PASSWORD)."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists()
                                         else None)
    if binary is None or not PLUGIN.exists():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, "
                    "orthanc-dicomweb; .ci/run installs them)")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {"Name": "cac-jax-test", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": port, "DicomPort": _free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("Orthanc did not answer within 15 s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory):
    """A synthetic study on the server: a 3 mm CT series (the one to score) and a 1.5 mm one."""
    root = tmp_path_factory.mktemp("upload")
    thick = write_dicom_study(root / "thick", seed=0, study_uid=STUDY_UID)
    thin = write_dicom_study(root / "thin", seed=5, slices=6, study_uid=STUDY_UID)
    for path in thin.glob("*.dcm"):  # another series of the same study, 1.5 mm slices
        ds = pydicom.dcmread(path)
        ds.PatientID = ds.PatientName = "PAT0^TEST"  # the same patient as the thick series
        ds.SeriesNumber = 2
        ds.SliceThickness = 1.5
        ds.save_as(path, enforce_file_format=True)
    for path in [*thick.glob("*.dcm"), *thin.glob("*.dcm")]:
        answer = requests.post(f"{orthanc}/instances", data=path.read_bytes(),
                               auth=(USER, PASSWORD), timeout=10)
        assert answer.ok, answer.text
    return orthanc, thick


def _infer(monkeypatch, *args: str) -> int:
    scorer = threshold_scorer()
    monkeypatch.setattr(inference.Scorer, "from_checkpoints",
                        classmethod(lambda cls, h, c, **kw: scorer))
    return main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C",
                 "--no-progress", "--retries", "0", "--timeout", "10", *args])


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["scan_id"]: r for r in csv.DictReader(f)}


def test_pull_score_push(uploaded, tmp_path, monkeypatch, capsys):
    base, thick = uploaded
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, PASSWORD)
    out = tmp_path / "out"
    url = f"{base}/dicom-web"
    assert _infer(monkeypatch, "--dicomweb", url, "--study", STUDY_UID, "1.2.3.404",
                  "--push", "--save-masks", "--out", str(out)) == 0
    rows = _rows(out)
    assert rows[STUDY_UID]["status"] == "ok", rows[STUDY_UID]["error"]
    assert rows["1.2.3.404"]["status"] == "error"
    assert "1.2.3.404" in rows["1.2.3.404"]["error"] and url in rows["1.2.3.404"]["error"]

    # The pushed Segmentation and SR are on the server, in the study, found by QIDO-RS.
    client = dicomweb.Pacs(url, env={dicomweb.ENV_USER: USER,
                                     dicomweb.ENV_PASSWORD: PASSWORD}).client
    series = client.search_for_series(study_instance_uid=STUDY_UID)
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["CT", "CT", "SEG", "SR"]
    found = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in series}
    (seg,) = client.retrieve_series(STUDY_UID, found["SEG"])
    (sr,) = client.retrieve_series(STUDY_UID, found["SR"])
    local = pydicom.dcmread(out / f"{inference.safe_name(STUDY_UID)}.seg.dcm")
    assert seg.SOPInstanceUID == local.SOPInstanceUID
    # The 3 mm series was scored: the Segmentation references it, frame for frame.
    thick_uid = pydicom.dcmread(next(thick.glob("*.dcm"))).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == thick_uid
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    study = read_study(thick)
    masks = dicom_outputs.segment_masks(seg_path, study)
    from data_pipeline.io import read_labels

    labels = read_labels(out / f"{inference.safe_name(STUDY_UID)}_calcium_labels.nii.gz",
                         like=study)
    assert masks[1].sum() > 0 and np.array_equal(masks[1], labels == 4)
    score = dicom_outputs.report_measurements(sr_path)["Coronary artery calcium score"]
    assert score == pytest.approx(float(rows[STUDY_UID]["agatston"]), rel=1e-5)

    # A rerun resumes: the scored study is skipped, only the failed one is tried again.
    capsys.readouterr()
    assert _infer(monkeypatch, "--dicomweb", url, "--study", STUDY_UID, "1.2.3.404",
                  "--push", "--out", str(out)) == 0
    assert "scored 0, failed 1, skipped 1" in capsys.readouterr().out


def test_qido_query_selects_studies(uploaded, tmp_path, monkeypatch):
    base, _ = uploaded
    credentials = tmp_path / "pacs.txt"
    credentials.write_text(f"# test server\nusername={USER}\npassword={PASSWORD}\n")
    out = tmp_path / "out"
    assert _infer(monkeypatch, "--dicomweb", f"{base}/dicom-web", "--query",
                  "ModalitiesInStudy=CT", "--query", f"StudyInstanceUID={STUDY_UID}",
                  "--credentials", str(credentials), "--series", "2", "--out", str(out)) == 0
    rows = _rows(out)
    assert list(rows) == [STUDY_UID] and rows[STUDY_UID]["status"] == "ok"
    # --series 2: only the 1.5 mm series was pulled and scored.
    pulled = list((out / dicomweb.CACHE_FOLDER).rglob("*.dcm"))
    assert len(pulled) == 6 and all(pydicom.dcmread(p).SeriesNumber == 2 for p in pulled)
    assert not list(out.glob("*.seg.dcm"))  # no --push, no --dicom
    with pytest.raises(InputError, match="no study on"):
        dicomweb.Pacs(f"{base}/dicom-web", credentials=credentials).studies(
            None, ["PatientID=nobody"], out)


def test_wrong_credentials_say_so(uploaded, tmp_path, monkeypatch, capsys):
    base, _ = uploaded
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, "wrong")
    assert _infer(monkeypatch, "--dicomweb", f"{base}/dicom-web", "--query",
                  "ModalitiesInStudy=CT", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0] and "check the credentials" in err[0]


def test_unreachable_server_is_one_clear_line(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    started = time.perf_counter()
    assert main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C",
                 "--dicomweb", url, "--query", "ModalitiesInStudy=CT", "--retries", "1",
                 "--timeout", "2", "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and "cannot reach the server after 1 retries" in err[0]


def test_credentials_never_from_the_command_line(tmp_path):
    assert dicomweb.read_credentials(None, {dicomweb.ENV_TOKEN: "abc"}) == {"token": "abc"}
    assert dicomweb.read_credentials(None, {}) == {}
    bad = tmp_path / "c.txt"
    bad.write_text("user=me\n")
    with pytest.raises(InputError, match="line 1"):
        dicomweb.read_credentials(bad)
    bad.write_text("username=me\n")
    with pytest.raises(InputError, match="needs a password"):
        dicomweb.read_credentials(bad)
    with pytest.raises(InputError, match="KEY=VALUE"):
        dicomweb.parse_queries(["ModalitiesInStudy"])
