"""Calcifications of the synthetic cohort: coronary plaques and non-coronary calcium.

Each calcification is an ellipsoid with a peak density (HU) that falls off slightly from its core,
placed in world mm on the patient's anatomy, so every protocol renders the same calcium.

Labels (the team's label map): 1 LAD (including the left main), 2 LCX, 3 RCA (orCaScore
convention), 5 aortic-wall calcium, 6 valve calcium (aortic valve and mitral annulus), 7 other
non-coronary calcium (costal cartilage; the grooved anatomy's metal devices use it too,
`devices`). Bone (spine, ribs, sternum) is not labelled: the dataset
builder already maps any unlabelled voxel at HU >= 130 to the non-coronary class.

Coronary plaques are drawn as an ordered list of candidates whose sizes suit the patient's target
CAC category; `cohort.design_plaques` takes a prefix of that list (and may shrink its last plaque)
until the gated scan's measured Agatston score falls in the target category.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.phantom.anatomy import ARTERY_LABEL, Anatomy, _unit, rib_point

LABEL_AORTA = 5
LABEL_VALVE = 6
LABEL_OTHER = 7

# Target Agatston ranges per category (log-uniform), kept away from the class borders 1, 100
# and 400 so that the design loop rarely has to fine-tune.
TARGET_RANGES = {1: (4.0, 70.0), 2: (140.0, 330.0), 3: (550.0, 2000.0)}
# Plaque size and density ranges per category: half length along the vessel (mm), cross-section
# radius (mm), peak density (HU). Larger, denser plaques for higher categories.
_PLAQUE_SIZES = {1: ((0.8, 3.0), (0.5, 1.3), (220.0, 700.0)),
                 2: ((1.5, 5.0), (0.8, 2.0), (250.0, 900.0)),
                 3: ((2.0, 7.0), (1.1, 2.3), (300.0, 1100.0))}
# Share of plaques per artery (LAD dominant; Agatston per-artery distributions in screening
# cohorts put about half of the score in the LAD).
_ARTERY_WEIGHTS = {"LM": 0.06, "LAD": 0.44, "LCX": 0.2, "RCA": 0.3}


@dataclasses.dataclass(frozen=True)
class Calcification:
    """One calcified ellipsoid in world mm."""

    label: int                 # label-map value (1-3 coronary, 5 aorta, 6 valve, 7 other)
    artery: str | None         # "LM", "LAD", "LCX", "RCA" for coronary plaques
    center: np.ndarray         # (3,) world mm
    axes: np.ndarray           # (3, 3): columns are the ellipsoid's axes in world coordinates
    half_mm: np.ndarray        # (3,) semi-axes
    density_hu: float          # peak density at the core

    @property
    def coronary(self) -> bool:
        """True for plaques in a coronary artery (labels 1-3)."""
        return self.label in (1, 2, 3)

    def scaled(self, factor: float) -> Calcification:
        """The same plaque with all semi-axes times `factor`."""
        return dataclasses.replace(self, half_mm=self.half_mm * factor)


def _frame(tangent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An orthonormal frame whose first axis is `tangent`, rotated randomly about it."""
    t = _unit(tangent)
    helper = np.array([0.0, 0.0, 1.0]) if abs(t[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    n1 = _unit(np.cross(t, helper))
    n2 = np.cross(t, n1)
    a = rng.uniform(0, 2 * np.pi)
    n1, n2 = np.cos(a) * n1 + np.sin(a) * n2, -np.sin(a) * n1 + np.cos(a) * n2
    return np.stack([t, n1, n2], axis=1)


def target_score(category: int, rng: np.random.Generator) -> float:
    """A target Agatston score inside `category` (0 for category 0)."""
    if category == 0:
        return 0.0
    lo, hi = TARGET_RANGES[category]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def coronary_candidates(anatomy: Anatomy, category: int, rng: np.random.Generator,
                        count: int = 80) -> list[Calcification]:
    """An ordered list of candidate coronary plaques for a patient of target `category`."""
    if category == 0:
        return []
    (len_lo, len_hi), (rad_lo, rad_hi), (hu_lo, hu_hi) = _PLAQUE_SIZES[category]
    names = list(_ARTERY_WEIGHTS)
    weights = np.array([_ARTERY_WEIGHTS[n] for n in names])
    plaques = []
    for _ in range(count):
        artery = names[rng.choice(len(names), p=weights / weights.sum())]
        line = anatomy.coronaries[artery]
        # Proximal segments calcify more often than distal ones.
        fraction = rng.beta(1.4, 2.4) if artery != "LM" else rng.uniform(0.2, 0.9)
        point, tangent, vessel_r = line.at(0.03 + 0.85 * fraction)
        frame = _frame(tangent, rng)
        radius = rng.uniform(rad_lo, rad_hi)
        # Eccentric: the plaque sits in the vessel wall, off the centreline.
        center = point + frame[:, 1] * rng.uniform(0.0, 0.5) * vessel_r
        half = np.array([rng.uniform(len_lo, len_hi), radius, radius * rng.uniform(0.6, 1.0)])
        plaques.append(Calcification(ARTERY_LABEL[artery], artery, center, frame, half,
                                     float(rng.uniform(hu_lo, hu_hi))))
    return plaques


def noncoronary_calcifications(anatomy: Anatomy, category: int,
                               rng: np.random.Generator) -> list[Calcification]:
    """Aortic-wall, aortic-valve, mitral-annulus and costal-cartilage calcium for one patient.

    Prevalence rises with the coronary category and the patient's age factor, as aortic and valve
    calcium go with coronary calcium in screening cohorts.
    """
    age = anatomy.age_factor
    out: list[Calcification] = []
    # Aortic wall (label 5): plates on the wall, more often on the arch and descending aorta.
    if rng.uniform() < (0.15, 0.45, 0.65, 0.85)[category] * (0.6 + 0.6 * age):
        line = anatomy.aorta
        for _ in range(rng.integers(1, 4 + 5 * category)):
            frac = rng.uniform(0.0, 1.0) ** 0.7
            point, tangent, radius = line.at(frac)
            frame = _frame(tangent, rng)
            normal = frame[:, 1]
            center = point + normal * (radius - rng.uniform(0.3, 1.2))
            axes = np.stack([frame[:, 0], frame[:, 2], normal], axis=1)
            half = np.array([rng.uniform(1.5, 7.0), rng.uniform(1.5, 5.0), rng.uniform(0.6, 1.4)])
            out.append(Calcification(LABEL_AORTA, None, center, axes, half,
                                     float(rng.uniform(300, 1000))))
    # Aortic valve (label 6): blobs on the valve ring at the root.
    if rng.uniform() < (0.05, 0.25, 0.4, 0.6)[category] * (0.6 + 0.6 * age):
        axis = anatomy.aortic_root_axis
        frame = _frame(axis, rng)
        for _ in range(rng.integers(1, 5)):
            a = rng.uniform(0, 2 * np.pi)
            radial = np.cos(a) * frame[:, 1] + np.sin(a) * frame[:, 2]
            center = anatomy.aortic_root + radial * rng.uniform(5, 10) + axis * rng.uniform(-3, 3)
            half = np.array([rng.uniform(1.5, 4.0), rng.uniform(1.0, 3.0), rng.uniform(1.0, 2.5)])
            out.append(Calcification(LABEL_VALVE, None, center, _frame(radial, rng), half,
                                     float(rng.uniform(300, 900))))
    # Mitral annulus (label 6): a C-shaped chain of nodules on the annulus ring.
    if rng.uniform() < (0.03, 0.1, 0.2, 0.35)[category] * (0.6 + 0.6 * age):
        frame = anatomy.heart.frame
        start = rng.uniform(0, 2 * np.pi)
        span = rng.uniform(np.pi / 3, 1.2 * np.pi)
        for a in np.arange(start, start + span, 3.0 / anatomy.mitral_radius_mm):
            radial = np.cos(a) * frame[:, 1] + np.sin(a) * frame[:, 2]
            tangent = -np.sin(a) * frame[:, 1] + np.cos(a) * frame[:, 2]
            center = anatomy.mitral_center + radial * anatomy.mitral_radius_mm
            half = np.array([rng.uniform(1.8, 2.6), rng.uniform(1.2, 2.5), rng.uniform(1.2, 2.2)])
            out.append(Calcification(LABEL_VALVE, None, center, _frame(tangent, rng), half,
                                     float(rng.uniform(300, 800))))
    # Costal cartilage (label 7): nodules in the cartilage between rib ends and sternum.
    if rng.uniform() < 0.25 + 0.6 * age:
        for _ in range(rng.integers(1, 12)):
            k = int(rng.integers(0, len(anatomy.rib_z)))
            alpha = rng.uniform(anatomy.rib_end_alpha[k], anatomy.cartilage_end_alpha[k])
            side = 1.0 if rng.uniform() < 0.5 else -1.0
            center = rib_point(anatomy, k, alpha, side)
            half = np.array([rng.uniform(1.0, 3.5), rng.uniform(1.0, 2.5), rng.uniform(1.0, 2.5)])
            out.append(Calcification(LABEL_OTHER, None, center, _frame([1.0, 0, 0], rng), half,
                                     float(rng.uniform(250, 700))))
    return out
