"""Pure functions over GateSkip traces: information-flow statistics, sweeps, faithfulness, figures."""
