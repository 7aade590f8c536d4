"""Training gates, stand-ins and the adapter, and what is measured or fitted by running the model.

- `loop`: `TrainConfig`, `train` (setup, the steps, the checkpoint and its calibration);
- `objective`: the loss of one batch (`GateObjective`: task loss, sparsity, ranking toward skip costs);
- `state`: the training-state file a killed run resumes from;
- `chat_data`: the training text (pydoc prose, the model's own answers to fixed chat prompts);
- `calibration_texts`: the texts every calibrated-threshold fit uses;
- `fill_fitting`: stand-ins fitted without training (`gateskip fit-fill`);
- `sensitivity`: how much each branch matters, for the global allocation.
"""
