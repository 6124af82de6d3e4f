#!/usr/bin/env python3
"""Reference (epsilon, delta) values for fedhcc-secure's RDP accountant (shared/secure/src/dp.rs).

Computed with Google's dp-accounting (pip install dp-accounting==0.6.0), an implementation independent
of ours: RdpAccountant with its DEFAULT_RDP_ORDERS, a GaussianDpEvent (no subsampling) self-composed
`rounds` times, then get_epsilon_and_optimal_order(delta) (the Balle et al. 2020 / Canonne-Kamath-
Steinke 2020 conversion). The "mironov2017" numbers apply the basic conversion of Mironov 2017
(Prop. 3), eps = min_a rdp(a) + log(1/delta)/(a-1), to dp-accounting's own RDP vector.

Reference only, never a runtime dependency. Regenerate with:
    python3 scripts/dp_reference.py > shared/secure/tests/dp_reference.json
"""

import json
import math

import dp_accounting
from dp_accounting import rdp

NOISE_MULTIPLIERS = [0.5, 0.8, 1.0, 1.1, 2.0, 5.0, 10.0]
ROUNDS = [1, 5, 10, 50, 100, 1000]
DELTAS = [1e-5, 1e-6, 1e-3]


def main():
    cases = []
    for sigma in NOISE_MULTIPLIERS:
        for rounds in ROUNDS:
            for delta in DELTAS:
                acc = rdp.RdpAccountant(orders=rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
                acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), rounds))
                eps, order = acc.get_epsilon_and_optimal_order(delta)
                rdp_vec = acc._rdp  # the composed RDP at each order
                orders = acc._orders
                basic = min(float(r) - math.log(delta) / (float(a) - 1.0) for a, r in zip(orders, rdp_vec))
                cases.append(
                    {
                        "noise_multiplier": sigma,
                        "rounds": rounds,
                        "delta": delta,
                        "epsilon": float(eps),
                        "order": float(order),
                        "epsilon_mironov2017": max(0.0, basic),
                    }
                )
    out = {
        "source": "dp-accounting " + getattr(dp_accounting, "__version__", "0.6.0")
        + " RdpAccountant, GaussianDpEvent self-composed; scripts/dp_reference.py",
        "orders": [float(a) for a in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS],
        "cases": cases,
    }
    # One case per line: reviewable diffs when the reference is regenerated.
    lines = ",\n  ".join(json.dumps(c) for c in out["cases"])
    print("{")
    print(f' "source": {json.dumps(out["source"])},')
    print(f' "orders": {json.dumps(out["orders"])},')
    print(f' "cases": [\n  {lines}\n ]')
    print("}")


if __name__ == "__main__":
    main()
