#!/usr/bin/env python3
"""fedhcc's models in Python, for whoever uses an exported model outside fedhcc (an external validator).

`fedhcc export` (default `--layout torch`) writes a safetensors file in PyTorch's layout: `nn.Linear`
weights `[out, in]`, `nn.GroupNorm` `weight`/`bias`, `nn.Conv3d` weights `[out, in, 3, 3, 3]`, and the
standardisation statistics the model carries as buffers (`standardise.clinical.mean`/`.std`, for the
postoperative model also `standardise.wsi.mean`/`.std`). Its metadata holds the model kind
(`model_kind`), the architecture (`model_config`, JSON), the clinical design matrix's columns
(`clinical_columns`) and which of them are standardised (`clinical_numeric`: `[value, missing]`
column pairs, in the order of the statistics).

Two ways in:

- numpy only (no torch), the clinical model (MLP or logistic regression):

      pip install numpy safetensors
      import fedhcc_model as fm
      tensors, meta = fm.load("final-model.safetensors")
      x, columns = fm.read_inputs("validation/inputs.csv")   # fedhcc validate --write-inputs
      p = fm.numpy_clinical_forward(tensors, fm.standardise_clinical(tensors, meta, x))

  `p` is the probability of aggressive recurrence per row, the `score` of `fedhcc validate`'s
  predictions.csv (row for row with inputs.csv).

- PyTorch, every model kind (`clinical`, `preop`, `postop`): the same architecture as `nn.Module`s,
  built from the file's metadata and shapes, loaded with `load_state_dict(strict=True)`:

      pip install numpy safetensors torch
      model = fm.torch_model("final-model.safetensors").eval()
      with torch.no_grad():
          p = torch.sigmoid(model(x))                                   # clinical: logits [n]
          logit, risk = model(crops, presence, clinical)                # preop
          logit, risk = model(crops, presence, clinical, bags, mask)    # postop

  Inputs (float32 tensors): `x` / `clinical` [n, inputs]: the design-matrix rows *before*
  standardisation (as inputs.csv holds them: numeric values, after ln(1 + x) where the cohort
  specification says `log`, and a `__missing` indicator each, missing values 0 with indicator 1;
  binary 0/1 with an indicator; categorical one-hot) — the model standardises the numeric columns
  with the pooled statistics it carries. `crops` [n, phases, depth, height, width]: the MRI crops
  z-scored per phase as `fedhcc preprocess` writes them; `presence` [n, phases]: 1 for a phase
  present, 0 missing (the model zeroes a missing phase's channel). `bags` [n, patches, features]:
  the slides' patch features before standardisation, padded; `mask` [n, patches], True for a real
  patch (a patient without a slide has an all-False row). `logit` is the aggressive-recurrence logit
  (sigmoid: the probability, the score fedhcc reports) and `risk` the Cox log relative hazard.

The forward passes follow fedhcc's burn modules (shared/model/src/{net,mri,wsi,fusion}.rs): ReLU
between the clinical MLP's layers; per MRI stage Conv3d(3, stride 2, padding 1) → GroupNorm(eps 1e-5)
→ activation, global average pooling, then Linear → activation over [pooled, per-phase crop means,
presence]; gated-attention MIL over patches (padding weighted 0); Linear → ReLU blocks for the
clinical branch and the fusion; two linear heads. Only numpy and safetensors are imported here;
torch is imported when a PyTorch module is first asked for.
"""

import csv
import json

import numpy as np

__all__ = [
    "load",
    "read_inputs",
    "standardise_clinical",
    "numpy_clinical_forward",
    "numpy_clinical_logits",
    "clinical_state_shapes",
    "check_state",
    "torch_model",
    "ClinicalMLP",
    "MultimodalNet",
    "MriEncoder",
    "WsiEncoder",
]


def load(path):
    """The tensors (name -> numpy float32 array) and the metadata (name -> text) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def read_inputs(path):
    """`inputs.csv` of `fedhcc validate --write-inputs`: (rows as a float32 array [n, columns], column names)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    columns, values = rows[0], rows[1:]
    x = np.array([[np.float32(v) for v in r] for r in values], dtype=np.float32).reshape(len(values), len(columns))
    return x, columns


def _numeric(metadata):
    return [tuple(p) for p in json.loads(metadata.get("clinical_numeric", "[]"))]


def _statistics(tensors, group):
    mean, std = tensors.get(f"standardise.{group}.mean"), tensors.get(f"standardise.{group}.std")
    if mean is None:
        return None
    if not (np.all(np.isfinite(std)) and np.all(std > 0) and np.all(np.isfinite(mean))):
        raise ValueError(
            f"the model carries no '{group}' standardisation statistics (standard deviations 0: a model that never "
            "went through fedhcc's statistics exchange); standardise the inputs yourself"
        )
    return mean.astype(np.float32), std.astype(np.float32)


def standardise_clinical(tensors, metadata, x):
    """`x` (the design matrix before standardisation, [n, inputs]) standardised as fedhcc does, in float32:
    each numeric value whose missing indicator is 0 becomes (x - mean) / std with the statistics the model
    carries; every other column is left as it is."""
    x = np.array(x, dtype=np.float32, copy=True)
    positions = _numeric(metadata)
    stats = _statistics(tensors, "clinical")
    if not positions:
        return x
    if stats is None:
        raise ValueError("the metadata lists standardised columns but the model has no standardise.clinical tensors")
    mean, std = stats
    if len(positions) != mean.shape[0]:
        raise ValueError(f"{len(positions)} standardised columns in the metadata, {mean.shape[0]} statistics")
    for k, (value, missing) in enumerate(positions):
        observed = x[:, missing] == 0
        x[observed, value] = (x[observed, value] - mean[k]) / std[k]
    return x


def _linear_layers(tensors, prefix, layout):
    """The (weight [out, in], bias) pairs `prefix.0`, `prefix.1`, … in order."""
    layers, i = [], 0
    while f"{prefix}.{i}.weight" in tensors:
        w = np.asarray(tensors[f"{prefix}.{i}.weight"], dtype=np.float64)
        layers.append((w if layout == "torch" else w.T, np.asarray(tensors[f"{prefix}.{i}.bias"], dtype=np.float64)))
        i += 1
    return layers


def numpy_clinical_logits(tensors, x, layout="torch"):
    """The clinical model's logits for `x` (standardised design-matrix rows, [n, inputs]), in float64:
    Linear → ReLU → … → Linear, one output. `layout`: the file's (`torch`, or `burn` for `--layout burn`)."""
    layers = _linear_layers(tensors, "layers", layout)
    if not layers:
        raise ValueError("no layers.0.weight: not a clinical model")
    h = np.asarray(x, dtype=np.float64)
    for i, (w, b) in enumerate(layers):
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"layer {i} takes {w.shape[1]} inputs, the rows have {h.shape[1]}")
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h[:, 0]


def numpy_clinical_forward(tensors, x, layout="torch"):
    """The clinical model's probabilities of aggressive recurrence (the sigmoid of the logits) for `x`,
    standardised design-matrix rows [n, inputs] (see `standardise_clinical`)."""
    z = numpy_clinical_logits(tensors, x, layout)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def clinical_state_shapes(config, numeric):
    """The names and shapes of `ClinicalMLP(config).state_dict()` (config: the metadata's `model_config`,
    `numeric`: how many columns are standardised), computed without torch: what strict loading checks."""
    widths = [config["inputs"], *config["hidden"], 1]
    shapes = {}
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        shapes[f"layers.{i}.weight"] = (b, a)
        shapes[f"layers.{i}.bias"] = (b,)
    if numeric:
        shapes["standardise.clinical.mean"] = (numeric,)
        shapes["standardise.clinical.std"] = (numeric,)
    return shapes


def check_state(tensors, shapes):
    """Raises like `load_state_dict(strict=True)` when `tensors` has other names or shapes than `shapes`."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = sorted(f"{k}: {tuple(tensors[k].shape)} vs {shapes[k]}" for k in set(shapes) & set(tensors)
                   if tuple(tensors[k].shape) != tuple(shapes[k]))
    if missing or unexpected or wrong:
        raise ValueError(f"missing keys {missing}, unexpected keys {unexpected}, size mismatches {wrong}")


# ---- PyTorch (imported on first use) -------------------------------------------------------------------

_TORCH_CLASSES = None


def _torch_classes():
    global _TORCH_CLASSES
    if _TORCH_CLASSES is not None:
        return _TORCH_CLASSES
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Statistics(nn.Module):
        """One input group's standardisation: buffers `mean` and `std` (std 0: not set)."""

        def __init__(self, width):
            super().__init__()
            self.register_buffer("mean", torch.zeros(width))
            self.register_buffer("std", torch.zeros(width))

        def check(self, group):
            if not (torch.isfinite(self.std).all() and (self.std > 0).all() and torch.isfinite(self.mean).all()):
                raise ValueError(f"the model carries no '{group}' standardisation statistics")

    def standardise_rows(stats, numeric, x):
        if not numeric:
            return x
        stats.check("clinical")
        value = torch.tensor([v for v, _ in numeric], dtype=torch.long, device=x.device)
        missing = torch.tensor([m for _, m in numeric], dtype=torch.long, device=x.device)
        observed = x[:, missing] == 0
        x = x.clone()
        x[:, value] = torch.where(observed, (x[:, value] - stats.mean) / stats.std, x[:, value])
        return x

    def statistics_module(groups):
        m = nn.Module()
        for group, width in groups:
            setattr(m, group, Statistics(width))
        return m

    class ClinicalMLP(nn.Module):
        """fedhcc's clinical model: `layers.{i}` Linear, ReLU between them, one logit. Takes the design
        matrix before standardisation and standardises it with the statistics it carries."""

        def __init__(self, inputs, hidden, numeric=()):
            super().__init__()
            widths = [inputs, *hidden, 1]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
            self.numeric = [tuple(p) for p in numeric]
            if self.numeric:
                self.standardise = statistics_module([("clinical", len(self.numeric))])

        def forward(self, x):
            if self.numeric:
                x = standardise_rows(self.standardise.clinical, self.numeric, x)
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = F.relu(x)
            return x[:, 0]

    class ConvBlock(nn.Module):
        def __init__(self, c_in, c_out, groups):
            super().__init__()
            self.conv = nn.Conv3d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            self.norm = nn.GroupNorm(groups, c_out, eps=1e-5)

    class MriEncoder(nn.Module):
        """`stages.{i}` (Conv3d → GroupNorm → activation), global average pooling, `embed` Linear →
        activation over [pooled features, per-phase crop means, presence flags]."""

        def __init__(self, phases, channels, groups, embed, activation="relu"):
            super().__init__()
            self.stages = nn.ModuleList()
            c_in = phases
            for c in channels:
                self.stages.append(ConvBlock(c_in, c, groups))
                c_in = c
            self.embed = nn.Linear(c_in + 2 * phases, embed)
            self.act = {"relu": F.relu, "gelu": F.gelu}[activation]

        def forward(self, crops, presence):
            crops = crops * presence[:, :, None, None, None]
            b, p = crops.shape[:2]
            means = crops.reshape(b, p, -1).mean(dim=2)
            h = crops
            for stage in self.stages:
                h = self.act(stage.norm(stage.conv(h)))
            pooled = h.mean(dim=(2, 3, 4))
            return self.act(self.embed(torch.cat([pooled, means, presence], dim=1)))

    class WsiEncoder(nn.Module):
        """Gated-attention MIL (Ilse et al. 2018): `patch` Linear → ReLU per patch, attention
        `attention_w(tanh(attention_v h) * sigmoid(attention_u h))`, softmax over a bag's real patches,
        the attention-weighted sum of h."""

        def __init__(self, features, hidden, attention):
            super().__init__()
            self.patch = nn.Linear(features, hidden)
            self.attention_v = nn.Linear(hidden, attention)
            self.attention_u = nn.Linear(hidden, attention)
            self.attention_w = nn.Linear(attention, 1)

        def forward(self, bags, mask):
            h = F.relu(self.patch(bags))
            gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
            logits = self.attention_w(gate)[..., 0].masked_fill(~mask, -1e9)
            weights = torch.softmax(logits, dim=1)
            return (weights[:, None, :] @ h)[:, 0, :]

    class MultimodalNet(nn.Module):
        """fedhcc's preoperative (`mri` + `clinical`) and postoperative (+ `wsi`) model: the branch
        embeddings concatenated ([MRI, clinical, slide embedding, slide-present flag]), the `fusion`
        Linear → ReLU blocks, the `recurrence` (logit) and `risk` (Cox) heads."""

        def __init__(self, config, numeric=()):
            super().__init__()
            self.kind = config["kind"]
            mri, wsi = config["mri"], config["wsi"]
            self.mri = MriEncoder(mri["phases"], mri["channels"], mri["groups"], mri["embed"], mri["activation"])
            postop = self.kind == "postop"
            self.wsi = WsiEncoder(wsi["features"], wsi["hidden"], wsi["attention"]) if postop else None
            widths = [config["clinical_inputs"], *config["clinical"]["hidden"]]
            self.clinical = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
            fusion_in = mri["embed"] + widths[-1] + (wsi["hidden"] + 1 if postop else 0)
            widths = [fusion_in, *config["fusion"]["hidden"]]
            self.fusion = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
            self.recurrence = nn.Linear(widths[-1], 1)
            self.risk = nn.Linear(widths[-1], 1)
            self.numeric = [tuple(p) for p in numeric]
            groups = [("clinical", len(self.numeric))] if self.numeric else []
            if postop and wsi["features"] > 0:
                groups.append(("wsi", wsi["features"]))
            if groups:
                self.standardise = statistics_module(groups)

        def forward(self, crops, presence, clinical, bags=None, mask=None):
            parts = [self.mri(crops, presence)]
            c = standardise_rows(self.standardise.clinical, self.numeric, clinical) if self.numeric else clinical
            for layer in self.clinical:
                c = F.relu(layer(c))
            parts.append(c)
            if self.wsi is not None:
                n = clinical.shape[0]
                if bags is None or bags.shape[1] == 0:
                    parts += [clinical.new_zeros(n, self.wsi.patch.out_features), clinical.new_zeros(n, 1)]
                else:
                    stats = self.standardise.wsi
                    stats.check("wsi")
                    present = mask.any(dim=1, keepdim=True).to(clinical.dtype)
                    embedding = self.wsi((bags - stats.mean) / stats.std, mask) * present
                    parts += [embedding, present]
            h = torch.cat(parts, dim=1)
            for layer in self.fusion:
                h = F.relu(layer(h))
            return self.recurrence(h)[:, 0], self.risk(h)[:, 0]

    _TORCH_CLASSES = {
        "torch": torch,
        "ClinicalMLP": ClinicalMLP,
        "MultimodalNet": MultimodalNet,
        "MriEncoder": MriEncoder,
        "WsiEncoder": WsiEncoder,
    }
    return _TORCH_CLASSES


def __getattr__(name):
    if name in ("ClinicalMLP", "MultimodalNet", "MriEncoder", "WsiEncoder"):
        return _torch_classes()[name]
    raise AttributeError(f"module 'fedhcc_model' has no attribute '{name}'")


def torch_model(path):
    """The exported model at `path` as a PyTorch module of its kind, its weights loaded with
    `load_state_dict(strict=True)` (needs a file in the torch layout, the default of `fedhcc export`)."""
    tensors, metadata = load(path)
    if metadata.get("layout") != "torch":
        raise ValueError(f"{path} is in the {metadata.get('layout', 'burn')} layout: export it with --layout torch")
    t = _torch_classes()
    numeric = _numeric(metadata)
    kind = metadata.get("model_kind")
    if kind == "clinical":
        layers = _linear_layers(tensors, "layers", "torch")
        inputs = layers[0][0].shape[1]
        hidden = [w.shape[0] for w, _ in layers[:-1]]
        model = t["ClinicalMLP"](inputs, hidden, numeric)
    elif kind in ("preop", "postop"):
        if "model_config" not in metadata:
            raise ValueError(f"{path} has no model_config in its metadata: export it with `fedhcc export --study`")
        model = t["MultimodalNet"](json.loads(metadata["model_config"]), numeric)
    else:
        raise ValueError(f"{path}: model kind {kind!r} has no PyTorch module here")
    torch = t["torch"]
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()}, strict=True)
    return model
