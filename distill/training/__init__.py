"""The training system: the LightningModule (`module.py`), the distillation loss (`losses.py`, no Lightning), the
rules of a step (`step_rules.py`), checkpoint callbacks, telemetry, the run records that make a resumed run
the run it was, and the summary a fit ends with (`summary.py`)."""
