"""DeiT-style distillation of frozen CNN teachers into ViT students, on Lightning and timm.

The package imports nothing at import time: `students` and `teachers` use `distill.common` without
loading Lightning. The commands are `distill.cli`'s table; the layers are described in
docs/how-it-works.md ("Changing the project").
"""
