"""The training system, the Lightning layer: the LightningModule (`module.py`) and where its step's targets come from
(`teacher_targets.py`), the loss (`losses.py`) and its methods (`methods/`, one file each) and feature imitation
(`imitation.py`), these three without Lightning; the data module (`datamodule.py`), the teacher cache's writer
(`cache_writer.py`), the checks a module makes when it is built (`run_checks.py`), its metrics (`metrics.py`),
DeiT's learning-rate scaling (`learning_rate.py`), when a step's values are logged (`step_logging.py`),
checkpoint callbacks and the stall alarm, telemetry, the run records that make a resumed run the run it was, the
summary a fit ends with (`summary.py`) and the LightningCLI wiring (`cli.py`)."""
