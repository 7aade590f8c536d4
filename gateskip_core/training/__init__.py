"""Training gates, stand-ins and the adapter (`loop`: `TrainConfig`, `train`, calibration of the result)."""
