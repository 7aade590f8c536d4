"""Where a skip is decided, before the forward runs it (the plan).

- `plan`: `SkipPlan`, everything that steers skipping in one call, and `branch_decision`, which
  applies it to one branch's gates;
- `policies`: skip budgets and the rules that turn gate values into decisions (quantile, calibrated
  thresholds, random, forced decisions);
- `allocation`: spreading one global budget over layers and branches;
- `calibration`: thresholds fitted on calibration text, so decoding decides token by token;
- `estimate`: a skip plan applied to gate values already captured, without a model call.
"""
