"""Metal devices of the `grooved` anatomy: pacemaker/ICD leads with their generator, and sternal
wires after a sternotomy.

Neither is calcium, and neither is coronary: a reader marks them as other non-coronary
high-density material, label 7 (`plaques.LABEL_OTHER`), so the calcium model learns them as its
non-coronary class. (The dataset builder would map any unlabelled voxel at >= 130 HU to that
class anyway, but the label matters twice: slices with a label are the calcium task's positive
slices, seen every epoch, and a label keeps `render.complete_lesions` from growing a touching
coronary lesion over the metal.)

Each device is a chain of `Wire` pieces: a tube of uniform metal density around a short polyline,
cut flat at each end by a plane shared with the next piece, so consecutive pieces neither overlap
nor leave a gap and each renders in its own small patch (`render.calcification_patch`).

- Cardiac device (about 12% of patients, 6-18% rising with the age factor): a generator can
  (a titanium disc 40-52 mm across, 6-8 mm thick) in a left infraclavicular subcutaneous pocket,
  above the heart (usually outside the gated scan), and a lead of about 2 mm (conductor radius
  0.8-1.0 mm) from the can through the subclavian vein down the superior vena cava into the right
  atrium, across the tricuspid valve to the right-ventricular apex. A third of the devices are
  ICDs, whose lead carries a thicker shock coil (radius 1.4-1.7 mm) over its last 55-70 mm but
  the tip, and half of those a second coil in the superior vena cava; half of the others (and a
  third of the ICDs) have a second lead ending in the right atrial appendage.
- Sternal wires (12-25% of patients, more in the higher CAC categories, as after bypass surgery):
  5-8 loops of steel wire (radius 0.4-0.6 mm) around the sternum, 22-32 mm apart from near its
  lower end upwards, each with its twisted end pointing forwards.

Metal is rendered at 6000-10000 HU (`METAL_HU`; the image is clipped at 3071 HU like a 12-bit
scanner's), so the wires reach the clip at fine pixels and fall to some 2000 HU where partial
volume spreads them over coarse ones (the CTAC at 256 px). Metal streak artefacts are not modelled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.phantom.anatomy import Anatomy, _smooth_line, _unit
from data_pipeline.phantom.plaques import LABEL_OTHER

METAL_HU = (6000.0, 10000.0)
PIECE_MM = 8.0                 # longest piece of a wire (one render patch each)


@dataclasses.dataclass(frozen=True)
class Wire:
    """One piece of a metal device: points within `radius_mm` of the polyline `points` (world mm)
    that lie past the start plane (through points[0], normal `start_normal`) and before the end
    plane (through points[-1], normal `end_normal`); both normals point along the wire."""

    name: str
    points: np.ndarray
    radius_mm: float
    density_hu: float
    start_normal: np.ndarray
    end_normal: np.ndarray
    label: int = LABEL_OTHER
    artery: str | None = None

    @property
    def coronary(self) -> bool:
        """Never: devices are not coronary calcium."""
        return False

    @property
    def center(self) -> np.ndarray:
        """Mean of the piece's points (world mm)."""
        return self.points.mean(axis=0)


def wire_pieces(name: str, points: np.ndarray, radii, density_hu: float,
                closed: bool = False) -> list[Wire]:
    """A polyline (resampled finely) as `Wire` pieces at most PIECE_MM long, split where the
    radius changes; `radii` is one radius per segment (or a scalar). `closed`: the last point
    meets the first (a loop), and the two share a cut plane there."""
    points = np.asarray(points, dtype=np.float64)
    seg = np.diff(points, axis=0)
    tangents = seg / np.linalg.norm(seg, axis=1, keepdims=True)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(seg),))
    # Cut-plane normal at each point: the mean of the tangents on either side.
    normals = np.empty_like(points)
    normals[1:-1] = tangents[:-1] + tangents[1:]
    if closed:
        normals[0] = normals[-1] = tangents[-1] + tangents[0]
    else:
        normals[0], normals[-1] = tangents[0], tangents[-1]
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    pieces = []
    start, length = 0, 0.0
    seg_len = np.linalg.norm(seg, axis=1)
    for i in range(len(seg)):
        length += seg_len[i]
        last = i == len(seg) - 1
        if last or length >= PIECE_MM or radii[i + 1] != radii[i]:
            pieces.append(Wire(name, points[start:i + 2].copy(), float(radii[i]), float(density_hu),
                               normals[start].copy(), normals[i + 1].copy()))
            start, length = i + 1, 0.0
    return pieces


def device_wires(anatomy: Anatomy, category: int, rng: np.random.Generator) -> list[Wire]:
    """The patient's metal devices (possibly none), as `Wire` pieces labelled 7."""
    out: list[Wire] = []
    if rng.uniform() < 0.06 + 0.12 * anatomy.age_factor:
        out += _cardiac_device(anatomy, rng)
    if rng.uniform() < (0.12, 0.15, 0.2, 0.25)[category]:
        out += _sternal_wires(anatomy, rng)
    return out


def _cardiac_device(anat: Anatomy, rng: np.random.Generator) -> list[Wire]:
    u = rng.uniform
    heart = anat.heart
    svc = next(v for v in anat.vessels if v.name == "superior vena cava")
    svc_x, svc_y, svc_low = (float(c) for c in svc.points[0])
    arch_top = float(anat.aorta.points[:, 2].max())
    density = u(*METAL_HU)
    # Generator can: a disc under the skin of the left upper chest, facing forwards.
    a, b = anat.body_axes
    can_x = u(55.0, 85.0)
    skin_y = anat.body_y0 - b * (1.0 - abs(can_x / a) ** anat.body_power) ** (1.0 / anat.body_power)
    half = u(3.0, 4.0)
    can = np.array([can_x, skin_y + anat.skin_mm + half + u(1.0, 4.0), arch_top + u(15.0, 50.0)])
    axis = _unit([u(-0.2, 0.2), -1.0, u(-0.2, 0.2)])
    out = wire_pieces("generator can", np.array([can - axis * half, can + axis * half]),
                      u(20.0, 26.0), u(*METAL_HU))
    icd = u() < 1 / 3
    radius = u(0.8, 1.0)

    def chamber(cavity, fractions):
        centre, semi = cavity
        jitter = np.array([u(-0.08, 0.08) for _ in range(3)])
        return heart.to_world(*(centre + semi * (np.asarray(fractions) + jitter)))

    # From the can's header through the subclavian vein into the superior vena cava.
    vein = [can + np.array([-u(15.0, 22.0), 0.0, u(5.0, 10.0)]),
            np.array([u(25.0, 45.0), svc_y - u(5.0, 15.0), arch_top + u(25.0, 40.0)]),
            np.array([svc_x + u(2.0, 6.0), svc_y - u(0.0, 4.0), arch_top + u(5.0, 15.0)]),
            np.array([svc_x, svc_y, svc_low + u(25.0, 40.0)]),
            np.array([svc_x, svc_y, svc_low + u(0.0, 8.0)])]
    # Right atrium, tricuspid valve, right ventricle to its apex.
    heart_path = [chamber(anat.atria, (0.1, 0.3, -0.55)), chamber(anat.rv_cavity, (-0.75, -0.2, -0.2)),
                  chamber(anat.rv_cavity, (0.1, 0.0, 0.0)), chamber(anat.rv_cavity, (0.8, -0.1, 0.1))]
    rv_lead = _smooth_line("lead", np.array(vein + heart_path), np.full(len(vein) + 4, radius),
                           step=1.0)
    pts = rv_lead.points
    radii = np.full(len(pts) - 1, radius)
    if icd:   # shock coils: the right-ventricular one, and sometimes one in the vena cava
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        mid = 0.5 * (arc[:-1] + arc[1:])
        coil = u(1.4, 1.7)
        radii[(mid > arc[-1] - u(55.0, 70.0)) & (mid < arc[-1] - 10.0)] = coil
        if u() < 0.5:
            in_svc = (pts[:-1, 2] > svc_low + 5.0) & (pts[:-1, 2] < svc_low + 70.0)
            radii[in_svc & (np.abs(pts[:-1, 0] - svc_x) < 6.0)] = coil
    out += wire_pieces("ICD lead" if icd else "pacing lead", pts, radii, density)
    if u() < (1 / 3 if icd else 0.5):
        # Atrial lead: beside the first down the vein, then a J into the right atrial appendage.
        shift = np.array([u(2.5, 3.5), u(1.5, 2.5), 0.0])
        ctrl = [p + shift for p in vein] + [chamber(anat.atria, (0.35, 0.2, -0.5)),
                                            chamber(anat.atria, (-0.1, 0.55, -0.35))]
        atrial = _smooth_line("atrial lead", np.array(ctrl), np.full(len(ctrl), radius), step=1.0)
        out += wire_pieces("atrial lead", atrial.points, radius, density)
    return out


def _sternal_wires(anat: Anatomy, rng: np.random.Generator) -> list[Wire]:
    u = rng.uniform
    sa, sb = anat.sternum_axes
    y_c = -(anat.cavity_axes[1] + sb + 1.0)      # the sternum's centre (tissues._static_maps)
    out: list[Wire] = []
    z = anat.sternum_z[0] + u(8.0, 18.0)
    spacing = u(22.0, 32.0)
    angles = np.linspace(0.0, 2 * np.pi, 73)
    for _ in range(int(rng.integers(5, 9))):
        radius, gap, tilt = u(0.4, 0.6), u(1.5, 3.0), u(-0.15, 0.15)
        x = (sa + gap) * np.cos(angles)
        ring = np.stack([x, y_c + (sb + gap) * np.sin(angles), z + tilt * x], axis=1)
        ring[-1] = ring[0]
        density = u(*METAL_HU)
        out += wire_pieces("sternal wire", ring, radius, density, closed=True)
        front = np.array([0.0, y_c - (sb + gap) - radius, z])
        twist = np.array([front, front + [u(-1.5, 1.5), -u(4.0, 7.0), u(-1.0, 1.0)]])
        out += wire_pieces("sternal wire", twist, 1.3 * radius, density)
        z += spacing + u(-3.0, 3.0)
    return out
