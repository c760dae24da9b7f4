"""CT study I/O: DICOM folders (pydicom) and image files (SimpleITK) to one `CTVolume`.

Conventions (docs/contracts.md, "Orientation and slice order"; docs/io.md; docs/data_flow.md):
- One canonical orientation for every study, whatever its file or patient position: DICOM LPS,
  i.e. array axis x (last) runs from the patient's right to left, y from anterior to posterior,
  and z (first) from feet to head, as `SimpleITK.DICOMOrient(image, "LPS")` gives. A feet-first
  scan, a series stored head-to-feet or with mirrored rows, and a NIfTI in RAS storage all come
  out as the same array for the same anatomy, so "below, centre, above" and left/right mean the
  same for the models and the scorer. Voxels are only permuted and flipped (never resampled);
  rotations stay in `direction`: gantry tilt up to AXIAL_TOLERANCE_DEG (beyond it a series is
  refused), in-plane rotation of any angle (each axis goes to the world axis nearest it, as
  DICOMOrient does; beyond AXIAL_TOLERANCE_DEG the volume carries a warning).
- `CTVolume.stored` keeps the input's own grid (what SimpleITK reports for the file or DICOM
  series); `write_labels` writes masks back in it, so they overlay the input exactly, and
  `read_labels` accepts label files in it (as SimpleITK exports them) or in the canonical one.
- `hu` is float32 `(z, y, x)`; `spacing_zyx_mm` is (z, y, x) with z the distance between slice
  centres (not the nominal slice thickness; under gantry tilt the distance between consecutive
  positions, as SimpleITK reads the series); `origin_xyz_mm` and
  `direction` are in SimpleITK conventions (world LPS) for the canonical array.
- SimpleITK orders spacing (x, y, z); it is converted once, in `image_files`, nowhere else.
- DICOM slices are sorted by position along the slice normal `cross(row, col) . ImagePositionPatient`,
  increasing, as ITK/GDCM's series reader orders them, before the canonical reorientation; file
  names and InstanceNumber are ignored.
- Of several series in a folder, the one whose slice thickness is closest to 3 mm is read
  (calcium scoring is defined on 3 mm reconstructions), then the one with the most slices;
  `read_study(path, series=...)` picks one by SeriesNumber or SeriesInstanceUID.

Bad input raises `StudyReadError` (image) or `LabelError` (labels) whose message names the file
or folder and the problem; the CLI prints it as one line.

ECG gating (`StudyMetadata.ecg_gated`, `protocol`) follows the header rules listed in the
`data_pipeline.io.dicom` docstring.

Modules (this package re-exports their public API, so `from data_pipeline.io import read_study`
and `data_pipeline.io.CTVolume` are the names to use):
- `volume`: `CTVolume`, `StudyMetadata`, `StoredGeometry` (the in-memory study and its grids).
- `readers`: `read_study`, `read_labels`, and the label value and geometry checks.
- `writers`: `write_labels`, `write_volume`, `write_dicom_series` (atomic writes).
- `dicom`: DICOM folders and files with pydicom (series choice, slice checks, rescale, gating).
- `image_files`: NIfTI, MetaImage and NRRD with SimpleITK, with payload length checks.
- `orientation`: the canonical (LPS) reorientation and the axial check.
"""

from data_pipeline.io.dicom import (
    CT_IMAGE_STORAGE,
    DUPLICATE_MM,
    GAP_FACTOR,
    HU_RANGE,
    MAX_RESCALE_INTERCEPT,
    MAX_RESCALE_SLOPE,
    SCORING_THICKNESS_MM,
    SPACING_ABS_TOL_MM,
    SPACING_REL_TOL,
)
from data_pipeline.io.image_files import IMAGE_SUFFIXES
from data_pipeline.io.orientation import AXIAL_TOLERANCE_DEG
from data_pipeline.io.readers import (
    LABEL_DIRECTION_TOL,
    LABEL_ORIGIN_ABS_MM,
    LABEL_ORIGIN_VOXEL_FRACTION,
    LABEL_SPACING_REL_TOL,
    read_labels,
    read_study,
)
from data_pipeline.io.volume import CTVolume, StoredGeometry, StudyMetadata
from data_pipeline.io.writers import (
    WRITE_RESCALE_INTERCEPT,
    WRITE_SUFFIXES,
    write_dicom_series,
    write_labels,
    write_volume,
)

__all__ = [
    "AXIAL_TOLERANCE_DEG", "CT_IMAGE_STORAGE", "DUPLICATE_MM", "GAP_FACTOR", "HU_RANGE",
    "IMAGE_SUFFIXES", "LABEL_DIRECTION_TOL", "LABEL_ORIGIN_ABS_MM", "LABEL_ORIGIN_VOXEL_FRACTION",
    "LABEL_SPACING_REL_TOL", "MAX_RESCALE_INTERCEPT", "MAX_RESCALE_SLOPE", "SCORING_THICKNESS_MM",
    "SPACING_ABS_TOL_MM", "SPACING_REL_TOL", "WRITE_RESCALE_INTERCEPT", "WRITE_SUFFIXES",
    "CTVolume", "StoredGeometry", "StudyMetadata", "read_labels", "read_study",
    "write_dicom_series", "write_labels", "write_volume",
]
