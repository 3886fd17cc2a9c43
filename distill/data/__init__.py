"""The data: the sources (scikit-learn's digits, an ImageFolder tree, a Hugging Face dataset), the seeded views and
their sampler, the mixing of fixed pairs, image reading, the typed training batch, and the Lightning data module
that puts them together (`datamodule.py`, the only module here that imports Lightning)."""
