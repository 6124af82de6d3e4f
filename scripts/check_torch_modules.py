#!/usr/bin/env python3
"""Checks the PyTorch modules of fedhcc_model.py against fedhcc's own forward pass (needs torch).

Each folder given holds `model.safetensors` (written as `fedhcc export` writes it, torch layout) and
`fixture.json` (raw inputs of a few patients and the scores fedhcc computed for them), as the Rust test
`export::tests::the_pytorch_modules_reproduce_fedhccs_forward_pass_of_every_model_kind` writes them.
The model is loaded with `fedhcc_model.torch_model` (`load_state_dict(strict=True)`) and must give the
same probabilities (and Cox risks) within 1e-4. Run by that test when FEDHCC_TORCH_PYTHON names a
Python with numpy, safetensors and torch:

    FEDHCC_TORCH_PYTHON=python3 cargo test -p fedhcc --bin fedhcc the_pytorch_modules
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fedhcc_model as fm  # noqa: E402

TOL = 1e-4


def check(folder):
    folder = Path(folder)
    fx = json.loads((folder / "fixture.json").read_text())
    model = fm.torch_model(folder / "model.safetensors").eval()
    clinical = torch.tensor(fx["clinical"], dtype=torch.float32)
    with torch.no_grad():
        if "crops" in fx:
            crops = torch.tensor(fx["crops"], dtype=torch.float32).reshape(fx["crop_shape"])
            presence = torch.tensor(fx["presence"], dtype=torch.float32)
            bags = torch.tensor(fx["bags"], dtype=torch.float32).reshape(fx["bag_shape"])
            mask = torch.tensor(fx["mask"], dtype=torch.bool)
            logit, risk = model(crops, presence, clinical, bags, mask)
        else:
            logit, risk = model(clinical), None
    worst = float(np.max(np.abs(torch.sigmoid(logit).numpy() - np.array(fx["probability"]))))
    line = f"{folder.name}: {type(model).__name__} strict load, {len(clinical)} patients, max |Δ probability| = {worst:.2g}"
    ok = worst <= TOL
    if risk is not None:
        worst_risk = float(np.max(np.abs(risk.numpy() - np.array(fx["risk"]))))
        line += f", max |Δ risk| = {worst_risk:.2g}"
        ok &= worst_risk <= TOL
    print(line)
    return ok


if __name__ == "__main__":
    results = [check(f) for f in sys.argv[1:]]
    sys.exit(0 if results and all(results) else 1)
