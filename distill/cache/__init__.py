"""The teacher cache, the whole feature: its on-disk format and reader (`format.py`, no Lightning), the writer that
labels every augmented view under `trainer.predict` (`writer.py`), and the `distill cache-teacher` command
(`command.py`). The training module reads its targets through `targets.py`."""
