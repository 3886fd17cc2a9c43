"""Teachers: frozen timm convnets, loaded safely, kept in eval mode, re-normalising their input."""
from teachers.teacher import Teacher
from distill.checkpoints import extract_state_dict, read_weights_file

__all__ = ["Teacher", "extract_state_dict", "read_weights_file"]
