"""The teacher cache's model side: its on-disk format and reader (`format.py`) and what training reads from it
(`targets.py`). The writer that labels every augmented view under `trainer.predict` is a Lightning piece
(`distill/training/cache_writer.py`); the `distill cache-teacher` command is `distill/commands/cache_teacher.py`."""
