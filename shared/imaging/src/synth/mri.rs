//! A multiphase liver MRI phantom with one hepatocellular carcinoma, written as gzip NIfTI-1.
//!
//! # Anatomy
//!
//! World coordinates are RAS+ millimetres with the abdomen's axis on `x = y = 0`. One axial body outline
//! (an ellipse with a subcutaneous fat layer, fat-suppressed as in a T1 gradient-echo DCE study), the spine,
//! aorta and inferior vena cava as vertical cylinders, the spleen, and a liver made of two ellipsoids (right
//! and left lobe) with a noisy surface, a portal venous tree from the hilum and three hepatic veins draining
//! into the cava. Shapes are drawn per patient from the seed.
//!
//! The tumour sits inside the liver; its radius varies with direction (cosine terms of the direction whose
//! amplitude is [`MriPhantom::margin_irregularity`]), and an irregular tumour gets lobulating buds that break
//! through the capsule. A capsule shell surrounds it ([`MriPhantom::rim`]), and extra nodules
//! ([`MriPhantom::extra_nodules`]) and satellites ([`MriPhantom::satellites`]) can be added. Inside, a
//! smooth noise texture modulates the enhancement ([`MriPhantom::heterogeneity`]) and, above a threshold that
//! falls as heterogeneity rises, becomes non-enhancing necrosis.
//!
//! # Signal
//!
//! Signal per phase follows HCC physiology relative to the liver (liver = 1 before contrast):
//!
//! | phase | liver (gadoxetate / extracellular) | tumour |
//! |---|---|---|
//! | `t1_pre` | 1.0 | 0.8 (hypointense) |
//! | `arterial` | 1.15 / 1.25 | liver × (1 + arterial enhancement), hyperenhancing |
//! | `portal_venous` | 1.45 / 1.65 | liver × (1 − washout); capsule enhances with `rim` |
//! | `delayed` | 1.6 / 1.5 (gadoxetate: transitional) | liver × (1 − 1.3 washout); capsule brighter |
//! | `hepatobiliary` | 2.1 (gadoxetate only) | 0.95 (hypointense), vessels dark |
//!
//! With an extracellular agent the hepatobiliary phase does not exist and its file is not written. The
//! latent risk adds what the explicit parameters do not: peritumoral arterial hyperenhancement and
//! peritumoral hepatobiliary hypointensity (imaging markers of microvascular invasion).
//!
//! The scanner multiplies everything by [`MriPhantom::scanner_gain`] and a smooth bias field
//! `1 + c·(x, y, z, xy)` (coordinates in units of 200 mm), and adds complex Gaussian noise of standard
//! deviation [`MriPhantom::noise`] (relative to the liver's pre-contrast signal, 400 units), so that voxels are
//! Rician magnitudes, as in a magnitude MR image. Values are stored as int16, masks as int16 0/1.
//!
//! Size: one generator: the phantom's anatomy, the per-phase contrast kinetics and the scanner
//! parameters are tuned against one another so that the preoperative model has a signal to find.

use std::path::{Path, PathBuf};

use super::{Rng, fractal_noise3, value_noise3};
use crate::{ImagingError, StorageType, Volume, write_nifti_gz};

/// Liver signal before contrast, in stored units (before gain and bias).
const LIVER_UNITS: f32 = 400.0;
/// Largest grid accepted (voxels): 2^27, 256 MiB of f32 per volume.
pub const MAX_VOXELS: usize = 1 << 27;

/// The MR contrast agent of the study; it decides the phases and the liver's enhancement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContrastAgent {
    /// Gadoxetic acid (hepatocyte-specific): weaker arterial phase, a hepatobiliary phase at 20 minutes.
    Gadoxetate,
    /// An extracellular gadolinium agent: no hepatobiliary phase.
    Extracellular,
}

/// One phase of the preoperative dynamic study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Unenhanced T1.
    T1Pre,
    /// Late arterial phase.
    Arterial,
    /// Portal venous phase.
    PortalVenous,
    /// Delayed (transitional, with gadoxetate) phase.
    Delayed,
    /// Hepatobiliary phase (gadoxetate only).
    Hepatobiliary,
}

impl Phase {
    /// The five phases of the preoperative study, in acquisition order.
    pub const ALL: [Phase; 5] =
        [Phase::T1Pre, Phase::Arterial, Phase::PortalVenous, Phase::Delayed, Phase::Hepatobiliary];

    /// The file stem and study-config name: `t1_pre`, `arterial`, `portal_venous`, `delayed`, `hepatobiliary`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Phase::T1Pre => "t1_pre",
            Phase::Arterial => "arterial",
            Phase::PortalVenous => "portal_venous",
            Phase::Delayed => "delayed",
            Phase::Hepatobiliary => "hepatobiliary",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Parameters of one patient's MRI study. Unitless appearance parameters are in `[0, 1]` unless stated.
#[derive(Debug, Clone, PartialEq)]
pub struct MriPhantom {
    /// Voxels along x, y, z.
    pub dims: [usize; 3],
    /// Voxel size in mm along x, y, z.
    pub spacing_mm: [f64; 3],
    /// Centre the field of view on the tumour (a tumour crop, for small test grids) instead of the abdomen.
    pub centre_on_tumour: bool,
    /// Largest tumour diameter in mm (1 to 300).
    pub tumour_diameter_mm: f64,
    /// The patient's latent risk (standard normal scale): peritumoral arterial enhancement and hepatobiliary
    /// hypointensity rise with it.
    pub latent_risk: f64,
    /// Arterial hyperenhancement of the tumour relative to the liver (0 to 2; 0.6 is typical).
    pub arterial_enhancement: f64,
    /// Portal/delayed washout relative to the liver (0 to 0.7).
    pub washout: f64,
    /// Enhancing capsule strength (0: none, 1: a thick, bright complete capsule).
    pub rim: f64,
    /// Internal heterogeneity and necrosis.
    pub heterogeneity: f64,
    /// Margin irregularity (0: a smooth sphere, 1: lobulated with buds through the capsule).
    pub margin_irregularity: f64,
    /// Nodules besides the main tumour (each smaller than it), 0 to 8.
    pub extra_nodules: u32,
    /// Small satellite nodules within 1.5 cm of the main tumour.
    pub satellites: bool,
    /// Scanner intensity scale (0.1 to 5).
    pub scanner_gain: f64,
    /// Bias-field coefficients for x, y, z and xy (each −0.9 to 0.9).
    pub bias_field: [f64; 4],
    /// Noise standard deviation relative to the liver's unenhanced signal (0 to 0.5).
    pub noise: f64,
    /// Contrast agent.
    pub agent: ContrastAgent,
    /// Phases to write (the hepatobiliary one is skipped with an extracellular agent).
    pub phases: Vec<Phase>,
    /// Seed of the patient's anatomy, tumour shape, texture and noise.
    pub seed: u64,
}

/// What [`MriPhantom::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MriFiles {
    /// Paths written: one per phase, then `mask.nii.gz`.
    pub files: Vec<PathBuf>,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// The rendered study in memory (see [`MriPhantom::render`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MriStudy {
    /// One volume per phase written, in [`Phase`] order.
    pub phases: Vec<(Phase, Volume)>,
    /// Tumour mask (1 = tumour, all nodules), on the same grid.
    pub mask: Volume,
}

// Tissue classes.
const AIR: u8 = 0;
const FAT: u8 = 1;
const SOFT: u8 = 2;
const BONE: u8 = 3;
const LIVER: u8 = 4;
const PORTAL: u8 = 5;
const HEPATIC: u8 = 6;
const AORTA: u8 = 7;
const IVC: u8 = 8;
const SPLEEN: u8 = 9;
const N_CLASSES: usize = 10;

/// Signal of each class per phase (liver before contrast = 1).
fn class_signal(agent: ContrastAgent, phase: Phase) -> [f32; N_CLASSES] {
    let g = agent == ContrastAgent::Gadoxetate;
    let pick = |gad: f32, ext: f32| if g { gad } else { ext };
    // air, fat (suppressed), soft tissue, bone marrow, liver, portal, hepatic, aorta, IVC, spleen
    match phase {
        Phase::T1Pre => [0.0, 0.3, 0.65, 0.7, 1.0, 0.5, 0.5, 0.55, 0.5, 0.8],
        Phase::Arterial => [0.0, 0.3, 0.8, 0.85, pick(1.15, 1.25), 0.9, 0.6, pick(3.2, 3.8), 0.8, pick(1.5, 1.7)],
        Phase::PortalVenous => [
            0.0,
            0.32,
            0.95,
            1.0,
            pick(1.45, 1.65),
            pick(2.0, 2.4),
            pick(1.8, 2.2),
            pick(1.9, 2.2),
            pick(1.9, 2.2),
            pick(1.6, 1.7),
        ],
        Phase::Delayed => [
            0.0,
            0.32,
            0.95,
            1.0,
            pick(1.6, 1.5),
            pick(1.4, 1.7),
            pick(1.3, 1.6),
            pick(1.5, 1.7),
            pick(1.5, 1.7),
            pick(1.4, 1.5),
        ],
        Phase::Hepatobiliary => [0.0, 0.32, 0.85, 0.9, 2.1, 0.6, 0.55, 0.6, 0.6, 1.0],
    }
}

/// A nodule: centre, base radius, directional modulation, lobulating buds.
#[derive(Debug, Clone)]
struct Nodule {
    centre: [f64; 3],
    radius: f64,
    /// (unit vector, frequency, phase, amplitude) of each cosine term of the radius.
    terms: Vec<([f64; 3], f64, f64, f64)>,
    /// Buds: (centre, radius); they count as tumour but have no capsule.
    buds: Vec<([f64; 3], f64)>,
    capsule_mm: f64,
}

impl Nodule {
    fn max_radius(&self) -> f64 {
        self.radius * (1.0 + self.terms.iter().map(|t| t.3.abs()).sum::<f64>())
    }

    /// Signed distance-like depth (mm, positive inside) of the capsule-bearing body and of the buds.
    fn depth(&self, p: [f64; 3]) -> (f64, f64) {
        let d = [p[0] - self.centre[0], p[1] - self.centre[1], p[2] - self.centre[2]];
        let r = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        let mut scale = 1.0;
        if r > 1e-9 {
            for (u, f, phase, a) in &self.terms {
                let c = (d[0] * u[0] + d[1] * u[1] + d[2] * u[2]) / r;
                scale += a * (f * c + phase).cos();
            }
        }
        let body = self.radius * scale.max(0.5) - r;
        let bud = self.buds.iter().fold(f64::NEG_INFINITY, |m, (c, rb)| {
            let q = [p[0] - c[0], p[1] - c[1], p[2] - c[2]];
            m.max(rb - (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt())
        });
        (body, bud)
    }
}

/// The patient's anatomy on the grid: class and tumour weights per voxel.
struct Anatomy {
    class: Vec<u8>,
    /// Tumour weight 0..=255 (partial volume).
    tumour: Vec<u8>,
    /// Capsule weight 0..=255.
    capsule: Vec<u8>,
    /// Peritumoral weight 0..=255 (liver within ~1 cm of the tumour).
    peri: Vec<u8>,
    /// Texture −127..=127: tumour heterogeneity inside the tumour, parenchymal nodularity in the liver.
    texture: Vec<i8>,
}

/// The grid: index ↔ world.
#[derive(Clone, Copy)]
struct Grid {
    dims: [usize; 3],
    spacing: [f64; 3],
    origin: [f64; 3],
}

impl Grid {
    fn world(&self, i: usize, j: usize, k: usize) -> [f64; 3] {
        [
            self.origin[0] + i as f64 * self.spacing[0],
            self.origin[1] + j as f64 * self.spacing[1],
            self.origin[2] + k as f64 * self.spacing[2],
        ]
    }

    /// Indices along `axis` whose world coordinate lies in `[lo, hi]`.
    fn range(&self, axis: usize, lo: f64, hi: f64) -> std::ops::Range<usize> {
        let n = self.dims[axis];
        let a = ((lo - self.origin[axis]) / self.spacing[axis]).ceil().max(0.0);
        let b = ((hi - self.origin[axis]) / self.spacing[axis]).floor() + 1.0;
        let a = (a as usize).min(n);
        let b = (b.max(0.0) as usize).min(n);
        a..b.max(a)
    }

    /// Visits the voxels whose world position lies in the box `[lo, hi]`.
    fn for_box(&self, lo: [f64; 3], hi: [f64; 3], mut f: impl FnMut(usize, [f64; 3])) {
        let [nx, ny, _] = self.dims;
        for k in self.range(2, lo[2], hi[2]) {
            for j in self.range(1, lo[1], hi[1]) {
                for i in self.range(0, lo[0], hi[0]) {
                    f(i + nx * (j + ny * k), self.world(i, j, k));
                }
            }
        }
    }

    fn affine(&self) -> [[f64; 4]; 4] {
        [
            [self.spacing[0], 0.0, 0.0, self.origin[0]],
            [0.0, self.spacing[1], 0.0, self.origin[1]],
            [0.0, 0.0, self.spacing[2], self.origin[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }
}

/// A vessel segment: start, end (mm), radius at each end (mm), tissue class.
type Segment = ([f64; 3], [f64; 3], f64, f64, u8);

/// Shapes drawn from the seed, before rasterisation.
struct Layout {
    body: (f64, f64, f64),
    liver: [([f64; 3], [f64; 3]); 2],
    spleen: ([f64; 3], [f64; 3]),
    vessels: Vec<Segment>,
    nodules: Vec<Nodule>,
    texture_seed: u64,
}

fn liver_field(liver: &[([f64; 3], [f64; 3]); 2], p: [f64; 3]) -> f64 {
    liver
        .iter()
        .map(|(c, a)| {
            let q = [(p[0] - c[0]) / a[0], (p[1] - c[1]) / a[1], (p[2] - c[2]) / a[2]];
            (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt()
        })
        .fold(f64::INFINITY, f64::min)
}

fn unit_vector(rng: &mut Rng) -> [f64; 3] {
    loop {
        let v = [rng.range(-1.0, 1.0), rng.range(-1.0, 1.0), rng.range(-1.0, 1.0)];
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        if n > 0.1 && n <= 1.0 {
            return [v[0] / n, v[1] / n, v[2] / n];
        }
    }
}

fn add(a: [f64; 3], b: [f64; 3], s: f64) -> [f64; 3] {
    [a[0] + s * b[0], a[1] + s * b[1], a[2] + s * b[2]]
}

impl MriPhantom {
    fn check(&self, dir: &Path) -> Result<(), ImagingError> {
        let bad = |what: String| Err(ImagingError::request(dir, format!("MRI phantom: {what}")));
        let voxels = self.dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if self.dims.contains(&0) || self.dims.iter().any(|&d| d > 32_767) || voxels.is_none_or(|v| v > MAX_VOXELS) {
            return bad(format!("grid {:?} must be 1 to 32767 per axis and at most {MAX_VOXELS} voxels", self.dims));
        }
        if self.spacing_mm.iter().any(|s| !(s.is_finite() && *s > 0.0 && *s <= 100.0)) {
            return bad(format!("voxel size {:?} mm must be in (0, 100]", self.spacing_mm));
        }
        let unit = [self.rim, self.heterogeneity, self.margin_irregularity];
        let tumour_ok = self.tumour_diameter_mm.is_finite()
            && (1.0..=300.0).contains(&self.tumour_diameter_mm)
            && self.latent_risk.is_finite()
            && (0.0..=2.0).contains(&self.arterial_enhancement)
            && (0.0..=0.7).contains(&self.washout)
            && unit.iter().all(|v| (0.0..=1.0).contains(v))
            && self.extra_nodules <= 8;
        if !tumour_ok {
            return bad(format!(
                "tumour parameters out of range (diameter {} mm, risk {}, arterial {}, washout {}, rim {}, \
                 heterogeneity {}, irregularity {}, extra nodules {})",
                self.tumour_diameter_mm,
                self.latent_risk,
                self.arterial_enhancement,
                self.washout,
                self.rim,
                self.heterogeneity,
                self.margin_irregularity,
                self.extra_nodules
            ));
        }
        if !(0.1..=5.0).contains(&self.scanner_gain)
            || self.bias_field.iter().any(|c| !(-0.9..=0.9).contains(c))
            || !(0.0..=0.5).contains(&self.noise)
        {
            return bad(format!(
                "scanner parameters out of range (gain {}, bias {:?}, noise {})",
                self.scanner_gain, self.bias_field, self.noise
            ));
        }
        let mut phases = self.phases.clone();
        phases.sort();
        phases.dedup();
        if phases.len() != self.phases.len() || phases.is_empty() {
            return bad(format!("phases {:?} must be non-empty and without repeats", self.phases));
        }
        Ok(())
    }

    /// The phases that exist for this agent, in [`Phase`] order: [`MriPhantom::phases`] without the
    /// hepatobiliary phase when the agent is extracellular.
    #[must_use]
    pub fn phases_acquired(&self) -> Vec<Phase> {
        let mut phases: Vec<Phase> = self
            .phases
            .iter()
            .copied()
            .filter(|&p| p != Phase::Hepatobiliary || self.agent == ContrastAgent::Gadoxetate)
            .collect();
        phases.sort();
        phases
    }

    fn layout(&self) -> Layout {
        let mut rng = Rng::new(self.seed);
        let body = (160.0 + 12.0 * rng.normal().clamp(-2.0, 2.0), 118.0 + 8.0 * rng.normal().clamp(-2.0, 2.0), {
            (16.0 + 5.0 * rng.normal()).clamp(8.0, 30.0)
        });
        let jitter = |rng: &mut Rng, s: f64| s * rng.normal().clamp(-2.0, 2.0);
        let right_c = [55.0 + jitter(&mut rng, 6.0), 5.0 + jitter(&mut rng, 6.0), 10.0 + jitter(&mut rng, 8.0)];
        let right_a = [92.0 + jitter(&mut rng, 6.0), 78.0 + jitter(&mut rng, 5.0), 80.0 + jitter(&mut rng, 6.0)];
        let left_c = [-35.0 + jitter(&mut rng, 6.0), 38.0 + jitter(&mut rng, 4.0), right_c[2] + 20.0];
        let left_a = [55.0 + jitter(&mut rng, 5.0), 32.0 + jitter(&mut rng, 3.0), 40.0 + jitter(&mut rng, 4.0)];
        let liver = [(right_c, right_a), (left_c, left_a)];
        let spleen = ([-105.0, -25.0, right_c[2] + 15.0], [42.0, 30.0, 50.0]);

        // Portal tree from the hilum, hepatic veins into the cava.
        let mut vessels = Vec::new();
        let hilum = [right_c[0] - 35.0, right_c[1] - 20.0, right_c[2] - 15.0];
        for b in 0..8 {
            let (c, a) = liver[usize::from(b >= 6)];
            let dir = unit_vector(&mut rng);
            let end = [c[0] + 0.75 * a[0] * dir[0], c[1] + 0.75 * a[1] * dir[1], c[2] + 0.75 * a[2] * dir[2]];
            vessels.push((hilum, end, 6.5, 3.0, PORTAL));
            let mid = add(hilum, [end[0] - hilum[0], end[1] - hilum[1], end[2] - hilum[2]], 0.5);
            let side = unit_vector(&mut rng);
            vessels.push((mid, add(mid, side, 30.0), 3.0, 1.8, PORTAL));
        }
        let cava = [28.0, -45.0];
        let top = [cava[0], cava[1], right_c[2] + 0.55 * right_a[2]];
        for target in [[right_c[0] + 45.0, right_c[1], top[2] - 25.0], [right_c[0], right_c[1] + 45.0, top[2] - 20.0]]
            .into_iter()
            .chain(std::iter::once([left_c[0], left_c[1], left_c[2] + 5.0]))
        {
            let target = add(target, unit_vector(&mut rng), 10.0);
            vessels.push((top, target, 5.5, 2.5, HEPATIC));
        }

        // Main tumour inside the liver, then extra nodules and satellites.
        let radius = self.tumour_diameter_mm / 2.0;
        let inside = |rng: &mut Rng, depth: f64| {
            for _ in 0..64 {
                let u = unit_vector(rng);
                let s = rng.uniform().cbrt() * 0.6;
                let p = [right_c[0] + s * right_a[0] * u[0], right_c[1] + s * right_a[1] * u[1], {
                    right_c[2] + s * right_a[2] * u[2]
                }];
                if liver_field(&liver, p) < depth {
                    return p;
                }
            }
            right_c
        };
        let irr = self.margin_irregularity;
        let nodule = |rng: &mut Rng, centre: [f64; 3], radius: f64, irr: f64, buds: bool, rim: f64| {
            let terms = (0..6)
                .map(|k| {
                    let u = unit_vector(rng);
                    let f = std::f64::consts::PI * (1.0 + 0.9 * k as f64);
                    let amp = irr * 0.28 / (1.0 + 0.5 * k as f64);
                    (u, f, rng.range(0.0, std::f64::consts::TAU), amp)
                })
                .collect();
            let n_buds = if buds { (irr * 4.5).round() as usize } else { 0 };
            let buds = (0..n_buds)
                .map(|_| {
                    let u = unit_vector(rng);
                    (add(centre, u, radius * 0.95), radius * rng.range(0.22, 0.4))
                })
                .collect();
            Nodule { centre, radius, terms, buds, capsule_mm: 1.0 + 2.0 * rim }
        };
        let main_centre = inside(&mut rng, 0.75);
        let mut nodules = vec![nodule(&mut rng, main_centre, radius, irr, true, self.rim)];
        for _ in 0..self.extra_nodules {
            let c = inside(&mut rng, 0.85);
            let r = radius * rng.range(0.45, 0.9);
            nodules.push(nodule(&mut rng, c, r, irr * 0.5, false, self.rim));
        }
        if self.satellites {
            let n = 2 + (rng.uniform() * 3.0) as usize;
            for _ in 0..n {
                let u = unit_vector(&mut rng);
                let c = add(main_centre, u, radius + rng.range(5.0, 15.0));
                let r = rng.range(2.0, 4.5);
                nodules.push(nodule(&mut rng, c, r, 0.2, false, 0.0));
            }
        }
        Layout { body, liver, spleen, vessels, nodules, texture_seed: rng.next_u64() }
    }

    fn grid(&self, layout: &Layout) -> Grid {
        let centre = if self.centre_on_tumour { layout.nodules[0].centre } else { [0.0, 0.0, layout.liver[0].0[2]] };
        let mut origin = [0.0; 3];
        for a in 0..3 {
            origin[a] = centre[a] - (self.dims[a] as f64 - 1.0) / 2.0 * self.spacing_mm[a];
        }
        Grid { dims: self.dims, spacing: self.spacing_mm, origin }
    }

    fn rasterise(&self, layout: &Layout, grid: &Grid) -> Anatomy {
        let n = grid.dims.iter().product();
        let mut class = vec![AIR; n];
        let (ba, bb, fat) = layout.body;
        let (lo, hi) = (f64::NEG_INFINITY, f64::INFINITY);
        // Body: fat rim, soft tissue inside; cylinders along z.
        grid.for_box([-ba, -bb, lo], [ba, bb, hi], |i, p| {
            let e = (p[0] / ba).powi(2) + (p[1] / bb).powi(2);
            if e <= 1.0 {
                let inner = (p[0] / (ba - fat)).powi(2) + (p[1] / (bb - fat)).powi(2);
                class[i] = if inner <= 1.0 { SOFT } else { FAT };
            }
        });
        let cylinder = |class: &mut Vec<u8>, cx: f64, cy: f64, r: f64, c: u8, only: Option<&[u8]>| {
            grid.for_box([cx - r, cy - r, lo], [cx + r, cy + r, hi], |i, p| {
                if (p[0] - cx).powi(2) + (p[1] - cy).powi(2) <= r * r && only.is_none_or(|o| o.contains(&class[i])) {
                    class[i] = c;
                }
            });
        };
        cylinder(&mut class, 0.0, -80.0, 20.0, BONE, Some(&[SOFT, FAT]));
        cylinder(&mut class, -18.0, -52.0, 11.0, AORTA, Some(&[SOFT]));
        let (sc, sa) = layout.spleen;
        grid.for_box(add(sc, sa, -1.0), add(sc, sa, 1.0), |i, p| {
            let q = [(p[0] - sc[0]) / sa[0], (p[1] - sc[1]) / sa[1], (p[2] - sc[2]) / sa[2]];
            if q[0] * q[0] + q[1] * q[1] + q[2] * q[2] <= 1.0 && class[i] == SOFT {
                class[i] = SPLEEN;
            }
        });
        // Liver with a noisy surface, and its parenchymal texture.
        let mut texture = vec![0i8; n];
        let tex_seed = layout.texture_seed;
        let (mut llo, mut lhi) = ([hi; 3], [lo; 3]);
        for (c, a) in &layout.liver {
            for ax in 0..3 {
                llo[ax] = llo[ax].min(c[ax] - 1.15 * a[ax]);
                lhi[ax] = lhi[ax].max(c[ax] + 1.15 * a[ax]);
            }
        }
        grid.for_box(llo, lhi, |i, p| {
            if class[i] != SOFT {
                return;
            }
            let f = liver_field(&layout.liver, p);
            if f > 1.15 {
                return;
            }
            let f = if f > 0.85 {
                f + 0.12 * f64::from(value_noise3(tex_seed, p[0] as f32 / 30.0, p[1] as f32 / 30.0, p[2] as f32 / 30.0))
            } else {
                f
            };
            if f <= 1.0 {
                class[i] = LIVER;
                let t = value_noise3(tex_seed ^ 1, p[0] as f32 / 7.0, p[1] as f32 / 7.0, p[2] as f32 / 7.0);
                texture[i] = (t * 127.0) as i8;
            }
        });
        cylinder(&mut class, 28.0, -45.0, 12.0, IVC, Some(&[SOFT, LIVER]));
        for &(a, b, ra, rb, c) in &layout.vessels {
            let r = ra.max(rb);
            let lo3 = [a[0].min(b[0]) - r, a[1].min(b[1]) - r, a[2].min(b[2]) - r];
            let hi3 = [a[0].max(b[0]) + r, a[1].max(b[1]) + r, a[2].max(b[2]) + r];
            let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
            let len2 = (ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2]).max(1e-9);
            grid.for_box(lo3, hi3, |i, p| {
                if class[i] != LIVER && !(c == PORTAL && class[i] == SOFT && r > 5.0) {
                    return;
                }
                let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
                let t = ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / len2).clamp(0.0, 1.0);
                let q = [ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2]];
                let rr = ra + t * (rb - ra);
                if q[0] * q[0] + q[1] * q[1] + q[2] * q[2] <= rr * rr {
                    class[i] = c;
                }
            });
        }

        // Tumour, capsule and peritumoral weights (partial volume over one voxel).
        let mut tumour = vec![0u8; n];
        let mut capsule = vec![0u8; n];
        let mut peri = vec![0u8; n];
        let voxel = grid.spacing.iter().copied().fold(f64::INFINITY, f64::min);
        let ramp = |s: f64| (s / voxel + 0.5).clamp(0.0, 1.0);
        const PERI_MM: f64 = 10.0;
        for (index, nod) in layout.nodules.iter().enumerate() {
            let reach = nod.max_radius().max(nod.buds.iter().map(|b| nod.radius * 0.95 + b.1).fold(0.0, f64::max))
                + nod.capsule_mm
                + PERI_MM;
            let tex_seed = tex_seed ^ (index as u64 + 2);
            grid.for_box(add(nod.centre, [1.0; 3], -reach), add(nod.centre, [1.0; 3], reach), |i, p| {
                let (body, bud) = nod.depth(p);
                let wt_body = ramp(body);
                let wt_bud = ramp(bud);
                let wt = wt_body.max(wt_bud);
                let wc = ((ramp(body + nod.capsule_mm) - wt_body).min(1.0 - wt)).max(0.0);
                let outside = -body.max(bud);
                let wp = if outside > 0.0 && class[i] == LIVER { (-outside / (PERI_MM / 2.0)).exp() } else { 0.0 };
                let q = |w: f64| (w * 255.0).round() as u8;
                if q(wt) > tumour[i] {
                    tumour[i] = q(wt);
                    if wt > 0.0 {
                        let t = fractal_noise3(tex_seed, p[0] as f32 / 6.0, p[1] as f32 / 6.0, p[2] as f32 / 6.0);
                        texture[i] = (t.clamp(-1.0, 1.0) * 127.0) as i8;
                    }
                }
                capsule[i] = capsule[i].max(q(wc));
                peri[i] = peri[i].max(q(wp));
            });
        }
        Anatomy { class, tumour, capsule, peri, texture }
    }

    /// Fills `out` with phase `phase` (stored units, before rounding).
    fn render_phase(&self, anatomy: &Anatomy, grid: &Grid, phase: Phase, out: &mut [f32]) {
        let signal = class_signal(self.agent, phase);
        let liver = signal[usize::from(LIVER)];
        let gad = self.agent == ContrastAgent::Gadoxetate;
        let ae = self.arterial_enhancement as f32 * if gad { 0.85 } else { 1.0 };
        let wo = self.washout as f32;
        let (tumour, necrosis) = match phase {
            Phase::T1Pre => (0.8, 0.6),
            Phase::Arterial => (liver * (1.0 + ae), 0.62),
            Phase::PortalVenous => (liver * (1.0 - wo), 0.64),
            Phase::Delayed => (liver * (1.0 - 1.3 * wo).max(0.2) - if gad { 0.1 } else { 0.0 }, 0.66),
            Phase::Hepatobiliary => (0.95, 0.6),
        };
        let rim = self.rim as f32;
        let capsule = match phase {
            Phase::T1Pre => 0.85,
            Phase::Arterial => 0.9,
            Phase::PortalVenous => liver * (1.0 + 0.45 * rim),
            Phase::Delayed => liver * (1.0 + 0.65 * rim),
            Phase::Hepatobiliary => 0.9,
        };
        let capsule = liver + rim * (capsule - liver);
        let het = self.heterogeneity as f32;
        let het_amp = het * if phase == Phase::T1Pre { 0.15 } else { 0.45 };
        let necrosis_threshold = 0.8 - 0.65 * het;
        let peri_strength = (1.0 / (1.0 + (-1.5 * (self.latent_risk - 0.3)).exp())) as f32;
        let peri_mod = match phase {
            Phase::Arterial => 0.4 * peri_strength,
            Phase::Hepatobiliary => -0.3 * peri_strength,
            _ => 0.0,
        };
        let parenchyma_amp = 0.03;

        let scale = LIVER_UNITS * self.scanner_gain as f32;
        let sigma = self.noise as f32 * scale;
        let c = self.bias_field.map(|c| c as f32);
        let mut rng = Rng::new(self.seed ^ super::mix64(0x5EED_0000 + phase.index() as u64));
        let [nx, ny, nz] = grid.dims;
        let inv = 1.0 / 255.0;
        let (x0, dx) = ((grid.origin[0] / 200.0) as f32, (grid.spacing[0] / 200.0) as f32);
        for k in 0..nz {
            let z = (grid.origin[2] + k as f64 * grid.spacing[2]) as f32 / 200.0;
            for j in 0..ny {
                let y = (grid.origin[1] + j as f64 * grid.spacing[1]) as f32 / 200.0;
                // The bias field is linear in x along a row: a + b·x.
                let (a, b) = (1.0 + c[1] * y + c[2] * z, c[0] + c[3] * y);
                let row = nx * (j + ny * k);
                let class = &anatomy.class[row..row + nx];
                let out = &mut out[row..row + nx];
                for (i, (o, &cls)) in out.iter_mut().zip(class).enumerate() {
                    let v = row + i;
                    let mut value = signal[usize::from(cls)];
                    if cls == LIVER {
                        let tex = f32::from(anatomy.texture[v]) * (1.0 / 127.0);
                        value *= 1.0 + parenchyma_amp * tex + peri_mod * f32::from(anatomy.peri[v]) * inv;
                    }
                    let (wt, wc) = (anatomy.tumour[v], anatomy.capsule[v]);
                    if wt > 0 || wc > 0 {
                        let (wt, wc) = (f32::from(wt) * inv, f32::from(wc) * inv);
                        let tex = f32::from(anatomy.texture[v]) * (1.0 / 127.0);
                        let t = if tex > necrosis_threshold { necrosis } else { tumour * (1.0 + het_amp * tex) };
                        value = value * (1.0 - wt - wc) + t * wt + capsule * wc;
                    }
                    let bias = (a + b * (x0 + dx * i as f32)).clamp(0.3, 3.0);
                    let s = value * scale * bias;
                    let (n1, n2) = rng.normal_pair();
                    let (re, im) = (s + n1 * sigma, n2 * sigma);
                    *o = (re * re + im * im).sqrt();
                }
            }
        }
    }

    /// Renders every acquired phase and the mask in memory (a study of `dims` voxels takes
    /// `4 × voxels × (phases + 1)` bytes; [`MriPhantom::write`] holds one phase at a time).
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] if a parameter is out of its documented range.
    pub fn render(&self) -> Result<MriStudy, ImagingError> {
        self.check(Path::new("<mri phantom>"))?;
        let layout = self.layout();
        let grid = self.grid(&layout);
        let anatomy = self.rasterise(&layout, &grid);
        let volume = |data: Vec<f32>| Volume { dims: grid.dims, spacing_mm: grid.spacing, affine: grid.affine(), data };
        let n = grid.dims.iter().product();
        let phases = self
            .phases_acquired()
            .into_iter()
            .map(|phase| {
                let mut data = vec![0f32; n];
                self.render_phase(&anatomy, &grid, phase, &mut data);
                data.iter_mut().for_each(|v| *v = v.round());
                (phase, volume(data))
            })
            .collect();
        let mask = volume(anatomy.tumour.iter().map(|&w| f32::from(u8::from(w >= 128))).collect());
        Ok(MriStudy { phases, mask })
    }

    /// Writes `<phase>.nii.gz` for each acquired phase and `mask.nii.gz` into `dir` (which must exist), each
    /// under a temporary name first and renamed when complete.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] if a parameter is out of its documented range; [`ImagingError::Io`]
    /// if a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<MriFiles, ImagingError> {
        self.check(dir)?;
        let layout = self.layout();
        let grid = self.grid(&layout);
        let anatomy = self.rasterise(&layout, &grid);
        let n = grid.dims.iter().product();
        let mut volume =
            Volume { dims: grid.dims, spacing_mm: grid.spacing, affine: grid.affine(), data: vec![0.0; n] };
        let mut files = Vec::new();
        let mut bytes = 0;
        let mut put = |name: String, volume: &Volume| -> Result<(), ImagingError> {
            let path = dir.join(&name);
            let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let result = write_nifti_gz(&tmp, volume, StorageType::I16)
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| ImagingError::io(&path, e)));
            if let Err(e) = result {
                let _ = std::fs::remove_file(&tmp); // best effort; `e` is what matters
                return Err(e);
            }
            bytes += std::fs::metadata(&path).map_err(|e| ImagingError::io(&path, e))?.len();
            files.push(path);
            Ok(())
        };
        for phase in self.phases_acquired() {
            self.render_phase(&anatomy, &grid, phase, &mut volume.data);
            put(format!("{}.nii.gz", phase.name()), &volume)?;
        }
        for (v, &w) in volume.data.iter_mut().zip(&anatomy.tumour) {
            *v = f32::from(u8::from(w >= 128));
        }
        put("mask.nii.gz".to_string(), &volume)?;
        Ok(MriFiles { files, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_nifti;

    fn phantom() -> MriPhantom {
        MriPhantom {
            dims: [64, 52, 24],
            spacing_mm: [2.0, 2.0, 4.0],
            centre_on_tumour: true,
            tumour_diameter_mm: 40.0,
            latent_risk: 0.0,
            arterial_enhancement: 0.7,
            washout: 0.3,
            rim: 0.8,
            heterogeneity: 0.3,
            margin_irregularity: 0.2,
            extra_nodules: 0,
            satellites: false,
            scanner_gain: 1.0,
            bias_field: [0.0; 4],
            noise: 0.02,
            agent: ContrastAgent::Gadoxetate,
            phases: Phase::ALL.to_vec(),
            seed: 11,
        }
    }

    /// Tumour and far-liver means of one phase.
    fn contrast(p: &MriPhantom, study: &MriStudy, phase: Phase) -> (f64, f64) {
        let layout = p.layout();
        let grid = p.grid(&layout);
        let anatomy = p.rasterise(&layout, &grid);
        let (_, v) = study.phases.iter().find(|(q, _)| *q == phase).expect("phase");
        let (mut t, mut nt, mut l, mut nl) = (0.0, 0.0, 0.0, 0.0);
        for (i, x) in v.data.iter().enumerate() {
            if anatomy.tumour[i] == 255 && anatomy.texture[i] < 0 {
                t += f64::from(*x);
                nt += 1.0;
            } else if anatomy.class[i] == LIVER && anatomy.peri[i] == 0 && anatomy.tumour[i] == 0 {
                l += f64::from(*x);
                nl += 1.0;
            }
        }
        assert!(nt > 50.0 && nl > 50.0, "{nt} tumour and {nl} liver voxels");
        (t / nt, l / nl)
    }

    #[test]
    fn tumour_follows_hcc_enhancement_pattern() {
        let p = phantom();
        let study = p.render().expect("renders");
        let ratio = |phase| {
            let (t, l) = contrast(&p, &study, phase);
            t / l
        };
        assert!(ratio(Phase::T1Pre) < 0.9, "pre {}", ratio(Phase::T1Pre));
        assert!(ratio(Phase::Arterial) > 1.3, "arterial {}", ratio(Phase::Arterial));
        assert!(ratio(Phase::PortalVenous) < 0.85, "portal {}", ratio(Phase::PortalVenous));
        assert!(ratio(Phase::Hepatobiliary) < 0.6, "hepatobiliary {}", ratio(Phase::Hepatobiliary));
        // Mask on the phase grid, a plausible volume for a 4 cm tumour (33.5 mL, with the irregular margin).
        let voxels = study.mask.data.iter().filter(|&&m| m == 1.0).count() as f64;
        let ml = voxels * 2.0 * 2.0 * 4.0 / 1000.0;
        assert!((20.0..50.0).contains(&ml), "tumour {ml} mL");
        assert!(study.phases.iter().all(|(_, v)| v.dims == study.mask.dims && v.affine == study.mask.affine));
    }

    #[test]
    fn extracellular_agent_has_no_hepatobiliary_phase_and_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = MriPhantom { agent: ContrastAgent::Extracellular, dims: [40, 32, 12], ..phantom() };
        let written = p.write(dir.path()).expect("writes");
        let names: Vec<String> =
            written.files.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["t1_pre.nii.gz", "arterial.nii.gz", "portal_venous.nii.gz", "delayed.nii.gz", "mask.nii.gz"]
        );
        assert!(!dir.path().join("hepatobiliary.nii.gz").exists());
        let study = p.render().expect("renders");
        for (phase, volume) in &study.phases {
            let read = read_nifti(&dir.path().join(format!("{}.nii.gz", phase.name()))).expect("reads");
            assert_eq!(read.dims, [40, 32, 12]);
            assert_eq!(read.data, volume.data, "{phase:?} differs from the rendering");
            assert!((read.affine[0][0] - 2.0).abs() < 1e-6 && (read.affine[2][2] - 4.0).abs() < 1e-6);
        }
        let mask = read_nifti(&dir.path().join("mask.nii.gz")).expect("reads");
        assert_eq!(mask.data, study.mask.data);
        assert!(mask.data.contains(&1.0));
        let total: u64 = written.files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
        assert_eq!(total, written.bytes);
        assert_eq!(std::fs::read_dir(dir.path()).expect("lists").count(), 5, "no temporary file left");
    }

    #[test]
    fn gain_bias_and_parameters_act() {
        let base = phantom().render().expect("renders");
        let bright = MriPhantom { scanner_gain: 1.5, ..phantom() }.render().expect("renders");
        let mean = |s: &MriStudy| s.phases[0].1.data.iter().map(|&v| f64::from(v)).sum::<f64>();
        let r = mean(&bright) / mean(&base);
        assert!((r - 1.5).abs() < 0.03, "gain ratio {r}");
        // A stronger capsule raises the capsule's delayed signal; irregular margins change the mask.
        let smooth = MriPhantom { margin_irregularity: 0.0, ..phantom() }.render().expect("renders");
        let rough = MriPhantom { margin_irregularity: 1.0, ..phantom() }.render().expect("renders");
        assert_ne!(smooth.mask.data, rough.mask.data);
        let bad = MriPhantom { washout: 2.0, ..phantom() };
        assert!(matches!(bad.render(), Err(ImagingError::InvalidRequest { .. })));
        let bad = MriPhantom { dims: [0, 4, 4], ..phantom() };
        assert!(bad.render().is_err());
        let bad = MriPhantom { phases: vec![Phase::T1Pre, Phase::T1Pre], ..phantom() };
        assert!(bad.render().is_err());
    }
}
