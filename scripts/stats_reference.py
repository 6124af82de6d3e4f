#!/usr/bin/env python3
"""Reference values for the fedhcc-stats crate and `fedhcc stats` (reference only, never run by fedhcc).

Reads two real survival datasets from tests/fixtures/clinical/ (NCCTG lung and Rossi recidivism, both
shipped with lifelines), derives scores, binary labels and groups from them, and computes every
statistic the crate implements with the established Python implementations:

  AUC, ROC points ........ scikit-learn roc_auc_score / roc_curve
  DeLong SE and CI ....... DeLong et al. 1988 structural components computed pair by pair here (O(m n), not
                           the midrank algorithm the crate uses), checked against MLstatkit.Delong_test's CI;
                           plain CI (AUC +- z SE) clipped to [0, 1], as MLstatkit and pROC do
  paired DeLong test ..... MLstatkit.Delong_test (z signed here as AUC_A - AUC_B)
  Wilson CIs ............. statsmodels proportion_confint(method="wilson")
  Brier .................. scikit-learn brier_score_loss
  calibration ............ statsmodels GLM Binomial: slope = coefficient of logit(p) in label ~ 1 + logit(p);
                           intercept = intercept of label ~ 1 with offset logit(p)
  net benefit ............ dcurves.dca (test positive when risk >= threshold)
  Harrell's C ............ lifelines.utils.concordance_index (with -score: higher score = higher risk)
  Uno's C ................ sksurv.metrics.concordance_index_ipcw (train = test = the same rows)
  time-dependent AUC ..... sksurv.metrics.cumulative_dynamic_auc
  Kaplan-Meier ........... lifelines KaplanMeierFitter (log(-log) Greenwood CI, numbers at risk)
  log-rank ............... lifelines.statistics.multivariate_logrank_test
  Cox .................... lifelines CoxPHFitter, one covariate, Efron ties, no penalizer
  bootstrap .............. numpy stratified bootstrap (only its spread is compared)

Writes shared/stats/tests/reference.json. Run from the repository root:

    pip install lifelines scikit-learn scikit-survival statsmodels dcurves MLstatkit
    python3 scripts/stats_reference.py
"""

import json
import math
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
from dcurves import dca
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from MLstatkit import Delong_test
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv
from statsmodels.stats.proportion import proportion_confint

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
Z = norm.ppf(0.975)
THRESHOLDS = [i / 100 for i in range(1, 100)]


def f(x):
    """A float for JSON (None for NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def load_lung():
    d = pd.read_csv(ROOT / "tests/fixtures/clinical/lung_multi_institution.csv")
    d = d[d["ph.ecog"].notna()].reset_index(drop=True)
    time = d["time"].astype(float).to_numpy()
    event = d["status"].astype(int).to_numpy()
    label = np.where(time > 365, 0, np.where(event == 1, 1, -1))  # -1: censored within a year: unlabelled
    score_lin = (10 * d["ph.ecog"] + d["age"]).astype(float).to_numpy()  # integers: many ties
    # Two "sites": institutions with an odd id vs the rest. The probability score is a logistic model fitted
    # on the "odd" site only, so that its calibration on all rows is not trivially perfect.
    site = np.where(d["inst"].fillna(0).astype(int) % 2 == 1, "odd", "even")
    lab = label >= 0
    x = sm.add_constant(d[["age", "sex", "ph.ecog"]].astype(float))
    train = lab & (site == "odd")
    fit = sm.Logit(label[train], x[train]).fit(disp=0)
    score_prob = np.asarray(fit.predict(x), dtype=float)
    group = d["ph.ecog"].astype(int).astype(str).to_numpy()
    return dict(
        time=time, event=event, label=label, score_lin=score_lin, score_prob=score_prob, group=group, site=site
    )


def load_rossi():
    d = pd.read_csv(ROOT / "tests/fixtures/clinical/rossi.csv")
    time = d["week"].astype(float).to_numpy()
    event = d["arrest"].astype(int).to_numpy()
    label = np.where(time > 26, 0, np.where(event == 1, 1, -1))
    score_lin = d["prio"].astype(float).to_numpy()
    site = np.where(np.arange(len(d)) % 3 == 0, "odd", "even")
    lab = label >= 0
    x = sm.add_constant(d[["age", "prio", "fin"]].astype(float))
    train = lab & (site == "odd")
    fit = sm.Logit(label[train], x[train]).fit(disp=0)
    score_prob = np.asarray(fit.predict(x), dtype=float)
    group = d["fin"].astype(int).astype(str).to_numpy()
    return dict(
        time=time, event=event, label=label, score_lin=score_lin, score_prob=score_prob, group=group, site=site
    )


def delong_direct(y, s):
    """AUC and DeLong variance from the pairwise kernel psi(x, y) = 1, 1/2, 0 (DeLong et al. 1988)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10 = psi.mean(axis=1)  # one structural component per positive
    v01 = psi.mean(axis=0)  # one per negative
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    return float(auc), float(var)


def wilson(k, n):
    if n == 0:
        return None
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return {"estimate": f(k / n), "ci_low": f(lo), "ci_high": f(hi), "count": int(k), "total": int(n)}


def km_curves(time, event, groups):
    out = []
    for g in sorted(set(groups)):
        m = groups == g
        kmf = KaplanMeierFitter().fit(time[m], event[m])
        sf = kmf.survival_function_.iloc[:, 0]
        ci = kmf.confidence_interval_
        at_risk = kmf.event_table["at_risk"]
        out.append(
            {
                "group": g,
                "time": [f(t) for t in sf.index],
                "survival": [f(s) for s in sf.values],
                "ci_low": [f(v) for v in ci.iloc[:, 0].values],
                "ci_high": [f(v) for v in ci.iloc[:, 1].values],
                "at_risk": [int(a) for a in at_risk.values],
            }
        )
    return out


def full_stats(data, score_name, group_name, cutoff, times):
    """What `fedhcc stats` must write, computed with the reference packages."""
    time, event, label = data["time"], data["event"], data["label"]
    score = data[score_name]
    lab = label >= 0
    y, s = label[lab], score[lab]
    is_prob = bool(((score >= 0) & (score <= 1)).all())
    out = {
        "n": int(len(score)),
        "n_labelled": int(lab.sum()),
        "n_positive": int(y.sum()),
        "n_events": int(event.sum()),
    }
    auc, var = delong_direct(y, s)
    se = math.sqrt(var)
    assert abs(auc - roc_auc_score(y, s)) < 1e-12
    _, _, ci_check, _, _, _, _ = Delong_test(y, s, s[::-1], return_ci=True, return_auc=True)
    assert abs(ci_check[0] - max(0.0, auc - Z * se)) < 1e-12 and abs(ci_check[1] - min(1.0, auc + Z * se)) < 1e-12
    out["auc"] = {
        "estimate": f(auc),
        "se": f(se),
        "ci_low": f(max(0.0, auc - Z * se)),
        "ci_high": f(min(1.0, auc + Z * se)),
    }
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    out["roc"] = {"fpr": [f(v) for v in fpr], "tpr": [f(v) for v in tpr], "threshold": [f(v) for v in thr]}
    j = tpr - fpr
    best = int(np.argmax(j))
    out["youden"] = {"cutoff": f(thr[best]), "j": f(j[best])}
    if cutoff is None:
        cutoff = float(thr[best])
        out["cutoff_source"] = "youden"
    else:
        out["cutoff_source"] = "given"
    out["cutoff"] = f(cutoff)
    pos = s >= cutoff
    tp, fp = int((pos & (y == 1)).sum()), int((pos & (y == 0)).sum())
    fn, tn = int((~pos & (y == 1)).sum()), int((~pos & (y == 0)).sum())
    out["sensitivity"] = wilson(tp, tp + fn)
    out["specificity"] = wilson(tn, tn + fp)
    out["ppv"] = wilson(tp, tp + fp)
    out["npv"] = wilson(tn, tn + fn)
    if is_prob:
        out["brier"] = f(brier_score_loss(y, s))
        lp = np.log(s / (1 - s))
        slope_fit = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit(tol=1e-14)
        int_fit = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit(tol=1e-14)
        out["calibration"] = {"intercept": f(int_fit.params[0]), "slope": f(slope_fit.params[1])}
        frame = pd.DataFrame({"y": y, "risk": s})
        nb = dca(data=frame, outcome="y", modelnames=["risk"], thresholds=THRESHOLDS)
        model = nb[nb.model == "risk"].set_index("threshold")["net_benefit"]
        treat_all = nb[nb.model == "all"].set_index("threshold")["net_benefit"]
        out["net_benefit"] = [
            {"threshold": t, "model": f(model.loc[t]), "treat_all": f(treat_all.loc[t])} for t in THRESHOLDS
        ]
    else:
        out["brier"] = None
        out["calibration"] = None
        out["net_benefit"] = None
    out["c_index_harrell"] = f(concordance_index(time, -score, event))
    tau = float(max(times))
    surv = Surv.from_arrays(event.astype(bool), time)
    out["c_index_uno"] = {"tau": tau, "estimate": f(concordance_index_ipcw(surv, surv, score, tau=tau)[0])}
    # sksurv computes a censoring weight for every event, even those after the last requested time, and
    # refuses when the censoring survival is 0 there (Rossi: everyone left at week 52 is censored, 4 arrests
    # at week 52). Such an event is never a case at an earlier time and stays a control (time > t) either
    # way, so marking it censored in the test set changes no AUC; the crate only weights the cases it uses.
    late = time > max(times)
    surv_test = Surv.from_arrays(event.astype(bool) & ~late, time)
    aucs, _ = cumulative_dynamic_auc(surv, surv_test, score, times)
    out["td_auc"] = [{"time": float(t), "auc": f(a)} for t, a in zip(times, aucs)]
    if group_name is not None:
        groups = data[group_name]
        out["logrank_by"] = "group"
    else:
        groups = np.where(score >= cutoff, "high", "low")
        out["logrank_by"] = "cutoff"
    lr = multivariate_logrank_test(time, groups, event)
    out["logrank"] = {"chi2": f(lr.test_statistic), "df": int(lr.degrees_of_freedom), "p": f(lr.p_value)}
    # lifelines stops when the log-likelihood changes by < 1e-9 relative (R's default), which can leave the
    # coefficient ~1e-5 short of the maximum when the covariate has a small spread (a probability score);
    # tighter stopping makes the reference the maximum-likelihood estimate itself.
    cph = CoxPHFitter().fit(
        pd.DataFrame({"t": time, "e": event, "score": score}),
        "t",
        "e",
        fit_options={"precision": 1e-14, "r_precision": 1e-16, "max_steps": 500},
    )
    coef, se = float(cph.params_["score"]), float(cph.standard_errors_["score"])
    out["cox"] = {
        "coef": f(coef),
        "se": f(se),
        "hr": f(math.exp(coef)),
        "ci_low": f(math.exp(coef - Z * se)),
        "ci_high": f(math.exp(coef + Z * se)),
        "p": f(cph.summary.loc["score", "p"]),
    }
    out["km"] = km_curves(time, event, groups)
    return out


def main():
    data = {"lung": load_lung(), "rossi": load_rossi()}
    inputs = {}
    for name, d in data.items():
        inputs[name] = {
            "time": [f(v) for v in d["time"]],
            "event": [int(v) for v in d["event"]],
            "label": [None if v < 0 else int(v) for v in d["label"]],
            "score_lin": [f(v) for v in d["score_lin"]],
            "score_prob": [f(v) for v in d["score_prob"]],
            "group": [str(v) for v in d["group"]],
            "site": [str(v) for v in d["site"]],
        }
    cases = [
        ("lung_prob_cutoff", "lung", "score_prob", None, 0.6, [180.0, 365.0, 540.0]),
        ("lung_lin_group_youden", "lung", "score_lin", "group", None, [180.0, 365.0, 540.0]),
        ("lung_prob_youden", "lung", "score_prob", None, None, [90.0, 365.0, 730.0]),
        ("rossi_prob_group", "rossi", "score_prob", "group", None, [13.0, 26.0, 39.0]),
        ("rossi_lin_cutoff", "rossi", "score_lin", None, 3.0, [10.0, 26.0, 45.0]),
    ]
    out_cases = []
    for case, ds, score, group, cutoff, times in cases:
        out_cases.append(
            {
                "name": case,
                "dataset": ds,
                "score": score,
                "group": group,
                "cutoff": cutoff,
                "times": times,
                "expected": full_stats(data[ds], score, group, cutoff, times),
            }
        )
    paired = []
    for ds in ("lung", "rossi"):
        d = data[ds]
        lab = d["label"] >= 0
        y, a, b = d["label"][lab], d["score_lin"][lab], d["score_prob"][lab]
        z, p, _, _, auc_a, auc_b, info = Delong_test(y, a, b, return_ci=True, return_auc=True)
        assert info["method"] == "delong"
        # MLstatkit signs z as (AUC_B - AUC_A) / SE; the crate reports (AUC_A - AUC_B) / SE.
        paired.append({"dataset": ds, "a": "score_lin", "b": "score_prob", "auc_a": f(auc_a), "auc_b": f(auc_b),
                       "z": f(-z), "p": f(p)})
    boots = []
    rng = np.random.default_rng(20240605)
    for ds in ("lung", "rossi"):
        d = data[ds]
        lab = d["label"] >= 0
        y, s = d["label"][lab], d["score_prob"][lab]
        pos, neg = s[y == 1], s[y == 0]
        n_boot = 4000
        stats = np.empty(n_boot)
        for k in range(n_boot):
            bp = pos[rng.integers(0, len(pos), len(pos))]
            bn = neg[rng.integers(0, len(neg), len(neg))]
            stats[k] = roc_auc_score(np.r_[np.ones(len(bp)), np.zeros(len(bn))], np.r_[bp, bn])
        boots.append({"dataset": ds, "score": "score_prob", "n_boot": n_boot, "sd": f(stats.std(ddof=1)),
                      "ci_low": f(np.quantile(stats, 0.025)), "ci_high": f(np.quantile(stats, 0.975))})
    packages = ["lifelines", "scikit-learn", "scikit-survival", "statsmodels", "dcurves",
                "MLstatkit", "numpy", "scipy", "pandas"]
    doc = {
        "generator": "scripts/stats_reference.py",
        "packages": {p: version(p) for p in packages},
        "inputs": inputs,
        "cases": out_cases,
        "paired_delong": paired,
        "bootstrap": boots,
    }
    path = ROOT / "shared/stats/tests/reference.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
