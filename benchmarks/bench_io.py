"""Benchmark: reading a 512 x 512 x 80 CT series with `data_pipeline.io.read_study`.

Run:  python benchmarks/bench_io.py [--repeats 5] [--slices 80]

Writes a synthetic series with `write_dicom_series` (int16, explicit VR little endian) into a
temporary folder, then times, in the same run and process so the numbers read as ratios on a
shared machine: `read_study` on the folder; SimpleITK's GDCM series reader on the same folder;
the bare `pydicom.dcmread` + `pixel_array` of every file (what any pydicom reader must do); and
`read_study` on a .nii.gz of the same volume. Median of the repeats after one warm-up (the
first read also warms the OS file cache). Writes benchmarks/results/bench_io.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from data_pipeline.atomic import atomic_write_text
from data_pipeline.io import CTVolume, StudyMetadata, read_study, write_dicom_series

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=80)
    args = parser.parse_args()

    shape = (args.slices, 512, 512)
    rng = np.random.default_rng(0)
    hu = rng.normal(0.0, 300.0, size=shape).astype(np.float32)
    volume = CTVolume(hu=hu, spacing_zyx_mm=(3.0, 0.6, 0.6), origin_xyz_mm=(-150.0, -150.0, 0.0),
                      direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                      metadata=StudyMetadata(source="bench", patient_id="BENCH", kvp=120.0,
                                             ecg_gated=True))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicom"
        start = time.perf_counter()
        files = write_dicom_series(volume, folder, uid_seed="bench")
        write_s = time.perf_counter() - start

        def sitk_read():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            return sitk.GetArrayFromImage(reader.Execute())

        def pydicom_bare():
            return [pydicom.dcmread(f).pixel_array for f in files]

        read = read_study(folder)
        assert np.abs(read.hu - hu).max() <= 0.5
        assert np.array_equal(read.hu, sitk_read().astype(np.float32))
        nifti = Path(tmp) / "ct.nii.gz"
        sitk.WriteImage(sitk.ReadImage([str(f) for f in files]), str(nifti))

        results = {
            "shape_zyx": list(shape),
            "repeats": args.repeats,
            "write_dicom_series_s": write_s,
            "read_study_dicom_s": timed(lambda: read_study(folder), args.repeats),
            "simpleitk_series_reader_s": timed(sitk_read, args.repeats),
            "pydicom_bare_s": timed(pydicom_bare, args.repeats),
            "read_study_nifti_gz_s": timed(lambda: read_study(nifti), args.repeats),
            "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "simpleitk": sitk.Version_VersionString(),
            "numpy": np.__version__,
            "machine": platform.processor() or platform.machine(),
        }
    ratio_sitk = results["read_study_dicom_s"] / results["simpleitk_series_reader_s"]
    ratio_bare = results["read_study_dicom_s"] / results["pydicom_bare_s"]
    results["ratio_read_study_to_simpleitk"] = ratio_sitk
    results["ratio_read_study_to_pydicom_bare"] = ratio_bare
    out = RESULTS
    atomic_write_text(out / "bench_io.json", json.dumps(results, indent=2) + "\n")
    ms = {k: f"{1000 * v:.0f} ms" for k, v in results.items() if k.endswith("_s")}
    table = (
        "# CT I/O benchmark\n\n`python benchmarks/bench_io.py`\n\n"
        "| volume (z, y, x) | read_study (DICOM) | SimpleITK series reader | bare pydicom read + "
        "decode | read_study (.nii.gz) | write_dicom_series |\n|---|---|---|---|---|---|\n"
        f"| {' x '.join(map(str, shape))} | {ms['read_study_dicom_s']} | "
        f"{ms['simpleitk_series_reader_s']} ({ratio_sitk:.2f}x) | {ms['pydicom_bare_s']} "
        f"({ratio_bare:.2f}x) | {ms['read_study_nifti_gz_s']} | {ms['write_dicom_series_s']} "
        "(once) |\n\n"
        f"Median of {args.repeats} repeats after one warm-up, one process, warm file cache; "
        "ratios are read_study's time over each reference's, measured in the same run. "
        f"Python {results['python']}, pydicom {results['pydicom']}, SimpleITK "
        f"{results['simpleitk']}, numpy {results['numpy']}.\n")
    atomic_write_text(out / "bench_io.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
