//! A procedural H&E whole-slide image of a resected hepatocellular carcinoma, generated tile by tile.
//!
//! Every pixel is a pure function of the parameters and its level-0 position, so any region can be rendered
//! on its own (the JPEG pyramid writer asks for bands) and the same parameters give the same slide.
//!
//! # What is drawn
//!
//! - **Tissue outline**: an irregular blob (a wavy ellipse with a frayed edge) covering most of the slide, with
//!   a few tears and fat vacuoles; outside it bare glass (the stain's background colour), so that a
//!   saturation-based tissue detector has something to find.
//! - **Trabeculae**: hepatocyte plates separated by sinusoids, drawn as two warped stripe families (plates and
//!   the sinusoids that cross them). Plates thicken with grade, from cords two or three cells thick (grade 1)
//!   to a compact, solid pattern (grade 4); sinusoids hold a few red cells.
//! - **Nuclei**: one per cell of a jittered grid, elliptical, with speckled chromatin and a darker membrane.
//!   Density, size and size variation (pleomorphism) rise with grade and, within a grade, with the latent
//!   risk; grade ≥ 3 nuclei have a visible nucleolus. Cytoplasm turns more basophilic with grade.
//! - **Vessels**: round vessels with a pink wall and a pale lumen holding red cells; with microvascular
//!   invasion some contain a tumour embolus (a dense nest of tumour cells): one or two vessels for M1,
//!   at least three for M2.
//!
//! Colours come from a Beer–Lambert model: `rgb = background · exp(−(H · h + E · e))` with the haematoxylin
//! and eosin optical-density vectors `h`, `e` of the [`Stain`] (a center's stain differs in both), through a
//! 64 × 64 lookup table, plus a little sensor noise.
//!
//! Cost: a few nanoseconds per pixel (one bilinear interpolation of five smooth fields from a 16-pixel
//! lattice, one hash) plus the area of the nuclei and vessels.
//!
//! Size: one procedural generator: every pixel is a function of the parameters and its position,
//! and the tissue, nuclei and stain models are tuned against one another.

use std::path::Path;

use super::{Rng, fractal_noise3, hash3, mix64, unit, value_noise3};
use crate::{ImagingError, JpegPyramid, write_jpeg_pyramid_tiff};

/// Microvascular invasion, as the clinical `mvi` column codes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mvi {
    /// No microvascular invasion.
    M0,
    /// A few invaded vessels near the tumour.
    M1,
    /// Many invaded vessels, or far from the tumour.
    M2,
}

/// A center's H&E stain: optical density per unit concentration of each dye, and the glass colour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stain {
    /// Haematoxylin optical density for R, G, B (Macenko's reference: 0.56, 0.72, 0.41).
    pub hematoxylin: [f64; 3],
    /// Eosin optical density for R, G, B (Macenko's reference: 0.22, 0.80, 0.56).
    pub eosin: [f64; 3],
    /// Colour of bare glass (the illumination).
    pub background: [u8; 3],
}

impl Stain {
    /// The reference stain of Macenko's normalisation (as used by common stain-normalisation tools) on
    /// near-white glass.
    #[must_use]
    pub fn reference() -> Self {
        Self { hematoxylin: [0.5626, 0.7201, 0.4062], eosin: [0.2159, 0.8012, 0.5581], background: [242, 240, 244] }
    }
}

/// Parameters of one H&E slide.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidePhantom {
    /// Level-0 width in pixels.
    pub width: u32,
    /// Level-0 height in pixels.
    pub height: u32,
    /// Microns per level-0 pixel (0.5 for a 20× scan); physical sizes are kept whatever the value.
    pub mpp: f64,
    /// Tile side of the file (a multiple of 16).
    pub tile: u32,
    /// Most pyramid levels.
    pub levels: usize,
    /// Size ratio between levels (2 or 4).
    pub downsample: u32,
    /// JPEG quality (1 to 100).
    pub quality: u8,
    /// Edmondson–Steiner grade, 1 to 4.
    pub grade: u8,
    /// Microvascular invasion.
    pub mvi: Mvi,
    /// The patient's latent risk (standard normal scale): nuclear density, size and pleomorphism rise a little
    /// with it within a grade.
    pub latent_risk: f64,
    /// The center's stain.
    pub stain: Stain,
    /// Seed of the slide's layout and textures.
    pub seed: u64,
}

/// Lattice spacing (pixels) of the smooth fields.
const LATTICE: i64 = 16;
/// Fields on the lattice: tissue, hole, plate phase, cross phase, eosin modulation, cross-sinusoid gate.
const NF: usize = 6;
/// Concentration scale of the u8 buffers: 255 ↔ 2.0.
const CONC: f32 = 127.5;
/// Rendering chunk side (pixels).
const CHUNK: u32 = 256;

#[derive(Debug, Clone)]
struct Vessel {
    x: f32,
    y: f32,
    lumen: f32,
    wall: f32,
    /// Embolus centre and radius, if invaded.
    embolus: Option<(f32, f32, f32)>,
}

/// A slide ready to render: the parameters turned into pixel units, the vessels placed, the colour table
/// built. Cheap to build; [`SlideRenderer::render`] takes `&self` and may run from several threads.
#[derive(Debug, Clone)]
pub struct SlideRenderer {
    seed: u64,
    // Tissue outline.
    centre: (f64, f64),
    radii: (f64, f64),
    harmonics: Vec<(f64, f64)>,
    edge_scale: f64,
    hole_scale: f64,
    // Trabeculae.
    angle: (f64, f64),
    plate_period: f64,
    cross_period: f64,
    warp_scale: f64,
    sinusoid_frac: f32,
    cross_frac: f32,
    stain_scale: f64,
    // Cytoplasm.
    cyto_e: f32,
    cyto_h: f32,
    // Nuclei (pixels).
    cell: f32,
    nucleus_r: f32,
    pleomorphism: f32,
    presence: f32,
    nucleus_h: f32,
    nucleolus: bool,
    rbc: f32,
    vessels: Vec<Vessel>,
    /// `lut[(h >> 2) * 64 + (e >> 2)]` = RGB.
    lut: Vec<[u8; 3]>,
}

impl SlidePhantom {
    fn check(&self, path: &Path) -> Result<(), ImagingError> {
        let bad = |what: String| Err(ImagingError::request(path, format!("slide phantom: {what}")));
        if self.width == 0 || self.height == 0 || self.width > 200_000 || self.height > 200_000 {
            return bad(format!("size {}×{} must be 1 to 200000 pixels per side", self.width, self.height));
        }
        if !(self.mpp.is_finite() && (0.05..=10.0).contains(&self.mpp)) {
            return bad(format!("mpp {} must be in [0.05, 10]", self.mpp));
        }
        if !(1..=4).contains(&self.grade) || !self.latent_risk.is_finite() {
            return bad(format!("grade {} (1 to 4) and latent risk {}", self.grade, self.latent_risk));
        }
        let s = &self.stain;
        if s.hematoxylin.iter().chain(&s.eosin).any(|v| !(v.is_finite() && (0.0..=3.0).contains(v))) {
            return bad(format!("stain vectors {:?} / {:?} must be in [0, 3]", s.hematoxylin, s.eosin));
        }
        Ok(())
    }

    /// The renderer of this slide.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] (about `<slide phantom>`) if a parameter is out of range.
    pub fn renderer(&self) -> Result<SlideRenderer, ImagingError> {
        self.check(Path::new("<slide phantom>"))?;
        Ok(self.build())
    }

    fn build(&self) -> SlideRenderer {
        let mut rng = Rng::new(self.seed);
        let um = |v: f64| v / self.mpp; // microns → pixels
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        let g = f64::from(self.grade);
        let z = self.latent_risk.clamp(-3.0, 3.0);
        let centre = (w * rng.range(0.46, 0.54), h * rng.range(0.46, 0.54));
        let radii = (w * rng.range(0.40, 0.45), h * rng.range(0.38, 0.44));
        let harmonics =
            (2..8).map(|k| (0.09 / f64::from(k).powf(0.7), rng.range(0.0, std::f64::consts::TAU))).collect();
        let a = rng.range(0.0, std::f64::consts::PI);
        // Plate (trabecula) width grows with grade; sinusoids narrow.
        let plate = [28.0, 42.0, 65.0, 100.0][usize::from(self.grade - 1)] * (1.0 + 0.08 * z);
        let sinusoid = [7.5, 7.0, 5.5, 4.5][usize::from(self.grade - 1)];
        let plate_period = um(plate + sinusoid);
        let cross_period = plate_period * rng.range(2.2, 3.0);
        let cell = um([23.0, 20.0, 17.0, 15.0][usize::from(self.grade - 1)] * (1.0 - 0.04 * z).clamp(0.85, 1.15));
        let nucleus_r = um([3.6, 4.2, 4.8, 5.5][usize::from(self.grade - 1)] * (1.0 + 0.04 * z).clamp(0.85, 1.15));
        let pleomorphism = ([0.07, 0.13, 0.22, 0.32][usize::from(self.grade - 1)] + 0.02 * z).clamp(0.03, 0.45);

        // Vessels in the tissue: about 2.5 per mm², at least one (three with M2).
        let area_mm2 = w * h * self.mpp * self.mpp / 1e6;
        let invaded = match self.mvi {
            Mvi::M0 => 0,
            Mvi::M1 => 1 + usize::from(rng.uniform() < 0.5),
            Mvi::M2 => 3 + (rng.uniform() * 3.0) as usize,
        };
        let n_vessels = ((area_mm2 * 2.5).round() as usize).clamp(1, 60).max(invaded);
        let mut renderer = SlideRenderer {
            seed: mix64(self.seed ^ 0x51DE),
            centre,
            radii,
            harmonics,
            edge_scale: um(60.0),
            hole_scale: um(180.0),
            angle: (a.cos(), a.sin()),
            plate_period,
            cross_period,
            warp_scale: um(140.0),
            sinusoid_frac: (um(sinusoid) / plate_period) as f32,
            cross_frac: (um(sinusoid) / cross_period * if self.grade >= 3 { 0.6 } else { 1.0 }) as f32,
            stain_scale: um(350.0),
            cyto_e: [0.50, 0.47, 0.42, 0.38][usize::from(self.grade - 1)],
            cyto_h: [0.05, 0.07, 0.10, 0.13][usize::from(self.grade - 1)],
            cell: cell as f32,
            nucleus_r: nucleus_r as f32,
            pleomorphism: pleomorphism as f32,
            presence: 0.88,
            nucleus_h: 0.95 + 0.1 * g as f32,
            nucleolus: self.grade >= 3,
            rbc: um(3.6) as f32,
            vessels: Vec::new(),
            lut: lut(&self.stain),
        };
        let mut vessels: Vec<Vessel> = Vec::with_capacity(n_vessels);
        let mut tries = 0;
        while vessels.len() < n_vessels && tries < 400 {
            tries += 1;
            let lumen = um(rng.range(18.0, 55.0)).min(w.min(h) * 0.12);
            let wall = um(rng.range(5.0, 10.0));
            let (x, y) = (rng.range(0.0, w), rng.range(0.0, h));
            let reach = lumen + wall;
            let overlaps = vessels.iter().any(|v| {
                let d = (f64::from(v.x) - x).hypot(f64::from(v.y) - y);
                d < f64::from(v.lumen + v.wall) + reach + um(10.0)
            });
            // Vessels lie well inside the tissue (so a tiny slide still has room for them).
            if overlaps || renderer.tissue(x, y) > -0.08 {
                continue;
            }
            vessels.push(Vessel { x: x as f32, y: y as f32, lumen: lumen as f32, wall: wall as f32, embolus: None });
        }
        for v in vessels.iter_mut().take(invaded) {
            let r = v.lumen * rng.range(0.5, 0.85) as f32;
            let off = (v.lumen - r) * rng.uniform() as f32;
            let t = rng.range(0.0, std::f64::consts::TAU) as f32;
            v.embolus = Some((v.x + off * t.cos(), v.y + off * t.sin(), r));
        }
        renderer.vessels = vessels;
        renderer
    }

    /// Writes the slide as a JPEG-tiled pyramidal TIFF at `path` (see [`write_jpeg_pyramid_tiff`]) and
    /// returns its size in bytes. `progress(rows, height)` follows level 0.
    ///
    /// # Errors
    ///
    /// [`ImagingError::InvalidRequest`] if a parameter is out of range, and any error of
    /// [`write_jpeg_pyramid_tiff`].
    pub fn write(&self, path: &Path, progress: &mut dyn FnMut(u32, u32)) -> Result<u64, ImagingError> {
        self.check(path)?;
        let renderer = self.build();
        let spec = JpegPyramid {
            width: self.width,
            height: self.height,
            tile: self.tile,
            levels: self.levels,
            downsample: self.downsample,
            mpp: self.mpp,
            quality: self.quality,
            description: format!("fedhcc synthetic H&E|MPP = {}|grade = {}|mvi = {:?}", self.mpp, self.grade, self.mvi),
        };
        write_jpeg_pyramid_tiff(
            path,
            &spec,
            &mut |x, y, w, h, rgb| {
                renderer.render(x, y, w, h, rgb);
                Ok(())
            },
            progress,
        )?;
        Ok(std::fs::metadata(path).map_err(|e| ImagingError::io(path, e))?.len())
    }
}

/// The Beer–Lambert colour of every (haematoxylin, eosin) pair on a 64 × 64 grid of concentrations 0..2.
fn lut(stain: &Stain) -> Vec<[u8; 3]> {
    let mut table = Vec::with_capacity(64 * 64);
    for hi in 0..64 {
        for ei in 0..64 {
            let (hc, ec) = ((hi as f64 + 0.5) * 4.0 / f64::from(CONC), (ei as f64 + 0.5) * 4.0 / f64::from(CONC));
            let px = std::array::from_fn(|c| {
                let od = hc * stain.hematoxylin[c] + ec * stain.eosin[c];
                (f64::from(stain.background[c]) * (-od).exp()).round().clamp(0.0, 255.0) as u8
            });
            table.push(px);
        }
    }
    table
}

/// A cheap per-pixel hash (two multiplies) for grain and sensor noise, where `mix64`'s quality is not needed.
#[inline]
fn pixel_hash(seed: u64, x: i64, y: i64) -> u64 {
    let h = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ seed;
    let h = (h ^ (h >> 32)).wrapping_mul(0x1656_67B1_9E37_79F9);
    h ^ (h >> 29)
}

fn conc(v: f32) -> u8 {
    (v * CONC).clamp(0.0, 255.0) as u8
}

impl SlideRenderer {
    /// Signed tissue field at a level-0 point: negative inside the tissue (units of the outline's radius).
    fn tissue(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = ((x - self.centre.0) / self.radii.0, (y - self.centre.1) / self.radii.1);
        let rho = dx.hypot(dy);
        let theta = dy.atan2(dx);
        let r = 1.0
            + self
                .harmonics
                .iter()
                .enumerate()
                .map(|(k, (a, p))| a * ((k as f64 + 2.0) * theta + p).cos())
                .sum::<f64>();
        let edge = value_noise3(self.seed, (x / self.edge_scale) as f32, (y / self.edge_scale) as f32, 0.5);
        rho - r + 0.05 * f64::from(edge)
    }

    /// Whether pixel `(x, y)` lies on a red cell: one disc of the red-cell radius per grid cell of `spacing`
    /// radii, present with probability `presence`, jittered within its cell.
    #[inline]
    fn red_cell(&self, x: i64, y: i64, spacing: f32, presence: f32, salt: u64) -> bool {
        let cell = spacing * 2.0 * self.rbc;
        let (gx, gy) = ((x as f32 / cell).floor(), (y as f32 / cell).floor());
        let h = hash3(self.seed ^ salt, gx as i64, gy as i64, 0);
        if unit(h) >= presence {
            return false;
        }
        let free = cell - 2.0 * self.rbc;
        let cx = gx * cell + self.rbc + free * unit(mix64(h ^ 1));
        let cy = gy * cell + self.rbc + free * unit(mix64(h ^ 2));
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        dx * dx + dy * dy < self.rbc * self.rbc
    }

    /// The smooth fields at a lattice node.
    fn node(&self, x: f64, y: f64) -> [f32; NF] {
        let s = self.seed;
        let hole = fractal_noise3(s ^ 1, (x / self.hole_scale) as f32, (y / self.hole_scale) as f32, 1.5);
        let (c, sn) = self.angle;
        let wx = (x / self.warp_scale) as f32;
        let wy = (y / self.warp_scale) as f32;
        let plate = (x * c + y * sn) / self.plate_period + 1.8 * f64::from(fractal_noise3(s ^ 2, wx, wy, 2.5));
        let cross =
            (-x * sn + y * c) / self.cross_period + 0.9 * f64::from(value_noise3(s ^ 3, 0.7 * wx, 0.7 * wy, 3.5));
        let stain = value_noise3(s ^ 4, (x / self.stain_scale) as f32, (y / self.stain_scale) as f32, 4.5);
        let gs = self.plate_period * 1.7;
        let gate = value_noise3(s ^ 6, (x / gs) as f32, (y / gs) as f32, 6.5);
        [self.tissue(x, y) as f32, hole, plate.rem_euclid(1.0e4) as f32, cross.rem_euclid(1.0e4) as f32, stain, gate]
    }

    /// Renders the level-0 region `(x0, y0, w, h)` into `rgb` (`w * h * 3` bytes, row-major RGB8); pixels
    /// outside the slide are rendered as if the slide went on. A shorter buffer is left as it is past its end.
    pub fn render(&self, x0: u32, y0: u32, w: u32, h: u32, rgb: &mut [u8]) {
        if rgb.len() < (w as usize) * (h as usize) * 3 {
            return;
        }
        let mut hb = Vec::new();
        let mut eb = Vec::new();
        for cy in (0..h).step_by(CHUNK as usize) {
            for cx in (0..w).step_by(CHUNK as usize) {
                let (cw, ch) = (CHUNK.min(w - cx), CHUNK.min(h - cy));
                hb.clear();
                hb.resize((cw * ch) as usize, 0u8);
                eb.clear();
                eb.resize((cw * ch) as usize, 0u8);
                let region = Region { x0: i64::from(x0 + cx), y0: i64::from(y0 + cy), w: cw as usize, h: ch as usize };
                self.base(&region, &mut hb, &mut eb);
                self.nuclei(&region, &mut hb, &mut eb);
                self.paint_vessels(&region, &mut hb, &mut eb);
                for r in 0..ch as usize {
                    let out = &mut rgb[((cy as usize + r) * w as usize + cx as usize) * 3..];
                    for c in 0..cw as usize {
                        let i = r * cw as usize + c;
                        let n = pixel_hash(self.seed, region.x0 + c as i64, region.y0 + r as i64);
                        let px = self.lut[usize::from(hb[i] >> 2) * 64 + usize::from(eb[i] >> 2)];
                        for k in 0..3 {
                            let noise = ((n >> (8 * k)) & 3) as i16 - 1;
                            out[c * 3 + k] = (i16::from(px[k]) + noise).clamp(0, 255) as u8;
                        }
                    }
                }
            }
        }
    }

    /// Background, trabeculae, sinusoids: the haematoxylin and eosin concentration of every pixel.
    fn base(&self, region: &Region, hb: &mut [u8], eb: &mut [u8]) {
        let lat = Lattice::new(self, region, 0);
        let mut row = vec![[0f32; NF]; lat.nx];
        for r in 0..region.h {
            let y = region.y0 + r as i64;
            lat.row(y, &mut row);
            for c in 0..region.w {
                let x = region.x0 + c as i64;
                let f = lat.at(&row, x);
                let i = r * region.w + c;
                let grain = unit(pixel_hash(self.seed ^ 0xC0FFEE, x, y));
                if f[0] > 0.0 || f[1] > 0.62 {
                    // Glass, or a tear / fat vacuole.
                    hb[i] = 0;
                    eb[i] = conc(0.015 * grain);
                    continue;
                }
                let plate = f[2] - f[2].floor();
                let cross = f[3] - f[3].floor();
                if plate < self.sinusoid_frac || (cross < self.cross_frac && f[5] > -0.1) {
                    // Sinusoid: pale lumen, a red cell here and there.
                    if self.red_cell(x, y, 3.0, 0.12, 5) {
                        hb[i] = conc(0.05);
                        eb[i] = conc(1.05 + 0.2 * grain);
                    } else {
                        hb[i] = conc(0.03 + 0.03 * grain);
                        eb[i] = conc(0.10 + 0.06 * grain);
                    }
                    continue;
                }
                // Edge of the tissue: a thin darker eosin rim.
                let edge = if f[0] > -0.004 { 0.12 } else { 0.0 };
                hb[i] = conc(self.cyto_h * (0.8 + 0.4 * grain));
                eb[i] = conc(self.cyto_e * (1.0 + 0.18 * f[4]) * (0.85 + 0.3 * grain) + edge);
            }
        }
    }

    /// Nuclei of the cells whose centre lies in a plate, painted over the base.
    fn nuclei(&self, region: &Region, hb: &mut [u8], eb: &mut [u8]) {
        let cell = self.cell;
        let max_r = self.nucleus_r * (1.0 + 3.0 * self.pleomorphism) * 1.35;
        let margin = (max_r + cell) as i64 + 1;
        let lat = Lattice::new(self, region, margin);
        let x_lo = ((region.x0 - margin) as f32 / cell).floor() as i64;
        let x_hi = ((region.x0 + region.w as i64 + margin) as f32 / cell).ceil() as i64;
        let y_lo = ((region.y0 - margin) as f32 / cell).floor() as i64;
        let y_hi = ((region.y0 + region.h as i64 + margin) as f32 / cell).ceil() as i64;
        for gy in y_lo..=y_hi {
            for gx in x_lo..=x_hi {
                let hsh = hash3(self.seed ^ 7, gx, gy, 0);
                if unit(hsh) >= self.presence {
                    continue;
                }
                let j = |k: u32| unit(mix64(hsh ^ u64::from(k)));
                let cx = (gx as f32 + 0.15 + 0.7 * j(1)) * cell;
                let cy = (gy as f32 + 0.15 + 0.7 * j(2)) * cell;
                let f = lat.point(cx as f64, cy as f64);
                let (plate, cross) = (f[2] - f[2].floor(), f[3] - f[3].floor());
                if f[0] > -0.005 || f[1] > 0.62 || plate < self.sinusoid_frac * 1.5 || cross < self.cross_frac * 1.5 {
                    continue;
                }
                // Size: log-normal around the grade's radius (sum of uniforms ≈ normal).
                let n = (j(3) + j(4) + j(5) - 1.5) * 2.0;
                let r = (self.nucleus_r * (self.pleomorphism * n).exp()).min(max_r / 1.3);
                let aspect = 1.0 + (0.15 + 0.6 * self.pleomorphism) * j(6);
                let theta = std::f32::consts::PI * j(7);
                let darkness = self.nucleus_h * (0.85 + 0.3 * j(8));
                let nucleolus = self.nucleolus && j(9) < 0.7;
                self.paint_nucleus(
                    region,
                    hb,
                    eb,
                    (cx, cy),
                    (r * aspect, r / aspect.sqrt()),
                    theta,
                    darkness,
                    nucleolus,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn paint_nucleus(
        &self,
        region: &Region,
        hb: &mut [u8],
        eb: &mut [u8],
        (cx, cy): (f32, f32),
        (a, b): (f32, f32),
        theta: f32,
        darkness: f32,
        nucleolus: bool,
    ) {
        let (ct, st) = (theta.cos(), theta.sin());
        let reach = a.max(b) + 1.0;
        let x_lo = ((cx - reach).floor() as i64).max(region.x0);
        let x_hi = ((cx + reach).ceil() as i64).min(region.x0 + region.w as i64 - 1);
        let y_lo = ((cy - reach).floor() as i64).max(region.y0);
        let y_hi = ((cy + reach).ceil() as i64).min(region.y0 + region.h as i64 - 1);
        let (ia2, ib2) = (1.0 / (a * a), 1.0 / (b * b));
        let nr2 = (0.22 * b).max(1.0).powi(2);
        let (nx, ny) = (cx + 0.25 * a * ct, cy + 0.25 * a * st);
        for y in y_lo..=y_hi {
            let dy = y as f32 + 0.5 - cy;
            let row = (y - region.y0) as usize * region.w;
            for x in x_lo..=x_hi {
                let dx = x as f32 + 0.5 - cx;
                let (u, v) = (dx * ct + dy * st, -dx * st + dy * ct);
                let q = u * u * ia2 + v * v * ib2;
                if q >= 1.0 {
                    continue;
                }
                let grain = unit(pixel_hash(self.seed ^ 0xBEEF, x, y));
                let mut hc = darkness * (0.7 + 0.5 * grain) + if q > 0.72 { 0.3 } else { 0.0 };
                let mut ec = 0.12 + 0.06 * grain;
                if nucleolus {
                    let (ex, ey) = (x as f32 + 0.5 - nx, y as f32 + 0.5 - ny);
                    if ex * ex + ey * ey < nr2 {
                        hc += 0.35;
                        ec += 0.45;
                    }
                }
                let i = row + (x - region.x0) as usize;
                hb[i] = conc(hc);
                eb[i] = conc(ec);
            }
        }
    }

    /// Vessels over everything: wall, lumen with red cells, tumour emboli.
    fn paint_vessels(&self, region: &Region, hb: &mut [u8], eb: &mut [u8]) {
        let (rx0, ry0) = (region.x0 as f32, region.y0 as f32);
        let (rx1, ry1) = (rx0 + region.w as f32, ry0 + region.h as f32);
        for v in &self.vessels {
            let reach = v.lumen + v.wall + 1.0;
            if v.x + reach < rx0 || v.x - reach > rx1 || v.y + reach < ry0 || v.y - reach > ry1 {
                continue;
            }
            let x_lo = ((v.x - reach).floor() as i64).max(region.x0);
            let x_hi = ((v.x + reach).ceil() as i64).min(region.x0 + region.w as i64 - 1);
            let y_lo = ((v.y - reach).floor() as i64).max(region.y0);
            let y_hi = ((v.y + reach).ceil() as i64).min(region.y0 + region.h as i64 - 1);
            let emb_cell = self.cell * 0.7;
            for y in y_lo..=y_hi {
                for x in x_lo..=x_hi {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    let d = (px - v.x).hypot(py - v.y);
                    if d > v.lumen + v.wall {
                        continue;
                    }
                    let grain = unit(pixel_hash(self.seed ^ 0xFACE, x, y));
                    let i = (y - region.y0) as usize * region.w + (x - region.x0) as usize;
                    let (mut hc, mut ec);
                    if d > v.lumen {
                        // Wall: dense eosinophilic, with flat nuclei streaks along the circumference.
                        let angle = (py - v.y).atan2(px - v.x);
                        let streak = ((angle * v.lumen / (1.5 * self.cell)).sin() * 0.5 + 0.5) > 0.93
                            && (d - v.lumen - 0.5 * v.wall).abs() < 0.25 * v.wall;
                        hc = if streak { 0.85 } else { 0.10 + 0.05 * grain };
                        ec = 0.75 + 0.2 * grain;
                    } else {
                        // Lumen: plasma and red cells.
                        hc = 0.02;
                        ec = if self.red_cell(x, y, 2.2, 0.5, 11) { 1.0 + 0.2 * grain } else { 0.12 + 0.05 * grain };
                    }
                    if let Some((ex, ey, er)) = v.embolus {
                        let de = (px - ex).hypot(py - ey);
                        if de < er && d <= v.lumen {
                            // Tumour embolus: basophilic cells packed, one large nucleus per small cell.
                            let (gx, gy) = ((px / emb_cell).floor(), (py / emb_cell).floor());
                            let hsh = hash3(self.seed ^ 13, gx as i64, gy as i64, 0);
                            let ncx = (gx + 0.3 + 0.4 * unit(mix64(hsh ^ 1))) * emb_cell;
                            let ncy = (gy + 0.3 + 0.4 * unit(mix64(hsh ^ 2))) * emb_cell;
                            let nr = self.nucleus_r * 1.1 * (0.8 + 0.4 * unit(mix64(hsh ^ 3)));
                            let dn = (px - ncx).hypot(py - ncy);
                            if dn < nr {
                                hc = self.nucleus_h * (0.8 + 0.5 * grain) + if dn > 0.8 * nr { 0.3 } else { 0.0 };
                                ec = 0.15;
                            } else {
                                hc = 0.2 + 0.08 * grain;
                                ec = 0.38 + 0.1 * grain;
                            }
                        }
                    }
                    hb[i] = conc(hc);
                    eb[i] = conc(ec);
                }
            }
        }
    }
}

/// A rendering chunk in level-0 pixels.
struct Region {
    x0: i64,
    y0: i64,
    w: usize,
    h: usize,
}

/// The smooth fields on the global 16-pixel lattice over a region (plus a margin).
struct Lattice {
    gx0: i64,
    gy0: i64,
    nx: usize,
    ny: usize,
    values: Vec<[f32; NF]>,
}

impl Lattice {
    fn new(r: &SlideRenderer, region: &Region, margin: i64) -> Self {
        let gx0 = (region.x0 - margin).div_euclid(LATTICE);
        let gy0 = (region.y0 - margin).div_euclid(LATTICE);
        let gx1 = (region.x0 + region.w as i64 + margin).div_euclid(LATTICE) + 1;
        let gy1 = (region.y0 + region.h as i64 + margin).div_euclid(LATTICE) + 1;
        let (nx, ny) = ((gx1 - gx0 + 1) as usize, (gy1 - gy0 + 1) as usize);
        let mut values = Vec::with_capacity(nx * ny);
        for gy in gy0..=gy1 {
            for gx in gx0..=gx1 {
                values.push(r.node((gx * LATTICE) as f64, (gy * LATTICE) as f64));
            }
        }
        Self { gx0, gy0, nx, ny, values }
    }

    /// The fields interpolated along y at pixel row `y`, one entry per lattice column.
    fn row(&self, y: i64, out: &mut [[f32; NF]]) {
        let t = y - self.gy0 * LATTICE;
        let (j, fy) = ((t / LATTICE) as usize, (t % LATTICE) as f32 / LATTICE as f32);
        let j = j.min(self.ny - 2);
        for (i, o) in out.iter_mut().enumerate().take(self.nx) {
            let (a, b) = (&self.values[j * self.nx + i], &self.values[(j + 1) * self.nx + i]);
            *o = std::array::from_fn(|k| a[k] + (b[k] - a[k]) * fy);
        }
    }

    /// The fields at pixel `x` of a row from [`Lattice::row`].
    #[inline]
    fn at(&self, row: &[[f32; NF]], x: i64) -> [f32; NF] {
        let t = x - self.gx0 * LATTICE;
        let (i, fx) = ((t / LATTICE) as usize, (t % LATTICE) as f32 / LATTICE as f32);
        let i = i.min(self.nx - 2);
        let (a, b) = (&row[i], &row[i + 1]);
        std::array::from_fn(|k| a[k] + (b[k] - a[k]) * fx)
    }

    /// The fields at any point inside the lattice (clamped to it).
    fn point(&self, x: f64, y: f64) -> [f32; NF] {
        let tx = ((x / LATTICE as f64) - self.gx0 as f64).clamp(0.0, (self.nx - 1) as f64 - 1e-6);
        let ty = ((y / LATTICE as f64) - self.gy0 as f64).clamp(0.0, (self.ny - 1) as f64 - 1e-6);
        let (i, j) = (tx as usize, ty as usize);
        let (fx, fy) = ((tx - i as f64) as f32, (ty - j as f64) as f32);
        let v = |di: usize, dj: usize| &self.values[(j + dj) * self.nx + i + di];
        std::array::from_fn(|k| {
            let top = v(0, 0)[k] + (v(1, 0)[k] - v(0, 0)[k]) * fx;
            let bottom = v(0, 1)[k] + (v(1, 1)[k] - v(0, 1)[k]) * fx;
            top + (bottom - top) * fy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Slide, tissue_mask};

    fn phantom(grade: u8, mvi: Mvi, seed: u64) -> SlidePhantom {
        SlidePhantom {
            width: 768,
            height: 512,
            mpp: 0.5,
            tile: 256,
            levels: 3,
            downsample: 2,
            quality: 85,
            grade,
            mvi,
            latent_risk: 0.0,
            stain: Stain::reference(),
            seed,
        }
    }

    fn render(p: &SlidePhantom) -> Vec<u8> {
        let mut rgb = vec![0u8; (p.width * p.height * 3) as usize];
        p.renderer().expect("valid").render(0, 0, p.width, p.height, &mut rgb);
        rgb
    }

    /// Share of tissue pixels (saturated) that are nuclear (dark, haematoxylin-blue).
    fn nuclear_fraction(rgb: &[u8]) -> f64 {
        let (mut tissue, mut nuclear) = (0.0, 0.0);
        for px in rgb.chunks_exact(3) {
            let (r, g, b) = (i32::from(px[0]), i32::from(px[1]), i32::from(px[2]));
            let (max, min) = (r.max(g).max(b), r.min(g).min(b));
            if max - min < 25 {
                continue;
            }
            tissue += 1.0;
            if (r + g + b) / 3 < 150 && b > r {
                nuclear += 1.0;
            }
        }
        nuclear / tissue
    }

    #[test]
    fn regions_render_the_same_whatever_the_tiling() {
        let p = phantom(3, Mvi::M2, 5);
        let whole = render(&p);
        let r = p.renderer().expect("valid");
        let (x0, y0, w, h) = (300, 130, 301, 97);
        let mut part = vec![0u8; (w * h * 3) as usize];
        r.render(x0, y0, w, h, &mut part);
        for row in 0..h {
            let src = (((y0 + row) * p.width + x0) * 3) as usize;
            assert_eq!(
                &part[(row * w * 3) as usize..((row + 1) * w * 3) as usize],
                &whole[src..src + (w * 3) as usize]
            );
        }
    }

    #[test]
    fn nuclear_density_rises_with_grade() {
        let mean = |grade| (0..3).map(|s| nuclear_fraction(&render(&phantom(grade, Mvi::M0, s)))).sum::<f64>() / 3.0;
        let (g1, g2, g3, g4) = (mean(1), mean(2), mean(3), mean(4));
        assert!(g1 < g2 && g2 < g3 && g3 < g4, "nuclear fraction by grade {g1:.3} {g2:.3} {g3:.3} {g4:.3}");
        assert!(g4 > 2.0 * g1, "grade 4 {g4:.3} vs grade 1 {g1:.3}");
    }

    #[test]
    fn invaded_vessels_follow_mvi() {
        let count =
            |mvi| phantom(2, mvi, 9).renderer().expect("valid").vessels.iter().filter(|v| v.embolus.is_some()).count();
        assert_eq!(count(Mvi::M0), 0);
        assert!((1..=2).contains(&count(Mvi::M1)));
        assert!(count(Mvi::M2) >= 3);
        assert!(!phantom(2, Mvi::M0, 9).renderer().expect("valid").vessels.is_empty());
    }

    #[test]
    fn written_slide_opens_and_has_tissue_to_find() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slide.tif");
        let p = phantom(2, Mvi::M1, 3);
        let bytes = p.write(&path, &mut |_, _| {}).expect("writes");
        assert_eq!(bytes, std::fs::metadata(&path).expect("exists").len());
        let slide = Slide::open(&path).expect("opens");
        assert_eq!(slide.levels().len(), 3);
        assert!((slide.mpp().expect("mpp") - 0.5).abs() < 1e-6);
        let read = slide.read_region(0, 0, 0, 768, 512).expect("reads");
        let direct = render(&p);
        let err = read.iter().zip(&direct).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / read.len() as f64;
        assert!(err < 8.0, "mean absolute JPEG error {err}");
        let mask = tissue_mask(&slide).expect("mask");
        let f = mask.fraction();
        assert!((0.3..0.9).contains(&f), "tissue fraction {f}");
        let bad = SlidePhantom { grade: 5, ..p };
        assert!(bad.write(&dir.path().join("bad.tif"), &mut |_, _| {}).is_err());
    }
}
