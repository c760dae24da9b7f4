"""Synthetic cohort: paired gated CAC and ungated low-dose CTAC chest CT phantoms with ground truth.

No patient data can be fetched here, so users see the whole system work on synthetic patients
first. Each patient has one randomised anatomy (`anatomy`) and one set of calcifications
(`plaques`), imaged by two protocols (`render`): an ECG-gated calcium scan (3 mm contiguous
slices, 0.4-0.7 mm pixels at 512, noise sigma 10-25 HU, sharp) and an ungated low-dose CT for
attenuation correction (3-5 mm slices or 5 mm every 2.5 mm, about 1 mm pixels at 512, noise sigma
40-90 HU, plaques smeared by cardiac motion; the noise sigmas are those of the 512 px image, a
coarser rendering has that image's noise averaged over its larger pixels, `render.noise_sigma_at`).
The target CAC category is met on the gated scan (`cohort`); each scan's true Agatston score is
the scorer on its own image and labels.
Acquisition-site presets (`sites`: `default`, `site2`, `lowdose`, `sharp`) image a cohort as
another scanner would (field of view, slice thickness, noise, kernel sharpness, kVp), for
external-site validation sets whose patients are their own.

Ground truth per scan:
- `heart_mask` (uint8 0/1): the heart silhouette as experts draw it, i.e. the pericardial sac and
  its contents (myocardium, blood pools, epicardial fat, coronary arteries, aortic root); the
  paracardial fat outside the pericardium is not included.
- `calcium_labels` (int16): 1 LAD (including left main), 2 LCX, 3 RCA, 5 aortic-wall calcium,
  6 valve calcium (aortic valve, mitral annulus), 7 other non-coronary calcium (costal
  cartilage; metal devices of the grooved anatomy). Each calcification's label marks the voxels where it raises the noise-free image by
  >= 50 HU and the final HU is >= 130: what an expert would mark on that image, provided it can be
  seen at all: a calcification whose peak excess is below 3 noise sigmas of the scan (faint
  plaques in low-dose CTAC) adds its HU but is not labelled (`render.visible_hu`). Bone (spine, ribs,
  sternum) is deliberately left unlabelled: the dataset builder maps every unlabelled voxel at
  >= 130 HU to the non-coronary class.

Anatomy variants (`cohort.ANATOMIES`, `--anatomy`): `classic` (default, the anatomy as it has
always been drawn: uniform epicardial fat, no devices) and `grooved` (groove-dependent epicardial
fat with the coronaries on the groove floors, `anatomy.grooved_anatomy`, and metal devices:
pacemaker/ICD leads and sternal wires, `devices`); each of the first five functions below takes
`anatomy=`. CTAC imaging models (`acquisition.CTAC_IMAGING`, `--ctac-imaging`): `classic`
(default, each CTAC slice averages the coronaries over the whole cardiac cycle) and `calibrated`
(a reconstruction window of 0.3-1.0 of the cycle, half the CTAC noise; the same patients and
gated scans); `render_scan`, `render_patient` and `generate_cohort` take `ctac_imaging=`.

Public API: `render_scan` / `render_patient` (in memory), `generate_cohort` (files + manifest),
`patient_seed`, `patient_id_for`, `assign_categories`, `SyntheticScan`, `save_preview`, and the
site presets `SITES` / `get_site` (each of the first five takes `site=`).
"""

from data_pipeline.phantom.cohort import (
    DEFAULT_PROPORTIONS,
    SyntheticScan,
    assign_categories,
    generate_cohort,
    patient_id_for,
    patient_seed,
    render_patient,
    render_scan,
)
from data_pipeline.phantom.preview import save_preview
from data_pipeline.phantom.sites import SITES, SitePreset, get_site

__all__ = ["DEFAULT_PROPORTIONS", "SITES", "SitePreset", "SyntheticScan", "assign_categories",
           "generate_cohort", "get_site", "patient_id_for", "patient_seed", "render_patient",
           "render_scan", "save_preview"]
