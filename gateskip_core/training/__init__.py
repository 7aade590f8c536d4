"""Training gates, stand-ins and the adapter, and what is measured or fitted by running the model.

- `loop`: `TrainConfig`, `train`, calibration of the result;
- `fill_fitting`: stand-ins fitted without training (`gateskip fit-fill`);
- `sensitivity`: how much each branch matters, for the global allocation.
"""
