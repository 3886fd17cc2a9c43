"""Students: ViTs with class + distillation tokens (timm VisionTransformerDistilled), with a convolutional stem for
small data (students.hybrid, registered with timm on import), or any timm classifier."""
from students.hybrid import deit_tiny_r_s16_p8_distilled_224
from students.vit import DEIT_VARIANTS, Student, check_model_name

__all__ = ["DEIT_VARIANTS", "Student", "check_model_name", "deit_tiny_r_s16_p8_distilled_224"]
