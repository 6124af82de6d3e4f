#!/usr/bin/env python3
"""Best achievable AUC of a synthetic cohort: the latent risk in truth.csv scored against the aggressive-
recurrence label derived from each site's clinical.csv (the rules of shared/cohort/src/outcomes.rs, default
study settings: cut-off 2024-07-30, horizon 730 days, death before the horizon excluded).

Usage: scripts/best_auc.py DIR   (DIR as written by `fedhcc synth --out DIR`)
Optionally restricted to one test split: --ids FILE (one patient id per line).
Standard library only (reference values; not used by fedhcc itself)."""
import csv, sys, datetime as dt, pathlib


def roc_auc_score(y, z):
    # Mann-Whitney U with mid-ranks for ties.
    order = sorted(range(len(z)), key=lambda i: z[i])
    ranks = [0.0] * len(z)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and z[order[j + 1]] == z[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    pos = sum(y)
    neg = len(y) - pos
    r = sum(ranks[i] for i in range(len(y)) if y[i] == 1)
    return (r - pos * (pos + 1) / 2) / (pos * neg)

CUTOFF = dt.date(2024, 7, 30)
H = 730

def d(s):
    return dt.date.fromisoformat(s) if s else None

def label(r):
    s = d(r["surgery_date"])
    rec = d(r["recurrence_date"])
    death = d(r["death_date"])
    last = d(r["last_followup_date"])
    if rec and rec > CUTOFF: rec = None
    if death and death > CUTOFF: death = None
    end = min(last, CUTOFF) if last else death
    if rec and end and rec > end: end = rec
    if rec is not None:
        days = (rec - s).days
        if days > H:
            return 0
        n = r["rec_n_nodules"]
        diam = float(r["rec_max_diam_cm"]) if r["rec_max_diam_cm"] else None
        macro = r["rec_macrovascular"] == "1"
        extra = r["rec_extrahepatic"] == "1"
        if not n:
            return 1
        n = int(n)
        within = (not macro and not extra and diam is not None and
                  ((n == 1 and diam <= 5.0) or (2 <= n <= 3 and diam <= 3.0)))
        return 0 if within else 1
    if death and (death - s).days < H:
        return None
    if end and (end - s).days >= H:
        return 0
    return None

root = pathlib.Path(sys.argv[1])
ids = None
if "--ids" in sys.argv:
    ids = set(pathlib.Path(sys.argv[sys.argv.index("--ids") + 1]).read_text().split())
risk = {r["patient_id"]: float(r["latent_risk"]) for r in csv.DictReader(open(root / "truth.csv"))}
y, z = [], []
for site in sorted(p for p in root.iterdir() if (p / "clinical.csv").is_file()):
    for r in csv.DictReader(open(site / "clinical.csv")):
        if ids is not None and r["patient_id"] not in ids:
            continue
        l = label(r)
        if l is not None:
            y.append(l); z.append(risk[r["patient_id"]])
print(f"labelled {len(y)}, positive {sum(y)} ({100*sum(y)/len(y):.1f}%), best achievable AUC (latent risk) {roc_auc_score(y, z):.3f}")
