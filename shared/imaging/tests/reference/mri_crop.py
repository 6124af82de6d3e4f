#!/usr/bin/env python3
"""Independent reference for `fedhcc_imaging::preprocess_mri` (test `crop_matches_the_python_reference`).

Runs the documented pipeline *literally*, with nibabel and scipy instead of the crate's code:
  1. read tests/fixtures/mri/anatomical.nii with nibabel (phase "arterial") and derive phase "delayed" as
     30000 - arterial; phase "portal_venous" is absent;
  2. build the same synthetic mask as the Rust test (a box, one 0.7 voxel that counts, one 0.3 voxel that does
     not);
  3. resample the WHOLE volume to the target spacing with scipy.ndimage.map_coordinates(order=1) on the grid
     aligned with the crop box (the mask's bounding box widened by the margin, clamped to the volume,
     divided into round(extent / spacing) cells centred on it);
  4. crop those cells out of the resampled volume;
  5. resize the crop to the output grid with map_coordinates(order=1, mode="nearest"), pixel-centre convention;
  6. clip to numpy.percentile, z-score (population std);
  7. reorient to RAS with nibabel.orientations (io_orientation + apply_orientation) and order as (z, y, x).

The Rust code instead composes steps 3-5 into per-axis weight matrices applied to the box only; agreement
within 1e-4 shows that composition is exact. Writes mri_crop.json next to this script.

    pip install numpy scipy nibabel && python3 shared/imaging/tests/reference/mri_crop.py
"""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation
from scipy.ndimage import map_coordinates

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parents[3] / "tests" / "fixtures" / "mri" / "anatomical.nii"

CONFIG = {
    "phases": ["arterial", "portal_venous", "delayed"],
    "spacing_mm": [1.5, 1.5, 3.0],  # x, y, z (RAS)
    "margin_mm": 5.0,
    "grid": [10, 12, 10],  # z, y, x (z: 8 cropped cells up-sampled to 10)
    "clip_percentiles": [2.0, 98.0],
}
# Mask definition shared with the Rust test: inclusive voxel ranges of the box, plus two single voxels.
MASK_BOX = {"i": [12, 19], "j": [14, 25], "k": [9, 14]}
MASK_EXTRA = [{"ijk": [21, 20, 12], "value": 0.7}, {"ijk": [5, 5, 5], "value": 0.3}]


def axis_geometry(n, step, target, margin, lo, hi):
    """Crop along one voxel axis: the box (clamped to the volume), its cell count L and first sample position."""
    r = target / step
    m = margin / step
    a = max(lo - 0.5 - m, -0.5)
    b = min(hi + 0.5 + m, (n - 1) + 0.5)
    length = max(math.floor((b - a) / r + 0.5), 1)  # round half up (Rust's f64::round for positive values)
    first = (a + b) / 2 - (length - 1) / 2 * r
    return r, length, first


def main():
    img = nib.load(str(FIXTURE))
    arterial = np.asarray(img.dataobj, dtype=np.float32).astype(np.float64)
    affine = img.affine
    phases = {"arterial": arterial, "delayed": (np.float32(30000) - arterial.astype(np.float32)).astype(np.float64)}

    mask = np.zeros(arterial.shape, dtype=np.float32)
    (i0, i1), (j0, j1), (k0, k1) = MASK_BOX["i"], MASK_BOX["j"], MASK_BOX["k"]
    mask[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = 1.0
    for e in MASK_EXTRA:
        mask[tuple(e["ijk"])] = e["value"]
    tumour = mask >= 0.5
    idx = np.argwhere(tumour)
    bbox = [(int(idx[:, a].min()), int(idx[:, a].max())) for a in range(3)]
    tumour_ml = float(tumour.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0)

    ornt = io_orientation(affine)  # per voxel axis: (RAS axis, +1/-1)
    spacing_xyz = CONFIG["spacing_mm"]
    grid_xyz = CONFIG["grid"][::-1]
    steps = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    geo, out_shape, box_size = [], [], [0.0, 0.0, 0.0]
    for v in range(3):
        world = int(ornt[v, 0])
        r, length, first = axis_geometry(
            arterial.shape[v], steps[v], spacing_xyz[world], CONFIG["margin_mm"], *bbox[v]
        )
        # The whole volume's resampled grid: every sample first + k*r (k may be negative) within the volume's
        # extent [-0.5, n - 0.5]; the crop is k = 0 .. length-1 of it.
        n = arterial.shape[v]
        k_lo = math.ceil((-0.5 - first) / r)
        k_hi = math.floor((n - 0.5 - first) / r)
        geo.append((r, length, first, k_lo, k_hi))
        out_shape.append(grid_xyz[world])
        box_size[world] = length * spacing_xyz[world]

    values = {}
    for name, vol in phases.items():
        # 3. resample the whole volume to the target spacing (edge values beyond the last voxel centres).
        coords = np.meshgrid(*[first + np.arange(k_lo, k_hi + 1) * r for r, _, first, k_lo, k_hi in geo], indexing="ij")
        resampled = map_coordinates(vol, coords, order=1, mode="nearest")
        # 4. crop: samples k = 0 .. length-1.
        crop = resampled[tuple(slice(-k_lo, -k_lo + length) for _, length, _, k_lo, _ in geo)]
        # 5. resize (pixel centres, edge values repeat).
        axes = []
        for v in range(3):
            length, size = crop.shape[v], out_shape[v]
            u = (np.arange(size) + 0.5) * length / size - 0.5
            axes.append(np.clip(u, 0, length - 1))
        resized = map_coordinates(crop, np.meshgrid(*axes, indexing="ij"), order=1, mode="nearest")
        # 6. clip + z-score.
        lo, hi = np.percentile(resized, CONFIG["clip_percentiles"])
        clipped = np.clip(resized, lo, hi)
        z = (clipped - clipped.mean()) / clipped.std()
        # 7. RAS orientation, (z, y, x) with x fastest.
        ras = apply_orientation(z, ornt)
        values[name] = [round(float(x), 8) for x in np.transpose(ras, (2, 1, 0)).ravel()]

    out = {
        "generator": f"mri_crop.py (nibabel {nib.__version__}, numpy {np.__version__}, scipy "
        f"{__import__('scipy').__version__})",
        "fixture": "tests/fixtures/mri/anatomical.nii",
        "config": CONFIG,
        "mask_box": MASK_BOX,
        "mask_extra": MASK_EXTRA,
        "orientation": ornt.tolist(),
        "box_size_mm": box_size,
        "tumour_volume_ml": tumour_ml,
        "values": values,
    }
    (HERE / "mri_crop.json").write_text(json.dumps(out, indent=1) + "\n")
    print("box_size_mm", box_size, "tumour_volume_ml", tumour_ml, "orientation", ornt.tolist())


if __name__ == "__main__":
    main()
