"""A scored study as DICOM: a Segmentation and a TID 1500 measurement report (docs/clinical.md).

For a study read from a DICOM series, `write_dicom_outputs` writes next to the other outputs:

- `<name>.seg.dcm`: a binary DICOM Segmentation (highdicom) of the source series with three
  segments, 1 the coronary calcium that was scored (label 4 of `--save-masks`), 2 the
  non-coronary calcium (label 5) and 3 the heart (the heart mask), each frame derived from its
  source slice (same frame of reference, every source image referenced), with the algorithm
  identification (name, version, the checkpoint's model and step) on each segment;
- `<name>.sr.dcm`: a Comprehensive 3D SR holding a TID 1500 measurement report: the total
  Agatston score, calcium volume and (when calibrated) mass with the CAC category, referencing
  segment 1 of the Segmentation; a group per artery where the artery is known; a group per lesion
  referencing its source slice; the algorithm identification in every group.

Masks are held by inference in the canonical orientation (`data_pipeline.io` module docstring);
here they go back to the series' stored order (`CTVolume.stored_geometry.to_stored`), whose
slices are the series' files sorted along the slice normal, so frame k of the Segmentation lies on
the k-th source image. A series stored as one Enhanced CT file (`data_pipeline.io.enhanced`) is
referenced frame by frame: the Segmentation's frames follow the file's frames, and each lesion
group names its frame. `segment_masks` reads a Segmentation back into the canonical orientation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.errors import InputError

CORONARY_LABEL = 4        # scored coronary calcium in `StudyResult.calcium_labels`
NON_CORONARY_LABEL = 5    # non-coronary calcium
SEGMENTS = {1: "coronary calcium (scored)", 2: "non-coronary calcium", 3: "heart"}
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
MANUFACTURER = "cac-jax"
# Private coding scheme for the CAC category, which has no standard code.
PRIVATE_SCHEME = "99CACJAX"
_ARTERY_CODES = {"LAD": ("59438005", "Left Anterior Descending Coronary Artery"),
                 "LCX": ("57396003", "Circumflex Coronary Artery"),
                 "RCA": ("13647002", "Right Coronary Artery")}


def category_code(name: str) -> str:
    """The private code of a CAC category, from its range, so one code means one range in both
    the four- and the five-category scheme: "0" -> CAC-0, "1-100" -> CAC-1-100,
    ">400" -> CAC-GT400."""
    return "CAC-" + name.replace(">", "GT")


class DicomOutputError(InputError):
    """The source series of a study cannot be referenced (files gone or changed since reading)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What identifies one trained model in the outputs."""

    role: str       # "heart" | "calcium"
    arch: str       # e.g. "unet", "convlstm"
    path: str       # checkpoint folder
    step: int

    @classmethod
    def of(cls, trained, role: str) -> ModelInfo:
        """From a `cac_jax.checkpoints.TrainedModel` (or an object with its fields)."""
        config = trained.config
        arch = str(config.model.arch) if "model" in config else "unknown"
        return cls(role, arch, str(getattr(trained, "path", "")),
                   int(getattr(trained, "step", 0) or 0))


def is_dicom_study(volume) -> bool:
    """Whether `volume` was read from a DICOM series (so it can be referenced)."""
    return bool(volume.metadata.series_uid)


@dataclasses.dataclass(frozen=True)
class SourceSlice:
    """One stored slice of a scored series: its file's header (no pixels) and, in a multi-frame
    (Enhanced CT) file, its 1-based frame number (None for a classic slice file)."""

    dataset: object
    frame: int | None
    position: tuple
    orientation: tuple


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the
# new objects copy from their source: de-identification tools often delete them rather than
# leave them empty, and highdicom reads each one.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _images(slices: Sequence[SourceSlice]) -> list:
    """The distinct files' headers of `slices`, in order."""
    seen, out = set(), []
    for s in slices:
        if id(s.dataset) not in seen:
            seen.add(id(s.dataset))
            out.append(s.dataset)
    return out


def source_datasets(volume) -> list[SourceSlice]:
    """The slices of `volume`'s source series (file headers, no pixels; frames of an Enhanced CT
    file), in the stored slice order (sorted along the slice normal, as
    `data_pipeline.io.read_study` sorts them). Type 2 attributes the outputs copy and a header
    lacks are set empty on the header read here (the files are not touched).

    Raises DicomOutputError when the files no longer match the volume (count or size)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from data_pipeline.io.dicom import list_files, set_apart
    from data_pipeline.io.enhanced import frames, is_enhanced_ct

    source = Path(volume.metadata.source)
    # The files the reader looked at (linked subfolders included, hidden files not).
    files = list_files(source, DicomOutputError) if source.is_dir() else [source]
    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError):
            continue  # not a DICOM file: folders hold other files too (read_study skips them)
        except OSError as err:
            raise DicomOutputError(path, f"cannot read the source image: {err}") from err
        if str(ds.get("SeriesInstanceUID", "")) != volume.metadata.series_uid or set_apart(ds):
            continue  # another series, or a localizer the reader set apart from this one
        for keyword in _TYPE2_COPIED:  # this header is read here for the outputs alone
            if keyword not in ds:
                setattr(ds, keyword, "")
        if is_enhanced_ct(ds):
            found = frames(path, ds, DicomOutputError)
            if len({key for key, _ in found}) > 1:
                raise DicomOutputError(path, "holds frames of several stacks (StackID); DICOM "
                                             "outputs are made for single-stack files only")
            datasets += [SourceSlice(ds, k, tuple(frame.ImagePositionPatient),
                                     tuple(frame.ImageOrientationPatient))
                         for k, (_, frame) in enumerate(found, 1)
                         if "ImagePositionPatient" in frame]  # (a file read_study skipped)
        elif "ImagePositionPatient" in ds:
            datasets.append(SourceSlice(ds, None, tuple(ds.ImagePositionPatient),
                                        tuple(ds.ImageOrientationPatient)))
    stored = volume.stored_geometry
    if len(datasets) != stored.shape[0]:
        raise DicomOutputError(source, f"series {volume.metadata.series_uid} now has "
                                       f"{len(datasets)} images, {stored.shape[0]} were scored")
    orientation = np.asarray([float(v) for v in datasets[0].orientation])
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(normal, [float(v) for v in s.position])) for s in datasets]
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    first = datasets[0].dataset
    if (int(first.Rows), int(first.Columns)) != tuple(stored.shape[1:]):
        raise DicomOutputError(source, "the source images' size differs from the scored volume")
    if any(s.frame is not None for s in datasets) and len(_images(datasets)) > 1:
        raise DicomOutputError(source, f"series {volume.metadata.series_uid} spans "
                                       f"{len(_images(datasets))} files with multi-frame images; "
                                       "a Segmentation references one multi-frame source")
    return datasets


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    # Deterministic: scoring the same series with the same models again gives the same UIDs, so
    # a second push replaces the instances instead of adding copies.
    return str(generate_uid(entropy_srcs=[MANUFACTURER, *map(str, parts)]))


def _model_key(model: ModelInfo) -> tuple:
    """A model as the UIDs see it: not its folder, so the same model elsewhere gives the same."""
    return model.role, model.arch, _model_name(model), model.step


def _model_name(model: ModelInfo) -> str:
    """The model's folder name (the outputs go to PACS: no local path); for a step folder
    (`RUN/checkpoints/30`) the run's."""
    if not model.path:
        return model.arch
    path = Path(model.path)
    if path.name.isdigit() and path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name
    return path.name


def _content_digest(result) -> str:
    """What the SEG and SR say about a study: the masks, the score and its category (the
    category scheme changes with --five-class), so different content never shares a UID."""
    import hashlib

    digest = hashlib.sha256()
    for array in (result.calcium_labels, result.heart_mask):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    score = result.score
    digest.update(repr((score.agatston, score.volume_mm3, score.mass_mg, score.category,
                        score.category_name, len(score.lesions))).encode())
    return digest.hexdigest()


def _algorithm(model: ModelInfo):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from cac_jax import __version__

    return hd.AlgorithmIdentificationSequence(
        name=f"cac-jax {model.role} model ({model.arch})",
        family=codes.cid7162.ArtificialIntelligence, version=__version__,
        source=MANUFACTURER, parameters={"model": _model_name(model),
                                         "step": str(model.step)})


def build_segmentation(volume, result, sources: Sequence[SourceSlice], heart: ModelInfo,
                       calcium: ModelInfo):
    """The highdicom Segmentation of `result` (a `cac_jax.inference.StudyResult`) on the source
    slices `sources` (`source_datasets`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from cac_jax import __version__

    stored = volume.stored_geometry
    labels = stored.to_stored(np.asarray(result.calcium_labels))
    # Coronary: 1-4 (the arteries, or undetermined: the model's CORONARY_LABEL); non-coronary:
    # NON_CORONARY_LABEL and above (docs/contracts.md).
    masks = np.stack([(labels >= 1) & (labels <= CORONARY_LABEL), labels >= NON_CORONARY_LABEL,
                      stored.to_stored(np.asarray(result.heart_mask).astype(bool))], axis=-1)
    if sources[0].frame is not None:  # one multi-frame source: its frames in the file's order
        in_file = np.zeros_like(masks)
        for k, s in enumerate(sources):
            in_file[s.frame - 1] = masks[k]
        masks = in_file
    calcium_alg, heart_alg = _algorithm(calcium), _algorithm(heart)
    calcification = codes.SCT.PathologicCalcification
    descriptions = [
        hd.seg.SegmentDescription(
            1, SEGMENTS[1], codes.SCT.MorphologicallyAbnormalStructure, calcification,
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, calcium_alg,
            tracking_uid=_uid("segment", 1), tracking_id="coronary calcium",
            anatomic_regions=[codes.SCT.CoronaryArtery]),
        hd.seg.SegmentDescription(
            2, SEGMENTS[2], codes.SCT.MorphologicallyAbnormalStructure, calcification,
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, calcium_alg,
            tracking_uid=_uid("segment", 2), tracking_id="non-coronary calcium"),
        hd.seg.SegmentDescription(
            3, SEGMENTS[3], codes.SCT.AnatomicalStructure, codes.SCT.Heart,
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, heart_alg,
            tracking_uid=_uid("segment", 3), tracking_id="heart"),
    ]
    key = (volume.metadata.series_uid, _model_key(heart), _model_key(calcium), __version__,
           _content_digest(result))
    return hd.seg.Segmentation(
        source_images=_images(sources), pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=_uid("seg-series", *key),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=_uid("seg", *key), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=f"{heart.arch}+{calcium.arch}",
        software_versions=__version__, device_serial_number="0",
        series_description="cac-jax calcium and heart", content_label="CACJAX",
        content_description="coronary calcium, non-coronary calcium, heart",
        omit_empty_frames=bool(masks.any()))


def _ucum(code: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(code, "UCUM", meaning)


def _score_measurements(agatston: float, volume_mm3: float | None, mass_mg: float | None,
                        area_mm2: float | None = None) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = [hd.sr.Measurement(codes.SCT.CoronaryArteryCalciumScore, float(agatston),
                             _ucum("1", "no units"))]
    if volume_mm3 is not None:
        out.append(hd.sr.Measurement(codes.DCM.CalciumVolume, float(volume_mm3),
                                     _ucum("mm3", "cubic millimeter")))
    if mass_mg is not None:
        out.append(hd.sr.Measurement(codes.DCM.CalciumMass, float(mass_mg),
                                     _ucum("mg", "milligram")))
    if area_mm2 is not None:
        out.append(hd.sr.Measurement(codes.SCT.Area, float(area_mm2),
                                     _ucum("mm2", "square millimeter")))
    return out


def _stored_slice(volume, z: int) -> int | None:
    """The stored (source image) index of canonical slice z; None if the axes were swapped."""
    stored = volume.stored_geometry
    if stored.axes[0] != 0:
        return None
    return stored.shape[0] - 1 - z if stored.flips[0] else z


def build_report(volume, result, sources: Sequence[SourceSlice], seg, heart: ModelInfo,
                 calcium: ModelInfo):
    """The Comprehensive 3D SR (TID 1500) of `result`, referencing `seg` and `sources`."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from cac_jax import __version__

    score = result.score
    algorithm = hd.sr.AlgorithmIdentification(
        name="cac-jax", version=__version__,
        parameters=[f"{m.role} model {m.arch} {_model_name(m)} step {m.step}"
                    for m in (heart, calcium)])
    method = codes.DCM.AgatstonScoringMethod
    finding = codes.SCT.PathologicCalcification
    category = hd.sr.QualitativeEvaluation(
        hd.sr.CodedConcept("CAC-CATEGORY", PRIVATE_SCHEME, "CAC category"),
        hd.sr.CodedConcept(category_code(score.category_name), PRIVATE_SCHEME,
                           score.category_name))
    groups = [hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(_uid("total", seg.SOPInstanceUID),
                                                     "coronary calcium total"),
        referenced_segment=hd.sr.ReferencedSegment(
            seg.SOPClassUID, seg.SOPInstanceUID, 1,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.metadata.series_uid)),
        finding_type=finding, method=method, algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.CoronaryArtery)],
        measurements=_score_measurements(score.agatston, score.volume_mm3, score.mass_mg),
        qualitative_evaluations=[category])]
    known = {lesion.artery for lesion in score.lesions} & set(_ARTERY_CODES)
    for artery in sorted(known):
        lesions = [lesion for lesion in score.lesions if lesion.artery == artery]
        masses = [lesion.mass_mg for lesion in lesions]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(_uid("artery", seg.SOPInstanceUID,
                                                              artery), f"{artery} total"),
            finding_type=finding, method=method, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(hd.sr.CodedConcept(*_ARTERY_CODES[artery][:1],
                                                                "SCT", _ARTERY_CODES[artery][1]))],
            measurements=_score_measurements(
                score.per_artery[artery], sum(les.volume_mm3 for les in lesions),
                None if any(m is None for m in masses) else sum(masses))))
    for k, lesion in enumerate(score.lesions, start=1):
        site = (hd.sr.CodedConcept(_ARTERY_CODES[lesion.artery][0], "SCT",
                                   _ARTERY_CODES[lesion.artery][1])
                if lesion.artery in _ARTERY_CODES else codes.SCT.CoronaryArtery)
        index = _stored_slice(volume, lesion.slice_index)
        images = (None if index is None else
                  [hd.sr.SourceImageForMeasurementGroup.from_source_image(
                      sources[index].dataset, None if sources[index].frame is None else
                      [sources[index].frame])])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(_uid("lesion", seg.SOPInstanceUID, k),
                                                         f"lesion {k}"),
            finding_type=finding, method=method, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(site)], source_images=images,
            measurements=_score_measurements(lesion.agatston, lesion.volume_mm3, lesion.mass_mg,
                                             lesion.area_mm2)))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device"), name="cac-jax", manufacturer_name=MANUFACTURER,
            model_name=f"{heart.arch}+{calcium.arch}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.CardiacCTForCalciumScoring, imaging_measurements=groups)
    key = (seg.SOPInstanceUID,)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*_images(sources), seg], content=report,
        series_instance_uid=_uid("sr-series", *key),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=_uid("sr", *key), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description="cac-jax calcium score")
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "cac-jax CAC categories"
    scheme.CodingSchemeResponsibleOrganization = "cac-jax"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def write_dicom_outputs(out: str | os.PathLike, name: str, volume, result, heart: ModelInfo,
                        calcium: ModelInfo) -> tuple[Path, Path]:
    """Writes `<name>.seg.dcm` and `<name>.sr.dcm` in `out` (atomically); returns their paths.

    `volume` must come from a DICOM series (`is_dicom_study`)."""
    from data_pipeline.atomic import atomic_path

    if not is_dicom_study(volume):
        raise ValueError(f"{volume.metadata.source}: not read from DICOM")
    sources = source_datasets(volume)
    seg = build_segmentation(volume, result, sources, heart, calcium)
    sr = build_report(volume, result, sources, seg, heart, calcium)
    paths = Path(out) / f"{name}.seg.dcm", Path(out) / f"{name}.sr.dcm"
    for dataset, path in zip((seg, sr), paths, strict=True):
        with atomic_path(path) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
    return paths


def segment_masks(seg_path: str | os.PathLike, volume) -> dict[int, np.ndarray]:
    """A Segmentation written by `write_dicom_outputs`, read back: {segment number: bool mask}
    in `volume`'s canonical orientation (frames located by their source images, or source
    frames of an Enhanced CT file)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    sources = source_datasets(volume)
    stored = volume.stored_geometry
    if sources[0].frame is None:
        pixels = seg.get_pixels_by_source_instance(
            [str(s.dataset.SOPInstanceUID) for s in sources], segment_numbers=list(SEGMENTS),
            assert_missing_frames_are_empty=True)
    else:
        pixels = seg.get_pixels_by_source_frame(
            str(sources[0].dataset.SOPInstanceUID), [s.frame for s in sources],
            segment_numbers=list(SEGMENTS), assert_missing_frames_are_empty=True)
    return {number: stored.to_canonical(pixels[..., k] > 0)
            for k, number in enumerate(SEGMENTS)}


def report_measurements(sr_path: str | os.PathLike) -> dict[str, float]:
    """The total group's measurements of an SR written here: {concept meaning: value}."""
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    if not groups:
        raise InputError(sr_path, "has no volumetric measurement group")
    return {m.name.meaning: float(m.value) for m in groups[0].get_measurements()}


def after_study_writer(scorer, log=None, push=None):
    """The `run_batch(after_study=...)` hook of `cac-jax infer --dicom`: writes the Segmentation
    and the SR of a study read from DICOM (and hands both to `push(study, paths)` when given);
    for any other study logs one line that no DICOM output is made."""
    heart, calcium = ModelInfo.of(scorer.heart, "heart"), ModelInfo.of(scorer.calcium, "calcium")

    def after_study(out, name, study, volume, result) -> None:
        if not is_dicom_study(volume):
            if log is not None:
                log(f"note: {study.scan_id}: not read from DICOM ({volume.metadata.source}), "
                    "so no DICOM Segmentation or SR is made")
            return
        paths = write_dicom_outputs(out, name, volume, result, heart, calcium)
        if push is not None:
            push(study, paths)

    def expected(out, name, study) -> list[Path]:
        """The files `after_study` writes for a DICOM study (a folder, or a file that is not
        one of the image formats), so a rerun can say which ones an earlier run left out."""
        from data_pipeline.io.image_files import IMAGE_SUFFIXES

        image = Path(study.image)
        if not image.is_dir() and image.name.lower().endswith(IMAGE_SUFFIXES):
            return []
        return [Path(out) / f"{name}.seg.dcm", Path(out) / f"{name}.sr.dcm"]

    after_study.expected = expected
    return after_study
