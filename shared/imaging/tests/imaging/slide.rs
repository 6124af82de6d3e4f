//! Slides against tifffile's numbers, rejection of broken files, tissue masks, and the pyramid writer.

use fedhcc_imaging::{Compression, ImagingError, Slide, SlideFormat, tissue_mask, write_pyramid_tiff};
use serde_json::Value;

use crate::reference::{assert_abs, assert_rel, copy_into, f64_of, f64s, fixture, reference, usizes};

const READABLE: [&str; 3] = ["small.svs", "boxes.tiff", "he_tissue_pyramid.tif"];

fn wsi_reference(name: &str) -> Value {
    reference()["wsi"][name].clone()
}

/// Mean difference per sample allowed against tifffile (libjpeg-turbo): JPEG decoders round the IDCT and
/// chroma upsampling differently (zune-jpeg is within 0.01 on these fixtures); lossless tiles agree exactly.
fn per_sample_tolerance(c: Compression) -> f64 {
    if c == Compression::Jpeg { 0.05 } else { 1e-3 }
}

#[test]
fn slides_match_tifffile_structure() {
    for name in READABLE {
        let r = wsi_reference(name);
        let slide = Slide::open(&fixture(&format!("wsi/{name}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(slide.format() == SlideFormat::Aperio, r["is_svs"].as_bool().expect("is_svs"), "{name}: SVS?");
        let shapes: Vec<Vec<usize>> = r["levels_shape_yx_c"].as_array().expect("levels").iter().map(usizes).collect();
        let got: Vec<Vec<usize>> =
            slide.levels().iter().map(|l| vec![l.height as usize, l.width as usize, 3]).collect();
        assert_eq!(got, shapes, "{name}: level shapes");
        let tile = usizes(&r["tile"]);
        let level0 = slide.levels()[0];
        assert_eq!(vec![level0.tile_h as usize, level0.tile_w as usize], tile, "{name}: tile size");
        let compression = match r["compression"].as_str().expect("compression") {
            "JPEG" => Compression::Jpeg,
            "ADOBE_DEFLATE" | "DEFLATE" => Compression::Deflate,
            "LZW" => Compression::Lzw,
            "NONE" => Compression::None,
            other => panic!("{name}: compression {other} not mapped in this test"),
        };
        assert!(slide.levels().iter().all(|l| l.compression == compression), "{name}: compression");
        let head = r["image_description_head"].as_str().expect("description");
        assert!(slide.description().starts_with(head), "{name}: description {:?}", slide.description());

        match (r.get("x_resolution"), r.get("resolution_unit").and_then(Value::as_u64)) {
            (Some(xres), Some(unit)) => {
                let xres = f64s(xres);
                let per_unit = xres[0] / xres[1];
                let microns_per_unit = if unit == 3 { 10_000.0 } else { 25_400.0 };
                assert_rel(&format!("{name}: mpp"), slide.mpp().expect("mpp"), microns_per_unit / per_unit, 1e-9);
            }
            _ => {
                // SVS: Aperio's own "MPP = …" key; REFERENCE.json does not repeat it, so check it is plausible.
                let mpp = slide.mpp().expect("SVS declares MPP");
                assert!((0.1..2.0).contains(&mpp), "{name}: mpp {mpp}");
            }
        }
    }
}

#[test]
fn level0_pixels_match_tifffile() {
    for name in READABLE {
        let r = wsi_reference(name);
        let slide = Slide::open(&fixture(&format!("wsi/{name}"))).expect("opens");
        let l0 = slide.levels()[0];
        let tol = per_sample_tolerance(l0.compression);
        let rgb = slide.read_region(0, 0, 0, l0.width, l0.height).expect("level 0 decodes");
        let n = f64::from(l0.width * l0.height);
        let want = f64s(&r["level0_mean_per_channel"]);
        for (c, want) in want.into_iter().enumerate() {
            let mean = rgb.iter().skip(c).step_by(3).map(|&v| f64::from(v)).sum::<f64>() / n;
            assert_abs(&format!("{name}: level-0 mean of channel {c}"), mean, want, tol);
        }
        let region = slide.read_region(0, 0, 0, 16, 16).expect("region decodes");
        let sum: f64 = region.iter().map(|&v| f64::from(v)).sum();
        let want_sum = f64_of(&r, "level0_region_y0_x0_h16_w16_sum");
        assert_abs(&format!("{name}: 16×16 region sum"), sum, want_sum, tol * region.len() as f64);
    }
}

#[test]
fn regions_across_tile_borders_agree_with_the_whole_level() {
    for name in READABLE {
        let slide = Slide::open(&fixture(&format!("wsi/{name}"))).expect("opens");
        for (level, l) in slide.levels().iter().enumerate() {
            let whole = slide.read_region(level, 0, 0, l.width, l.height).expect("level decodes");
            let (x, y) = (l.width / 3, l.height / 3);
            let (w, h) = (l.width / 2 + 1, l.height / 2 + 1);
            let part = slide.read_region(level, x, y, w, h).expect("region decodes");
            for row in 0..h {
                let src = (((y + row) * l.width + x) * 3) as usize;
                let dst = (row * w * 3) as usize;
                let n = (w.min(l.width - x) * 3) as usize;
                assert_eq!(part[dst..dst + n], whole[src..src + n], "{name} level {level} row {row}");
            }
        }
    }
}

#[test]
fn pixels_outside_the_level_are_white() {
    let slide = Slide::open(&fixture("wsi/boxes.tiff")).expect("opens");
    let l = slide.levels()[0];
    let rgb = slide.read_region(0, l.width - 1, l.height - 1, 4, 4).expect("reads");
    assert!(rgb[3..].iter().all(|&v| v == 255));
    let err = slide.read_region(9, 0, 0, 1, 1).expect_err("no level 9");
    assert!(matches!(err, ImagingError::InvalidRequest { .. }), "{err:?}");
}

#[test]
fn unopenable_tiff_is_rejected_naming_the_file() {
    let r = wsi_reference("unopenable.tiff");
    assert!(r["error"].as_str().is_some_and(|e| e.contains("52479")), "reference says tifffile failed");
    let err = Slide::open(&fixture("wsi/unopenable.tiff")).expect_err("must not open");
    let msg = err.to_string();
    assert!(msg.contains("unopenable.tiff") && msg.contains("52479"), "{msg}");
}

#[test]
fn unreadable_svs_fails_naming_the_file() {
    let path = fixture("wsi/unreadable.svs");
    let err = match Slide::open(&path) {
        Err(e) => e,
        Ok(slide) => {
            let l = slide.levels()[0];
            slide.read_region(0, 0, 0, l.width, l.height).expect_err("its tile is corrupt")
        }
    };
    assert!(err.to_string().contains("unreadable.svs"), "{err}");
}

#[test]
fn truncated_slides_give_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in READABLE {
        let path = copy_into(dir.path(), &format!("wsi/{name}"));
        let bytes = std::fs::read(&path).expect("read");
        for keep in [0, 7, bytes.len() / 4, bytes.len() / 2, bytes.len() * 9 / 10, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..keep]).expect("write");
            let outcome = Slide::open(&path).and_then(|slide| {
                for (i, l) in slide.levels().iter().enumerate() {
                    slide.read_region(i, 0, 0, l.width, l.height)?;
                }
                Ok(())
            });
            if let Err(e) = outcome {
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
}

#[test]
fn a_corrupt_deflate_tile_is_a_tile_error_naming_the_file() {
    // boxes.tiff stores level 0's tiles between the header and the first directory: zero them, keep the rest.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_into(dir.path(), "wsi/boxes.tiff");
    let mut bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[..2], b"II", "fixture is little-endian");
    let first_ifd = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    bytes[8..first_ifd].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let slide = Slide::open(&path).expect("directories are intact");
    let l0 = slide.levels()[0];
    let err = slide.read_region(0, 0, 0, l0.width, l0.height).expect_err("level-0 tiles are zeroed");
    assert!(matches!(err, ImagingError::Tile { level: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("boxes.tiff"), "{err}");
    // The other levels' tiles are untouched and still read.
    let l1 = slide.levels()[1];
    slide.read_region(1, 0, 0, l1.width, l1.height).expect("level 1 still decodes");
}

#[test]
fn zeroed_jpeg_data_does_not_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = copy_into(dir.path(), "wsi/he_tissue_pyramid.tif");
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid..mid + 4096].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let slide = Slide::open(&path).expect("directories are intact");
    let l0 = slide.levels()[0];
    // JPEG decoders may accept zeroed entropy data; what matters is pixels or an error, never a panic.
    if let Err(e) = slide.read_region(0, 0, 0, l0.width, l0.height) {
        assert!(e.to_string().contains("he_tissue_pyramid.tif"), "{e}");
    }
}

#[test]
fn he_tissue_is_mostly_tissue() {
    let slide = Slide::open(&fixture("wsi/he_tissue_pyramid.tif")).expect("opens");
    let mask = tissue_mask(&slide).expect("mask");
    let smallest = slide.levels()[slide.levels().len() - 1];
    assert_eq!((mask.width, mask.height), (smallest.width as usize, smallest.height as usize));
    let f = mask.fraction();
    assert!((0.4..=1.0).contains(&f), "tissue fraction {f}, threshold {}", mask.threshold);
}

#[test]
fn tissue_mask_is_deterministic() {
    let slide = Slide::open(&fixture("wsi/boxes.tiff")).expect("opens");
    let a = tissue_mask(&slide).expect("mask");
    let b = tissue_mask(&slide).expect("mask");
    assert_eq!(a, b);
    assert!((0.0..=1.0).contains(&a.fraction()));
}

#[test]
fn written_pyramid_reads_back_losslessly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, h) = (700u32, 500u32);
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [(x % 256) as u8, (y % 256) as u8, ((x + y) / 5 % 256) as u8]
        })
        .collect();
    let path = dir.path().join("synthetic.tif");
    write_pyramid_tiff(&path, &rgb, w, h, 256, 3, 0.5).expect("writes");
    let slide = Slide::open(&path).expect("opens");
    let dims: Vec<(u32, u32)> = slide.levels().iter().map(|l| (l.width, l.height)).collect();
    assert_eq!(dims, vec![(700, 500), (350, 250), (175, 125)]);
    assert!(slide.levels().iter().all(|l| l.compression == Compression::Deflate && l.tile_w == 256));
    assert_rel("mpp", slide.mpp().expect("mpp"), 0.5, 1e-9);
    assert_eq!(slide.read_region(0, 0, 0, w, h).expect("reads"), rgb);
    let small = slide.read_region(2, 0, 0, 175, 125).expect("reads");
    assert_eq!(small.len(), 175 * 125 * 3);
}
