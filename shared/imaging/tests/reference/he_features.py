#!/usr/bin/env python3
"""Reference values for fedhcc-imaging's `HandcraftedHe` patch features, from numpy + scikit-image.

Run from the workspace root:

    python3 shared/imaging/tests/reference/he_features.py

It writes `he_features.json` next to itself. The Rust test `tests/imaging/features.rs` recomputes the same
features and compares.

Tiles:
- three tiles of the fixture `tests/fixtures/wsi/he_tissue_pyramid.tif`, decoded by tifffile (libjpeg-turbo).
  The Rust reader decodes JPEG with zune-jpeg, which differs by +-1 grey level on about 0.75 % of samples, so
  exact agreement is impossible. For each tile the script measures each feature's sensitivity to that kind
  of difference (+-1 on 2 % of samples, random or one-signed, 8 draws) and stores a per-feature tolerance of
  3x the largest deviation seen, plus 1e-5.
- hand-made tiles from integer formulas (`synthetic_tile`, mirrored in the Rust test), whose pixels are
  identical on both sides, so the features must agree to float rounding (tolerance stated in the test).

Feature definitions (must match `HandcraftedHe` in src/slide/features.rs):
- H, E: `6 * skimage.color.rgb2hed(rgb)` (= Ruifrok-Johnston deconvolution of -log10 optical density).
- OD per channel: -log10(max(v / 255, 1e-6)); background: R+G+B OD < 0.25; H-dominant: tissue with H > E.
- nuclear: H > 0.4; nuclei: 8-connected blobs (skimage.measure.label, connectivity=2) of >= 10 pixels.
- GLCM: H quantised min(floor(H * 16 / 1.2), 15), distance 1, angles 0/45/90/135 deg, symmetric, normed;
  graycoprops contrast/homogeneity/energy/correlation averaged over the angles.
- LBP: local_binary_pattern(grey, P=8, R=1, method="uniform"), grey = (299 R + 587 G + 114 B + 500) // 1000;
  10-bin histogram as fractions.
"""

import json
import pathlib

import numpy as np
import skimage
import tifffile
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.measure import label

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "wsi" / "he_tissue_pyramid.tif"

NAMES = (
    ["h_od_mean", "h_od_std", "h_od_p10", "h_od_p50", "h_od_p90"]
    + ["e_od_mean", "e_od_std", "e_od_p10", "e_od_p50", "e_od_p90"]
    + ["od_mean", "background_fraction", "h_dominant_fraction", "e_dominant_fraction"]
    + ["h_od_tissue_mean", "e_od_tissue_mean"]
    + ["nuclear_fraction", "nuclei_per_10k_px", "nucleus_mean_area_px"]
    + ["glcm_h_contrast", "glcm_h_homogeneity", "glcm_h_energy", "glcm_h_correlation"]
    + [f"lbp_{k}" for k in range(10)]
    + ["grey_mean", "grey_std"]
)


def he_features(rgb):
    rgb = np.asarray(rgb, dtype=np.uint8)
    s = rgb.shape[0]
    n = s * s
    hed = rgb2hed(rgb) * 6.0
    h, e = hed[..., 0], hed[..., 1]
    od = -np.log10(np.maximum(rgb / 255.0, 1e-6))
    od_sum = od.sum(axis=-1)
    background = od_sum < 0.25
    tissue = ~background
    h_dominant = tissue & (h > e)
    e_dominant = tissue & ~(h > e)
    nuclear = h > 0.4
    labels = label(nuclear, connectivity=2)
    areas = np.bincount(labels.ravel())[1:]
    nuclei = areas[areas >= 10]
    levels = np.minimum((h * (16 / 1.2)).astype(np.int64), 15).astype(np.uint8)
    glcm = graycomatrix(levels, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=16, symmetric=True, normed=True)
    texture = [float(graycoprops(glcm, p).mean()) for p in ("contrast", "homogeneity", "energy", "correlation")]
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    grey = ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)
    lbp = local_binary_pattern(grey, 8, 1, method="uniform")
    hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=10) / n
    n_tissue = int(tissue.sum())
    values = (
        [h.mean(), h.std(), *np.percentile(h, [10, 50, 90])]
        + [e.mean(), e.std(), *np.percentile(e, [10, 50, 90])]
        + [od_sum.mean() / 3.0, background.mean(), h_dominant.mean(), e_dominant.mean()]
        + [h[tissue].sum() / n_tissue if n_tissue else 0.0, e[tissue].sum() / n_tissue if n_tissue else 0.0]
        + [nuclear.mean(), len(nuclei) * 10_000.0 / n, nuclei.mean() if len(nuclei) else 0.0]
        + texture
        + list(hist)
        + [grey.mean() / 255.0, grey.std() / 255.0]
    )
    assert len(values) == len(NAMES)
    return [float(v) for v in values]


M32 = 0xFFFFFFFF


def hash32(v):
    """murmur3's 32-bit finaliser."""
    v &= M32
    v ^= v >> 16
    v = (v * 0x85EBCA6B) & M32
    v ^= v >> 13
    v = (v * 0xC2B2AE35) & M32
    v ^= v >> 16
    return v


def synthetic_tile(pattern, side, seed):
    """Hand-made tiles; `synthetic_tile` in tests/imaging/features.rs builds the same pixels."""
    img = np.zeros((side, side, 3), dtype=np.uint8)

    def noise(x, y, c, amp):
        return hash32(x + 1000 * y + 1_000_000 * c + 7919 * seed) % (2 * amp + 1) - amp

    def clamp(v):
        return max(0, min(255, v))

    if pattern == "he_like":
        # Pink stroma, purple round nuclei of radius 3-7 and a white gap, all with noise.
        discs = [
            (hash32(2 * k + 1 + seed) % side, hash32(2 * k + 2 + seed) % side, 3 + hash32(k + 100 + seed) % 5)
            for k in range(side * side // 400)
        ]
        for y in range(side):
            for x in range(side):
                if side // 2 <= x < side // 2 + side // 5 and side // 4 <= y < side // 4 + side // 6:
                    base, amp = (245, 243, 246), 3
                elif any((x - cx) ** 2 + (y - cy) ** 2 <= r * r for cx, cy, r in discs):
                    base, amp = (95, 62, 140), 12
                else:
                    base, amp = (228, 160, 205), 10
                for c in range(3):
                    img[y, x, c] = clamp(base[c] + noise(x, y, c, amp))
    elif pattern == "checker":
        # 4-pixel checkerboard of haematoxylin blue and eosin pink: strong texture, exact ties in LBP.
        for y in range(side):
            for x in range(side):
                img[y, x] = (70, 50, 150) if ((x // 4) + (y // 4)) % 2 == 0 else (240, 120, 180)
    elif pattern == "gradient":
        # Every grey level including 0 and 255 (optical density floor), varying hue.
        for y in range(side):
            for x in range(side):
                img[y, x] = ((x * 255) // (side - 1), (y * 255) // (side - 1), ((x + y) * 255) // (2 * side - 2))
    elif pattern == "white":
        img[:] = 255
    else:
        raise ValueError(pattern)
    return img


def checksum(rgb):
    """Order-sensitive checksum the Rust test recomputes to prove it built the same pixels."""
    flat = rgb.astype(np.uint64).ravel()
    return int((flat * (np.arange(flat.size, dtype=np.uint64) % 65521 + 1)).sum() % (1 << 61))


def sensitivity(rgb, base, rate=0.02):
    """Largest change of each feature over 8 draws of +-1 on `rate` of the samples: 4 with random signs, 2 all
    +1 and 2 all -1 (decoder rounding can be biased, which moves means more than random noise does)."""
    rng = np.random.default_rng(20240730)
    worst = np.zeros(len(base))
    for sign in [0, 0, 0, 0, 1, 1, -1, -1]:
        hit = rng.random(rgb.shape) < rate
        step = rng.choice([-1, 1], size=rgb.shape) if sign == 0 else np.full(rgb.shape, sign)
        noisy = np.clip(rgb.astype(np.int64) + hit * step, 0, 255).astype(np.uint8)
        worst = np.maximum(worst, np.abs(np.array(he_features(noisy)) - np.array(base)))
    return [float(3 * w + 1e-5) for w in worst]


def main():
    tiles = []
    with tifffile.TiffFile(FIXTURE) as tif:
        for level, x, y, side in [(0, 256, 256, 256), (0, 512, 0, 256), (1, 0, 0, 256)]:
            rgb = tif.pages[level].asarray()[y : y + side, x : x + side]
            feats = he_features(rgb)
            tiles.append(
                {
                    "source": "fixture",
                    "level": level,
                    "x": x,
                    "y": y,
                    "side": side,
                    "channel_means": [float(rgb[..., c].mean()) for c in range(3)],
                    "features": feats,
                    "tolerance": sensitivity(rgb, feats),
                }
            )
    for pattern, side, seed in [("he_like", 96, 7), ("he_like", 61, 3), ("checker", 40, 0), ("gradient", 50, 0), ("white", 32, 0)]:
        rgb = synthetic_tile(pattern, side, seed)
        tiles.append(
            {
                "source": "synthetic",
                "pattern": pattern,
                "side": side,
                "seed": seed,
                "checksum": checksum(rgb),
                "features": he_features(rgb),
            }
        )
    out = {
        "generator": f"he_features.py; numpy {np.__version__}, scikit-image {skimage.__version__}, "
        f"tifffile {tifffile.__version__}",
        "feature_names": NAMES,
        "tiles": tiles,
    }
    (HERE / "he_features.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
