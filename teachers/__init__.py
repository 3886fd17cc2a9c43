"""Teachers: frozen timm classifiers (one, or an ensemble), loaded safely, kept in eval mode, each seeing its own
normalisation and input size."""
from distill.common.checkpoints import extract_state_dict, read_weights_file
from teachers.ensemble import TeacherEnsemble
from teachers.teacher import Teacher

__all__ = ["Teacher", "TeacherEnsemble", "extract_state_dict", "read_weights_file"]
