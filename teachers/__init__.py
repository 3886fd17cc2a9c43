"""Teachers: frozen timm convnets, loaded safely, kept in eval mode, re-normalising their input."""
from distill.checkpoints import extract_state_dict, read_weights_file
from teachers.teacher import Teacher

__all__ = ["Teacher", "extract_state_dict", "read_weights_file"]
