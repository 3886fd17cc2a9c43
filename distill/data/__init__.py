"""The data: the sources (scikit-learn's digits, an ImageFolder tree, a Hugging Face dataset), the seeded views and
their sampler, the mixing of fixed pairs, image reading and the typed training batch. No Lightning: the data module
that puts them together is `distill/training/datamodule.py`."""
