"""The trainer: the one Config, the data, the models, the two-stage loop, checkpoints, the shared
stage I, and `python -m risda.train` (cli). It adapts a resolved Config to the method layer."""
