"""The learned parts added to a backbone, and their files.

- `gates`: the sigmoid gates on every attention and MLP branch (`GateSet`);
- `adapter`: the LoRA adapter, applied as a per-row delta to the rows it adapts;
- `fill`: stand-ins that replace a skipped branch's output (fitted on calibration text by
  `training/fill_fitting.py`, which runs the model);
- `checkpoint`: gates, stand-ins, adapter and thresholds in one safetensors file.
"""
