#!/usr/bin/env bash
# Selection engine: one explained decision over 10, 100 and 1,000 common candidates (criterion).
# No peer system weighs load and both legs' path metrics, so the comparison is against the goal
# set in issue 2 (<= 20 us at 100 candidates, <= 200 us at 1,000).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p steelyard-select --bench decide -- --warm-up-time 2 --measurement-time 5 >&2
python3 - <<'PY'
import json
goals = {"10": None, "100": 20.0, "1000": 200.0}
for n, goal in goals.items():
    est = json.load(open(f"target/criterion/decide/{n}/new/estimates.json"))
    mean = est["mean"]["point_estimate"] / 1000.0  # ns -> us
    lo = est["mean"]["confidence_interval"]["lower_bound"] / 1000.0
    hi = est["mean"]["confidence_interval"]["upper_bound"] / 1000.0
    goal_s = f"goal <= {goal:.0f} µs" if goal else "no goal"
    ratio = f"{goal / mean:.1f}× under the goal" if goal else "–"
    print(f"| one decision, {n} common candidates | {mean:.2f} µs (95 % CI {lo:.2f}–{hi:.2f}) | {goal_s} | {ratio} | `cargo bench -p steelyard-select --bench decide` |")
PY
