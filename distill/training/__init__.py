"""The training system: the LightningModule (`module.py`) and where its step's targets come from
(`teacher_targets.py`), the loss (`losses.py`, no Lightning) and its methods (`methods/`, one file each), the
rules of a step (`step_rules.py`), checkpoint callbacks, telemetry, the run records that make a resumed run
the run it was, and the summary a fit ends with (`summary.py`)."""
