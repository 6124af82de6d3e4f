"""Reference values for the Cox loss tests in `shared/model/src/cox.rs`.

Independent implementations of the Cox partial log-likelihood at a FIXED coefficient:
statsmodels `PHReg(...).loglike(beta)` (Breslow and Efron ties) and lifelines `CoxPHFitter`'s
Efron log-likelihood (`_get_efron_values_single`, the function its Newton iterations use).
With one covariate x = risk and beta = 1 the linear predictor equals the risk scores.
The loss in fedhcc is the negative log partial likelihood divided by the number of events.

    pip install numpy statsmodels lifelines pandas
    python3 shared/model/tests/reference/cox_reference.py
"""

import numpy as np
from statsmodels.duration.hazard_regression import PHReg

times = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 5.0, 5.0, 9.0, 3.0, 12.0, 7.0, 5.0])
events = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1])
risk = np.array([0.3, -0.4, 1.1, 0.0, 0.8, -1.2, 0.5, 0.25, -0.7, 0.9, -0.1, 0.6])
n_events = events.sum()

for ties in ("breslow", "efron"):
    model = PHReg(times, risk[:, None], status=events, ties=ties)
    ll = model.loglike(np.array([1.0]))
    print(f"statsmodels {ties:8s} loglike {ll:.12f}  loss = -loglike/{n_events} = {-ll / n_events:.10f}")

try:
    import pandas as pd
    from lifelines.fitters.coxph_fitter import SemiParametricPHFitter

    # The Efron routine CoxPHFitter's Newton iterations call; it expects data sorted by time.
    order = np.argsort(times, kind="stable")
    _, _, ll = SemiParametricPHFitter()._get_efron_values_single(
        pd.DataFrame(risk[order][:, None]),
        pd.Series(times[order]),
        pd.Series(events[order].astype(bool)),
        pd.Series(np.ones(len(times))),
        None,
        np.array([1.0]),
    )
    print(f"lifelines   efron    loglike {ll:.12f}  loss = {-ll / n_events:.10f}")
except Exception as e:  # lifelines' private API may change between versions
    print("lifelines check skipped:", e)

# The hand-computed example of `hand_computed_example_with_ties`.
t4 = np.array([1.0, 2.0, 2.0, 3.0])
e4 = np.array([1, 1, 1, 0])
r4 = np.log(np.array([1.0, 1.0, 2.0, 3.0]))
for ties in ("breslow", "efron"):
    ll = PHReg(t4, r4[:, None], status=e4, ties=ties).loglike(np.array([1.0]))
    print(f"hand example {ties:8s} loss = {-ll / 3:.10f}")
