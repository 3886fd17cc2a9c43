"""The commands, one module each (the table is `distill/cli.py`): `distill fit` and the other LightningCLI
subcommands (`fit.py`), pipeline, compare (with `speed_figure.py`, its --plot), report, export, predict, serve and
cache-teacher. Commands share code through the layers below, not each other."""
