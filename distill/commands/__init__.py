"""The commands that drive training: `distill fit` and the other LightningCLI subcommands (`fit.py`), `distill
pipeline`, `distill compare` and `distill report`. Commands share code through the layers below, not each other."""
