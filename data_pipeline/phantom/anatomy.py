"""Per-patient chest anatomy of the synthetic cohort: parameters drawn once per patient, in mm.

World coordinates are DICOM patient coordinates (LPS): x towards the patient's left, y towards the
back, z towards the head, in millimetres, with the body axis at x = y = 0 and the heart centre at
z = 0. Everything here is independent of the protocol and of the image size, so the CAC and the
CTAC scan of one patient (and a 128 px and a 512 px rendering) show the same body.

Shapes (each randomised per patient within adult ranges):
- body: a super-ellipse outline with skin, subcutaneous fat and a muscle layer; the thoracic
  cavity inside it, bounded by the ribs;
- heart: a tapered ellipsoid (the pericardial sac, which is the heart-silhouette ground truth) whose
  long axis points anterior-left-inferior; inside it an epicardial fat layer, the myocardium and
  blood pools; the coronary arteries run in the fat, just outside the myocardium;
- aorta: root (inside the silhouette, at the heart's base) -> ascending -> arch -> descending,
  a tube of varying radius; pulmonary trunk and arteries, superior vena cava, trachea, oesophagus;
- spine (vertebral bodies with cortical shell, discs, posterior elements), 12 rib pairs with
  costal cartilage, sternum;
- diaphragm domes (liver on the right, spleen/stomach on the left) under the heart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ARTERIES = ("LM", "LAD", "LCX", "RCA")
ALPHA_HEAD = 0.12 * np.pi   # rib heads (elliptical angle around the cavity from the back)
# orCaScore label convention: 1 LAD (including the left main), 2 LCX, 3 RCA.
ARTERY_LABEL = {"LM": 1, "LAD": 1, "LCX": 2, "RCA": 3}


@dataclasses.dataclass(frozen=True)
class Centerline:
    """A vessel as a polyline of points (n, 3) in world mm with a radius (n,) at each point."""

    name: str
    points: np.ndarray
    radii: np.ndarray

    def resample(self, step_mm: float) -> Centerline:
        """The same curve with points every `step_mm` of arc length (linear interpolation)."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        n = max(2, int(np.ceil(arc[-1] / step_mm)) + 1)
        s = np.linspace(0.0, arc[-1], n)
        points = np.stack([np.interp(s, arc, self.points[:, i]) for i in range(3)], axis=1)
        radii = np.interp(s, arc, self.radii)
        return Centerline(self.name, points, radii)

    @property
    def length_mm(self) -> float:
        """Arc length of the polyline."""
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())

    def at(self, fraction: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Point, unit tangent and radius at `fraction` (0..1) of the arc length."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        s = float(np.clip(fraction, 0.0, 1.0)) * arc[-1]
        i = int(np.clip(np.searchsorted(arc, s, side="right") - 1, 0, len(seg) - 1))
        t = (s - arc[i]) / max(seg[i], 1e-9)
        point = self.points[i] * (1 - t) + self.points[i + 1] * t
        tangent = (self.points[i + 1] - self.points[i]) / max(seg[i], 1e-9)
        radius = float(self.radii[i] * (1 - t) + self.radii[i + 1] * t)
        return point, tangent, radius


@dataclasses.dataclass(frozen=True)
class Heart:
    """The heart: a tapered ellipsoid in a local frame (u: base -> apex, v, w)."""

    center: np.ndarray          # world mm
    frame: np.ndarray           # (3, 3): columns are the local u, v, w axes in world coordinates
    radii: np.ndarray           # (3,) semi-axes of the pericardial sac along u, v, w (mm)
    taper: float                # transverse narrowing towards the apex (0 = plain ellipsoid)
    fat_mm: float               # epicardial fat layer between pericardium and myocardium
    wall_mm: float              # left-ventricular wall thickness
    coronary_offset_mm: float   # coronary centreline distance outside the myocardium
    # The `grooved` anatomy's position-dependent epicardial fat (None: the uniform `fat_mm`).
    grooves: Grooves | None = None

    def to_local(self, x, y, z):
        """World coordinates (broadcastable arrays) to local (u, v, w), taper undone."""
        # Python floats keep float32 inputs in float32 (NumPy 2 promotion rules).
        c = [float(value) for value in self.center]
        f = [[float(value) for value in row] for row in self.frame]
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        u = f[0][0] * dx + f[1][0] * dy + f[2][0] * dz
        v = f[0][1] * dx + f[1][1] * dy + f[2][1] * dz
        w = f[0][2] * dx + f[1][2] * dy + f[2][2] * dz
        scale = 1.0 / (1.0 - float(self.taper) * np.clip(u / float(self.radii[0]), 0.0, 1.0))
        return u, v * scale, w * scale

    def to_world(self, u, v, w) -> np.ndarray:
        """Local (u, v, w) arrays (taper applied) to world points (..., 3)."""
        shrink = 1.0 - self.taper * np.clip(u / self.radii[0], 0.0, 1.0)
        local = np.stack([u, v * shrink, w * shrink], axis=-1)
        return self.center + local @ self.frame.T

    def surface_point(self, theta, phi, offset_mm: float) -> np.ndarray:
        """World point at polar angle `theta` from the apex and azimuth `phi` (from +v towards +w),
        on the ellipsoid whose semi-axes are the sac's plus `offset_mm` (negative: inside)."""
        r = self.radii + offset_mm
        u = r[0] * np.cos(theta)
        v = r[1] * np.sin(theta) * np.cos(phi)
        w = r[2] * np.sin(theta) * np.sin(phi)
        return self.to_world(u, v, w)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """All per-patient shape and density parameters (mm, HU). Drawn by `sample_anatomy`."""

    # Body outline: super-ellipse |x/a|^p + |y/b|^p = 1, centred at (0, body_y0).
    body_axes: tuple[float, float]
    body_power: float
    body_y0: float
    skin_mm: float
    fat_mm: float
    muscle_mm: float
    cavity_axes: tuple[float, float]      # thoracic cavity ellipse (inner rib surface), centre (0, 0)
    heart: Heart
    aorta: Centerline
    vessels: tuple[Centerline, ...]       # pulmonary trunk/arteries, SVC, oesophagus
    airways: tuple[Centerline, ...]       # trachea and main bronchi (air lumen)
    coronaries: dict[str, Centerline]     # LM, LAD, LCX, RCA centrelines
    aortic_root: np.ndarray               # valve centre (world mm)
    aortic_root_axis: np.ndarray          # unit vector along the ascending aorta at the valve
    mitral_center: np.ndarray             # mitral annulus centre (world mm)
    mitral_radius_mm: float
    lv_cavity: tuple[np.ndarray, np.ndarray]     # (local centre, local semi-axes) in heart frame
    rv_cavity: tuple[np.ndarray, np.ndarray]
    atria: tuple[np.ndarray, np.ndarray]
    # Spine: vertebral bodies (elliptic cylinders) with discs, centred at (0, spine_y).
    spine_y: float
    vertebra_axes: tuple[float, float]
    vertebra_z: tuple[tuple[float, float], ...]   # (bottom, top) of each vertebral body
    canal_radius_mm: float
    # Ribs: rib k's centre at elliptical angle alpha lies at z = rib_z[k] - rib_drop(alpha).
    rib_z: tuple[float, ...]
    rib_drop_mm: float
    rib_end_alpha: tuple[float, ...]      # costochondral junction (bone ends, cartilage starts)
    cartilage_end_alpha: tuple[float, ...]
    rib_half_mm: tuple[float, float]      # half thickness (radial), half height
    sternum_axes: tuple[float, float]
    sternum_z: tuple[float, float]
    # Diaphragm domes: paraboloids z = top - r^2 / (2 R).
    dome_right: tuple[float, float, float, float]   # (x, y, top z, curvature radius)
    dome_left: tuple[float, float, float, float]
    hilum_z: float
    # Densities (HU).
    hu_fat: float
    hu_muscle: float
    hu_lung: float
    hu_blood: float
    hu_myocardium: float
    hu_liver: float
    hu_cortical: float
    hu_cancellous: float
    hu_cartilage: float
    z_range: tuple[float, float]          # anatomical extent a scan covers (mm): below apex .. arch
    age_factor: float                     # 0..1, drives calcified-cartilage and valve prevalence
    texture_seed: int                     # lung-vessel texture (fixed per patient)
    # The coronary tree's drawn layout (groove angles, lengths, calibres), kept so that a variant
    # (`grooved_anatomy`) can lay the same tree into its own heart surface.
    coronary_layout: CoronaryLayout | None = None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def heart_extent(heart: Heart, axis: np.ndarray) -> float:
    """Half extent of the (untapered) sac ellipsoid along a world unit vector."""
    local = heart.frame.T @ axis
    return float(np.sqrt(np.sum((local * heart.radii) ** 2)))


@dataclasses.dataclass(frozen=True)
class CoronaryLayout:
    """The drawn layout of a patient's coronary tree, as angles on the sac ellipsoid (`Heart`'s
    polar angle theta from the apex and azimuth phi) and calibres (mm)."""

    groove: float          # atrioventricular groove's theta
    lad_phi: float         # anterior interventricular groove's phi at the base
    pda_phi: float         # posterior interventricular groove's phi (the crux)
    rca_phi: float         # phi of the RCA's entry into the AV groove
    lad_end: float         # theta of the LAD's apical end
    lcx_len: float         # LCX's sweep in phi
    pda_end: float         # theta of the PDA's apical end
    lm_radius: float
    lad_radius: float
    lcx_radius: float
    rca_radius: float
    root_radius_mm: float  # the aortic root's radius (the ostia lie on it)

    @property
    def lad_start(self) -> float:
        """Theta where the LAD leaves the AV groove (the left main's bifurcation)."""
        return self.groove + 0.03 * np.pi


def _draw_coronary_layout(rng, root_radius: float) -> CoronaryLayout:
    """The coronary tree's random draws, in the order the classic anatomy has always made them."""
    groove = np.pi * rng.uniform(0.66, 0.72)      # atrioventricular groove, from the apex
    lad_phi = rng.uniform(0.25, 0.5)              # anterior interventricular groove
    pda_phi = -np.pi * rng.uniform(0.72, 0.85)    # posterior interventricular groove
    rca_phi = -rng.uniform(0.05, 0.25)
    lad_end = np.pi * rng.uniform(0.02, 0.08)
    lcx_len = rng.uniform(1.6, 2.6)
    pda_end = np.pi * rng.uniform(0.25, 0.4)
    return CoronaryLayout(groove=groove, lad_phi=lad_phi, pda_phi=pda_phi, rca_phi=rca_phi,
                          lad_end=lad_end, lcx_len=lcx_len, pda_end=pda_end,
                          lm_radius=rng.uniform(1.9, 2.4), lad_radius=rng.uniform(1.6, 2.0),
                          lcx_radius=rng.uniform(1.4, 1.8), rca_radius=rng.uniform(1.6, 2.0),
                          root_radius_mm=float(root_radius))


def _coronary_lines(heart: Heart, root: np.ndarray, layout: CoronaryLayout,
                    surface=None) -> dict[str, Centerline]:
    """LM, LAD, LCX, RCA centrelines on the heart surface (in the epicardial fat).

    `surface(theta, phi)` gives the centreline's world points; by default the ellipsoid
    `coronary_offset_mm` outside the uniform fat layer (the classic anatomy).
    """
    if surface is None:
        off = -heart.fat_mm + heart.coronary_offset_mm

        def surface(theta, phi):
            return heart.surface_point(theta, phi, off)

    groove, lad_phi, pda_phi = layout.groove, layout.lad_phi, layout.pda_phi
    bif = surface(groove + 0.03 * np.pi, lad_phi)
    rca_start = surface(groove, layout.rca_phi)

    def ostium(target):
        return root + _unit(target - root) * layout.root_radius_mm

    lm_pts = np.linspace(ostium(bif), bif, 8)
    t = np.linspace(0, 1, 60)
    lad_theta = (groove + 0.03 * np.pi) * (1 - t) + layout.lad_end * t
    lad = surface(lad_theta, lad_phi + 0.15 * t)
    lcx = surface(np.full_like(t, groove) - 0.05 * t, lad_phi + 0.15 + layout.lcx_len * t)
    crux = abs(pda_phi)
    rca_ring = surface(np.full_like(t, groove), -0.15 - (crux - 0.15) * t)
    pda_theta = groove * (1 - t) + layout.pda_end * t
    pda = surface(pda_theta, np.full_like(t, pda_phi))
    rca_pts = np.concatenate([np.linspace(ostium(rca_start), rca_start, 8)[:-1], rca_ring, pda[1:]])
    lines = {
        "LM": Centerline("LM", lm_pts, np.full(len(lm_pts), layout.lm_radius)),
        "LAD": Centerline("LAD", lad, np.linspace(layout.lad_radius, 0.8, len(lad))),
        "LCX": Centerline("LCX", lcx, np.linspace(layout.lcx_radius, 0.8, len(lcx))),
        "RCA": Centerline("RCA", rca_pts, np.linspace(layout.rca_radius, 0.8, len(rca_pts))),
    }
    return {name: line.resample(1.0) for name, line in lines.items()}


@dataclasses.dataclass(frozen=True)
class Grooves:
    """Epicardial fat of the `grooved` anatomy: a thickness (mm) that varies smoothly over the
    heart, thin over the free walls and deep along the atrioventricular groove and the anterior
    and posterior interventricular grooves, as a function of the sac ellipsoid's polar angle
    theta (from the apex) and azimuth phi (`Heart.surface_point`'s angles).

    Each groove is a Gaussian ridge across its centre line (`width_mm` its sigma in mm of
    surface); the fat is the free-wall thickness plus the largest ridge's excess. An
    interventricular groove runs from its base end (at the AV groove) to its apical end, its depth
    going from the one end's to the other's as the 1.5th power of the fraction of the way (deep
    for most of the groove, shallowing towards the apex), and fades out past its ends.
    """

    free_mm: float                       # over the free walls
    av_mm: float                         # at the floor of the atrioventricular groove
    aiv_mm: tuple[float, float]          # anterior interventricular groove: base end, apical end
    piv_mm: tuple[float, float]          # posterior interventricular groove: base end, apical end
    width_mm: float                      # Gaussian sigma of a groove's cross-section
    av_theta: float                      # the AV groove's theta
    aiv: tuple[float, float, float, float]   # (theta at base, theta at apex, phi there, phi there)
    piv: tuple[float, float, float, float]
    meridian_mm: float                   # arc length per radian of theta near the AV groove
    equator_mm: float                    # arc length per radian of phi at the equator

    def fat_mm(self, theta, phi):
        """Fat thickness (mm) at the sac's angles (arrays; float32 stays float32)."""
        free, width, meridian = float(self.free_mm), float(self.width_mm), float(self.meridian_mm)
        across = (theta - float(self.av_theta)) * (meridian / width)
        excess = (float(self.av_mm) - free) * np.exp(-0.5 * across * across)
        for (t0, t1, p0, p1), (d0, d1) in ((self.aiv, self.aiv_mm), (self.piv, self.piv_mm)):
            t0, t1, p0, p1, d0, d1 = (float(x) for x in (t0, t1, p0, p1, d0, d1))
            along = np.clip((t0 - theta) / (t0 - t1), 0.0, 1.0)
            dphi = np.mod(phi - (p0 + (p1 - p0) * along) + np.pi, 2 * np.pi) - np.pi
            side = dphi * np.sin(theta) * (float(self.equator_mm) / width)
            past = (np.maximum(theta - t0, 0.0) + np.maximum(t1 - theta, 0.0)) * (meridian / width)
            ridge = (d0 + (d1 - d0) * along ** 1.5 - free) * np.exp(-0.5 * (side * side + past * past))
            excess = np.maximum(excess, ridge)
        return free + excess

    def fat_at_local(self, heart: Heart, u, v, w):
        """Fat thickness (mm) at local points (`Heart.to_local`), via their angles on the sac."""
        a, b, c = (float(r) for r in heart.radii)
        nu, nv, nw = u / a, v / b, w / c
        k0 = np.sqrt(nu * nu + nv * nv + nw * nw)
        theta = np.arccos(np.clip(nu / np.maximum(k0, 1e-6), -1.0, 1.0))
        return self.fat_mm(theta, np.arctan2(nw, nv))


def _groove_floor(heart: Heart):
    """`surface(theta, phi)` for `_coronary_lines`: world points `coronary_offset_mm` outside the
    myocardium of a grooved heart, i.e. (fat - offset) below the sac, measured with the sac's
    signed-distance function (`tissues._ellipsoid_sdf`, linear along a ray from the centre)."""
    radii = heart.radii

    def surface(theta, phi):
        theta, phi = np.asarray(theta, dtype=np.float64), np.asarray(phi, dtype=np.float64)
        on_sac = np.stack([radii[0] * np.cos(theta), radii[1] * np.sin(theta) * np.cos(phi),
                           radii[2] * np.sin(theta) * np.sin(phi)], axis=-1)
        k1 = np.sqrt(np.sum((on_sac / radii ** 2) ** 2, axis=-1))
        depth = heart.grooves.fat_mm(theta, phi) - heart.coronary_offset_mm
        local = on_sac * (1.0 - depth * k1)[..., None]
        return heart.to_world(local[..., 0], local[..., 1], local[..., 2])

    return surface


def grooved_anatomy(anat: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The `grooved` variant of a drawn anatomy: the same body, heart sac, chambers and coronary
    layout, with groove-dependent epicardial fat (`Grooves`, drawn from `rng`, a stream of its
    own) and the coronary arteries laid on the groove floors (`coronary_offset_mm` outside the
    myocardium, so their depth below the sac follows the local fat). The left main still leaves
    the aortic root, deep in the sac; valves and the rest of the anatomy are unchanged.

    Per patient: free-wall fat 1.5-4 mm; a groove depth of 6-20 mm, the AV groove at 0.85-1.1
    times it and each interventricular groove at 0.8-1.05 times it at the base, thinning to
    3.5-6.5 mm (LAD, near the apex) and 4-8 mm (posterior descending) at their apical ends; groove
    width (Gaussian sigma across) 5-10 mm. Every groove floor keeps the coronary lumen at least
    2.5 mm below the sac, and the AV groove at most half the heart's transverse radius there.
    """
    layout = anat.coronary_layout
    if layout is None:
        raise ValueError("the anatomy has no coronary layout (made by sample_anatomy)")
    heart = anat.heart
    u = rng.uniform
    free = u(1.5, 4.0)
    depth = u(6.0, 20.0)
    floor = heart.coronary_offset_mm + 2.5
    a, b, c = (float(r) for r in heart.radii)
    transverse = 0.5 * (b + c) * np.sin(layout.groove)
    av = float(np.clip(depth * u(0.85, 1.1), floor, 0.5 * transverse))
    aiv = (max(floor, depth * u(0.8, 1.05)), max(floor, u(3.5, 6.5)))
    piv = (max(floor, depth * u(0.8, 1.05)), max(floor, u(4.0, 8.0)))
    width = u(5.0, 10.0)
    equator = 0.5 * (b + c)
    meridian = float(np.hypot(a * np.sin(layout.groove), equator * np.cos(layout.groove)))
    grooves = Grooves(free_mm=free, av_mm=av, aiv_mm=aiv, piv_mm=piv, width_mm=width,
                      av_theta=layout.groove,
                      aiv=(layout.lad_start, layout.lad_end, layout.lad_phi, layout.lad_phi + 0.15),
                      piv=(layout.groove, layout.pda_end, layout.pda_phi, layout.pda_phi),
                      meridian_mm=meridian, equator_mm=equator)
    heart = dataclasses.replace(heart, grooves=grooves)
    coronaries = _coronary_lines(heart, anat.aortic_root, layout, surface=_groove_floor(heart))
    return dataclasses.replace(anat, heart=heart, coronaries=coronaries)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draws one patient's anatomy (adult ranges) from `rng`.

    The parts are drawn in a fixed order from the one stream (body, heart, mediastinum, coronary
    arteries, scan range, skeleton, then the remaining sizes and densities), so a patient's
    anatomy depends on its seed alone.
    """
    u = rng.uniform
    size = u(0.0, 1.0)   # body habitus, drives body size and fat
    body_a = 150 + 50 * size + u(-8, 8)
    body_b = 100 + 35 * size + u(-6, 6)
    fat = 6 + 30 * size * u(0.5, 1.2)
    muscle = u(8, 16)
    wall = 10.0   # ribs and intercostal muscle
    cav_a = body_a - fat - muscle - wall - 2
    cav_b = body_b - fat - muscle - wall - 2
    body_y0 = u(0, 6)

    heart, spine_axes, spine_y = _place_heart(rng, size, cav_b)
    radii = heart.radii
    bottom = heart_extent(heart, np.array([0.0, 0.0, 1.0]))
    med = _sample_mediastinum(rng, heart, spine_axes, spine_y, bottom)
    root = med.aortic_root
    layout = _draw_coronary_layout(rng, med.root_radius_mm)
    coronaries = _coronary_lines(heart, root, layout)
    mitral = heart.to_world(-0.42 * radii[0], -0.12 * radii[1], 0.25 * radii[2])
    lv, rv, atria = _chambers(radii)

    z_lo = -bottom - u(12, 25)
    z_hi = med.arch_top + u(12, 22)
    vz, rib_z, rib_end, cart_end = _sample_skeleton(rng, z_lo, z_hi)
    dome_r_top = -bottom + u(5, 22)
    dome_l_top = -bottom + u(-6, 6)
    return Anatomy(
        body_axes=(body_a, body_b), body_power=u(2.0, 2.6), body_y0=body_y0, skin_mm=u(1.5, 2.5),
        fat_mm=fat, muscle_mm=muscle, cavity_axes=(cav_a, cav_b), heart=heart, aorta=med.aorta,
        vessels=med.vessels, airways=med.airways,
        coronaries=coronaries, aortic_root=root, aortic_root_axis=med.aortic_root_axis,
        mitral_center=mitral, mitral_radius_mm=u(12, 15), lv_cavity=lv, rv_cavity=rv, atria=atria,
        spine_y=spine_y, vertebra_axes=spine_axes, vertebra_z=vz,
        canal_radius_mm=u(7, 9), rib_z=rib_z, rib_drop_mm=u(100, 140), rib_end_alpha=rib_end,
        cartilage_end_alpha=cart_end, rib_half_mm=(u(3.0, 4.0), u(6.0, 8.0)),
        sternum_axes=(u(13, 18), u(5, 7)), sternum_z=(-bottom + u(-25, 5), z_hi + 100),
        dome_right=(-u(50, 70), u(0, 20), dome_r_top, u(90, 130)),
        dome_left=(u(50, 70), u(0, 20), dome_l_top, u(80, 120)),
        hilum_z=root[2] + u(10, 30),
        hu_fat=u(-115, -85), hu_muscle=u(40, 60), hu_lung=u(-880, -820), hu_blood=u(35, 45),
        hu_myocardium=u(45, 58), hu_liver=u(50, 65), hu_cortical=u(700, 1200),
        hu_cancellous=u(150, 300), hu_cartilage=u(80, 120), z_range=(z_lo, z_hi),
        age_factor=u(0.0, 1.0), texture_seed=int(rng.integers(0, 2**31 - 1)),
        coronary_layout=layout,
    )


def _place_heart(rng: np.random.Generator, size: float,
                 cav_b: float) -> tuple[Heart, tuple[float, float], float]:
    """Draws the heart and places it; returns it with the vertebral body's semi-axes and the
    spine's y, which are drawn on the way (the heart must keep clear of the spine).

    `size` is the body habitus (0..1), `cav_b` the cavity's antero-posterior semi-axis.
    """
    u = rng.uniform
    # Heart: long axis anterior-left-inferior (azimuth from anterior towards left, elevation down).
    az, el, roll = np.radians(u(35, 60)), np.radians(u(20, 42)), np.radians(u(-15, 15))
    e_u = _unit([np.sin(az) * np.cos(el), -np.cos(az) * np.cos(el), -np.sin(el)])
    ant = np.array([0.0, -1.0, 0.0])
    e_v = _unit(ant - ant.dot(e_u) * e_u)
    e_w = np.cross(e_u, e_v)
    # roll about the long axis
    e_v, e_w = np.cos(roll) * e_v + np.sin(roll) * e_w, -np.sin(roll) * e_v + np.cos(roll) * e_w
    if e_w[0] < 0:   # keep +w on the patient's left (LCX side)
        e_w = -e_w
    frame = np.stack([e_u, e_v, e_w], axis=1)
    heart_scale = 0.9 + 0.2 * size + u(-0.06, 0.06)
    radii = np.array([u(60, 70), u(44, 52), u(40, 48)]) * heart_scale
    fat_mm = u(6.5, 11.0)
    heart = Heart(center=np.zeros(3), frame=frame, radii=radii, taper=u(0.15, 0.3), fat_mm=fat_mm,
                  wall_mm=u(9, 13), coronary_offset_mm=u(1.8, 2.6))
    # Place the heart left of the midline, anterior, with a gap to the inner chest wall/sternum;
    # behind it the left atrium keeps clear of the spine, oesophagus and descending aorta.
    spine_axes = (u(18, 23), u(14, 18))
    spine_y = cav_b - spine_axes[1] * 0.4
    x_c = u(10, 35)
    gap = u(0.0, 14.0)
    room = (spine_y - spine_axes[1] - u(14, 20)) - (-cav_b + gap)
    front = heart_extent(heart, np.array([0.0, -1.0, 0.0]))
    if 2 * front > room:
        heart = dataclasses.replace(heart, radii=heart.radii * (room / (2 * front)))
        front = heart_extent(heart, np.array([0.0, -1.0, 0.0]))
    y_c = -cav_b + gap + front
    heart = dataclasses.replace(heart, center=np.array([x_c, y_c, 0.0]))
    return heart, spine_axes, spine_y


@dataclasses.dataclass(frozen=True)
class _Mediastinum:
    """The great vessels and airways of `_sample_mediastinum`, with the aortic root's geometry."""

    aorta: Centerline
    aortic_root: np.ndarray         # valve centre (world mm)
    aortic_root_axis: np.ndarray    # unit vector along the ascending aorta
    root_radius_mm: float
    arch_top: float                 # z of the aortic arch's top (mm)
    vessels: tuple[Centerline, ...]     # pulmonary trunk, left and right arteries, SVC, oesophagus
    airways: tuple[Centerline, ...]     # trachea, left and right main bronchi


def _sample_mediastinum(rng: np.random.Generator, heart: Heart, spine_axes: tuple[float, float],
                        spine_y: float, bottom: float) -> _Mediastinum:
    """Draws the aorta, pulmonary arteries, superior vena cava, oesophagus and airways around a
    placed `heart` (`bottom`: its half extent along z) in front of the spine."""
    u = rng.uniform
    radii = heart.radii
    # Aortic root at the heart's base, inside the sac.
    root_local = np.array([-0.58 * radii[0], 0.1 * radii[1], 0.05 * radii[2]])
    root = heart.to_world(*root_local)
    root_r = u(11, 14)
    asc_r, desc_r = u(13, 17), u(10, 13)
    desc_x = spine_axes[0] * 0.55 + desc_r + u(0, 6)
    desc_y = spine_y - spine_axes[1] * 0.7
    arch_top = root[2] + u(70, 90)
    asc_top = np.array([root[0] - u(6, 14), root[1] - u(4, 12), arch_top - 18])
    arch_mid = np.array([(asc_top[0] + desc_x) / 2 - 5, (asc_top[1] + desc_y) / 2, arch_top])
    desc_top = np.array([desc_x, desc_y - 4, arch_top - 18])
    desc_bottom = np.array([desc_x + u(-5, 3), desc_y + u(-2, 4), -bottom - 120])
    ctrl = np.array([root, root + (asc_top - root) * 0.5, asc_top, arch_mid, desc_top,
                     desc_top + (desc_bottom - desc_top) * 0.2, desc_bottom])
    rad = np.array([root_r, asc_r, asc_r, 0.5 * (asc_r + desc_r), desc_r, desc_r, desc_r])
    aorta = _smooth_line("aorta", ctrl, rad, step=2.0)
    root_axis = _unit(asc_top - root)

    # Pulmonary trunk from the right-ventricular outflow up to the bifurcation under the arch.
    rvot = heart.to_world(-0.55 * radii[0], 0.65 * radii[1], 0.35 * radii[2])
    bif = np.array([root[0] + u(10, 20), root[1] + u(15, 25), root[2] + u(35, 45)])
    pa_r = u(11, 14)
    trunk = _smooth_line("pulmonary trunk", np.array([rvot, (rvot + bif) / 2 + [5, 0, 5], bif]),
                         np.array([pa_r, pa_r, pa_r]), step=2.0)
    lpa = _smooth_line("left pulmonary artery", np.array([bif, bif + [30, 15, 2], bif + [55, 25, -5]]),
                       np.array([pa_r - 2, pa_r - 3, pa_r - 4]), step=2.0)
    rpa = _smooth_line("right pulmonary artery",
                       np.array([bif, bif + [-25, 12, 3], bif + [-60, 18, -3]]),
                       np.array([pa_r - 2, pa_r - 3, pa_r - 4]), step=2.0)
    svc_x, svc_y = asc_top[0] - asc_r - u(8, 12), asc_top[1] + u(0, 10)
    svc = Centerline("superior vena cava",
                     np.array([[svc_x, svc_y, root[2] + 5], [svc_x, svc_y, arch_top + 60]]),
                     np.array([u(8, 11)] * 2)).resample(3.0)
    eso_x, eso_y = u(2, 10), spine_y - spine_axes[1] - u(5, 9)
    eso = Centerline("oesophagus", np.array([[eso_x, eso_y, -bottom - 120],
                                             [eso_x - 4, eso_y, arch_top + 60]]),
                     np.array([u(6, 8)] * 2)).resample(3.0)
    carina = np.array([0.0, eso_y - 14, root[2] + u(45, 60)])
    trachea = Centerline("trachea", np.array([carina, carina + [0, -6, 120]]),
                         np.array([u(8, 10)] * 2)).resample(2.0)
    left_b = _smooth_line("left main bronchus", np.array([carina, carina + [25, 8, -15],
                                                           carina + [45, 15, -30]]),
                          np.array([6.5, 6.0, 5.0]), step=1.5)
    right_b = _smooth_line("right main bronchus", np.array([carina, carina + [-20, 6, -12],
                                                             carina + [-40, 10, -28]]),
                           np.array([7.0, 6.5, 5.5]), step=1.5)
    return _Mediastinum(aorta=aorta, aortic_root=root, aortic_root_axis=root_axis,
                        root_radius_mm=root_r, arch_top=arch_top,
                        vessels=(trunk, lpa, rpa, svc, eso), airways=(trachea, left_b, right_b))


def _chambers(radii: np.ndarray):
    """(local centre, local semi-axes) of the left ventricle, right ventricle and atria, scaled to
    the sac's semi-axes `radii`."""
    lv = (np.array([0.15 * radii[0], -0.1 * radii[1], 0.2 * radii[2]]),
          np.array([0.62 * radii[0], 0.42 * radii[1], 0.42 * radii[2]]))
    rv = (np.array([0.0, 0.45 * radii[1], -0.2 * radii[2]]),
          np.array([0.55 * radii[0], 0.25 * radii[1], 0.45 * radii[2]]))
    atria = (np.array([-0.55 * radii[0], -0.2 * radii[1], 0.0]),
             np.array([0.3 * radii[0], 0.55 * radii[1], 0.6 * radii[2]]))
    return lv, rv, atria


def _sample_skeleton(rng: np.random.Generator, z_lo: float, z_hi: float):
    """Vertebral bodies ((bottom, top) z each), rib heights, and the bone and cartilage end angles
    of the 12 ribs, over a span larger than any scan of the range [z_lo, z_hi]."""
    u = rng.uniform
    vz = []
    z = z_lo - 80 + u(0, 25)
    while z < z_hi + 80:
        h = u(21, 27)
        vz.append((z, z + h))
        z += h + u(5, 7)
    rib_spacing = u(24, 30)
    rib_z = tuple(z_hi + 60 - u(0, 15) - rib_spacing * k + u(-3, 3) for k in range(12))
    rib_end = tuple(np.pi * u(0.72, 0.8) for _ in range(12))
    cart_end = tuple(np.pi * (u(0.93, 0.96) if k < 7 else u(0.84, 0.9)) for k in range(12))
    return tuple(vz), rib_z, rib_end, cart_end


def _smooth_line(name: str, ctrl: np.ndarray, radii: np.ndarray, step: float) -> Centerline:
    """A smooth curve through control points (Catmull-Rom), resampled every `step` mm."""
    pts, rad = [], []
    p = np.concatenate([ctrl[:1], ctrl, ctrl[-1:]])
    r = np.concatenate([radii[:1], radii, radii[-1:]])
    t = np.linspace(0, 1, 24, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                     + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)
        pts.append(seg)
        rad.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    pts.append(ctrl[-1:])
    rad.append(radii[-1:])
    return Centerline(name, np.concatenate(pts), np.concatenate(rad)).resample(step)


def rib_drop(anat: Anatomy, alpha):
    """How far a rib has descended (mm) at elliptical angle alpha (ribs slope down anteriorly)."""
    t = np.clip((alpha - ALPHA_HEAD) / (np.pi - ALPHA_HEAD), 0.0, 1.0)
    return anat.rib_drop_mm * t ** 1.4


def rib_point(anat: Anatomy, k: int, alpha: float, side: float) -> np.ndarray:
    """World point on rib k's centreline (bone or cartilage) at elliptical angle alpha.

    `side` is +1 for the patient's left, -1 for the right.
    """
    a, b = anat.cavity_axes
    radius = np.sqrt((a * np.sin(alpha)) ** 2 + (b * np.cos(alpha)) ** 2)
    rho = 1.0 + (anat.rib_half_mm[0] + 0.5) / radius
    return np.array([side * a * np.sin(alpha) * rho, b * np.cos(alpha) * rho,
                     anat.rib_z[k] - rib_drop(anat, alpha)])
