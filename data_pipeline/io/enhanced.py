"""Enhanced CT (multi-frame) DICOM files read as classic CT slices.

An Enhanced CT Image (1.2.840.10008.5.1.4.1.1.2.1) or Legacy Converted Enhanced CT Image (...2.2)
holds a whole series in one file: the frames' pixels in one PixelData, each frame's geometry and
rescale in functional groups (DICOM PS3.3 C.7.6.16), per frame or shared by all. `frames()` turns
such a file into one header per frame, holding what a classic CT slice holds at its top level
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, RescaleSlope,
RescaleIntercept, RescaleType, KVP, the nominal cardiac phase and trigger delay; and a legacy
conversion's unassigned attributes), so the series is chosen, checked and decoded by the same code
as a classic series (`data_pipeline.io.dicom`). Pixel data is decoded only for the chosen series,
one frame at a time (`frame_pixels`).

Frames of several stacks (FrameContentSequence StackID, e.g. two reconstructions in one file) are
separate series, named `SeriesInstanceUID/stack ID`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels

from data_pipeline.errors import InputError

ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
               "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage"}

# Top-level elements a frame header does not copy: the pixels (decoded from the file per frame)
# and the multi-frame structure itself.
_NOT_COPIED = {"PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames",
               "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
               "DimensionIndexSequence", "DimensionOrganizationSequence"}
# (functional group sequence, attribute in its item) -> the classic slice's top-level attribute.
_FROM_GROUPS = (
    ("PlanePositionSequence", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness"),
    ("PixelValueTransformationSequence", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept"),
    ("PixelValueTransformationSequence", "RescaleType"),
    ("CTXRayDetailsSequence", "KVP"),
    # ECG gating (`data_pipeline.io.dicom`'s rule 3) where the file has no top-level marker.
    ("CardiacSynchronizationSequence", "NominalPercentageOfCardiacPhase"),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
)
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_FRAME = "_cac_enhanced_frame"  # a frame header's (file dataset, frame index), for the decoder


def is_enhanced_ct(ds: pydicom.Dataset) -> bool:
    return str(ds.get("SOPClassUID", "") or "") in ENHANCED_CT


def frame_path(path: Path, index: int) -> Path:
    """How a frame is named in messages: `ct.dcm [frame 3]` (1-based)."""
    return path.with_name(f"{path.name} [frame {index + 1}]")


def frames(path: Path, ds: pydicom.Dataset, error: type[InputError],
           ) -> list[tuple[str, pydicom.Dataset]]:
    """(series key, frame header) for every frame of the Enhanced CT file `path` (its dataset
    `ds`, pixel data not yet read or not read at all), in the file's order. Raises (naming the
    file and the frame) when some frames have their geometry and others do not; a file whose
    frames all lack it gives headers without it (a series the reader skips, as it skips classic
    files without slice geometry)."""
    count = ds.get("NumberOfFrames")
    try:
        n = int(count)
    except (TypeError, ValueError):
        raise error(path, f"malformed NumberOfFrames {count!r} in an Enhanced CT file") from None
    if n < 1:
        raise error(path, f"NumberOfFrames {n} in an Enhanced CT file: no image")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise error(path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for "
                          f"NumberOfFrames {n} (truncated or corrupt Enhanced CT file?)")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    top = pydicom.Dataset()
    for tag in ds.keys():  # tags only: reading PixelData here would load every frame
        if pydicom.datadict.keyword_for_tag(tag) not in _NOT_COPIED:
            top[tag] = ds[tag]
    uid = str(ds.get("SeriesInstanceUID", "") or "")

    def group_item(frame: pydicom.Dataset, sequence: str) -> pydicom.Dataset | None:
        for groups in (frame, shared):  # a per-frame group overrides the shared one
            if groups is not None and groups.get(sequence):
                return groups.get(sequence)[0]
        return None

    stacks = set()
    out, incomplete = [], []
    for index, frame in enumerate(per_frame):
        header = pydicom.Dataset()
        header.update(top)
        header.file_meta = ds.file_meta
        # A legacy conversion keeps the slices' other attributes (KVP among them) here.
        for groups, sequence in ((shared, "UnassignedSharedConvertedAttributesSequence"),
                                 (frame, "UnassignedPerFrameConvertedAttributesSequence")):
            if groups is not None and groups.get(sequence):
                for tag in groups.get(sequence)[0].keys():
                    if tag not in top:
                        header[tag] = groups.get(sequence)[0][tag]
        for sequence, keyword in _FROM_GROUPS:
            item = group_item(frame, sequence)
            if item is not None and keyword in item:
                header[keyword] = item[keyword]
        missing = [k for k in _REQUIRED if k not in header]
        if missing:
            incomplete.append((index, missing))
        content = group_item(frame, "FrameContentSequence")
        stack = str(content.get("StackID", "") or "") if content is not None else ""
        stacks.add(stack)
        object.__setattr__(header, _FRAME, (ds, index))
        out.append((stack, header))
    if incomplete and len(incomplete) < n:
        index, missing = incomplete[0]
        raise error(path, f"frame {index + 1} of {n} has no {', '.join(missing)} in its "
                          "functional groups (per-frame or shared), while other frames have it")
    if len(stacks) <= 1:
        return [(uid, header) for _, header in out]
    return [(f"{uid}/stack {stack or '?'}", header) for stack, header in out]


def frame_of(header: pydicom.Dataset) -> tuple[pydicom.Dataset, int] | None:
    """(the file's dataset, frame index) of a frame header made by `frames`, else None."""
    return header.__dict__.get(_FRAME)


def frame_pixels(header: pydicom.Dataset) -> np.ndarray:
    """The stored values of one frame (before rescale), decoded from its file's pixel data."""
    ds, index = frame_of(header)
    return pydicom.pixels.pixel_array(ds, index=index)
