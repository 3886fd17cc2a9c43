"""The training system: the LightningModule (`module.py`) and where its step's targets come from
(`teacher_targets.py`), the loss (`losses.py`, no Lightning) and its methods (`methods/`, one file each), the
checks a module makes when it is built (`run_checks.py`), its metrics (`metrics.py`), DeiT's learning-rate scaling
(`learning_rate.py`), when a step's values are logged (`step_logging.py`), checkpoint callbacks, telemetry, the run records that make a resumed run
the run it was, and the summary a fit ends with (`summary.py`)."""
