#!/usr/bin/env python3
"""Checks an exported clinical model against `fedhcc validate`'s scores, outside fedhcc.

Loads the safetensors file with numpy (`fedhcc_model.py`, beside this script), checks that it is in
PyTorch's layout (the names and shapes `load_state_dict(strict=True)` of the matching `nn.Module`
expects), standardises the site's inputs with the statistics the model carries, runs the forward pass
and compares the probabilities with the `score` column of `predictions.csv`, row for row. With torch
installed it also loads the file into `fedhcc_model.ClinicalMLP` (strict) and compares its output.
Exits 1 when a score differs by more than the tolerance. Needs numpy and safetensors:

    pip install numpy safetensors
    fedhcc export --checkpoint model.fhcp --study configs/study.toml --out model.safetensors
    fedhcc validate --model model.safetensors --site-config configs/site-center_c.toml --out v --write-inputs
    python3 scripts/check_export.py --model model.safetensors --inputs v/inputs.csv --predictions v/predictions.csv
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fedhcc_model as fm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the safetensors file (fedhcc export, torch layout)")
    ap.add_argument("--inputs", required=True, help="inputs.csv of fedhcc validate --write-inputs")
    ap.add_argument("--predictions", required=True, help="predictions.csv of the same fedhcc validate")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest accepted |score difference|")
    args = ap.parse_args()

    tensors, meta = fm.load(args.model)
    if meta.get("layout") != "torch" or meta.get("model_kind") != "clinical":
        sys.exit(f"{args.model}: layout {meta.get('layout')!r}, model {meta.get('model_kind')!r}: "
                 "this check is for the clinical model in the torch layout")
    config = json.loads(meta["model_config"])
    numeric = json.loads(meta["clinical_numeric"])
    # What load_state_dict(strict=True) would check, from the architecture in the metadata.
    fm.check_state(tensors, fm.clinical_state_shapes(config, len(numeric)))

    x, columns = fm.read_inputs(args.inputs)
    if columns != json.loads(meta["clinical_columns"]):
        sys.exit(f"{args.inputs}: its columns are not the model's clinical_columns")
    with open(args.predictions, newline="") as f:
        expected = np.array([float(r["score"]) for r in csv.DictReader(f)])
    if len(expected) != len(x):
        sys.exit(f"{len(x)} rows of inputs, {len(expected)} predictions")

    scores = fm.numpy_clinical_forward(tensors, fm.standardise_clinical(tensors, meta, x))
    worst = float(np.max(np.abs(scores - expected))) if len(x) else 0.0
    print(f"numpy: {len(x)} patients, {len(config['hidden']) + 1} layers, {len(numeric)} standardised columns; "
          f"max |score - fedhcc validate| = {worst:.3g} (tolerance {args.tol:g})")
    failed = not worst <= args.tol

    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch: not installed, the PyTorch module was not checked")
    else:
        model = fm.torch_model(args.model).eval()
        with torch.no_grad():
            p = torch.sigmoid(model(torch.from_numpy(x)).double()).numpy()
        worst_torch = float(np.max(np.abs(p - expected))) if len(x) else 0.0
        print(f"torch: ClinicalMLP loaded with strict=True; max |score - fedhcc validate| = {worst_torch:.3g}")
        failed |= not worst_torch <= args.tol
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
