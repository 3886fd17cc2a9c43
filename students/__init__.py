"""Students: ViTs with class + distillation tokens (timm VisionTransformerDistilled), or any timm classifier."""
from students.vit import DEIT_VARIANTS, Student, check_model_name

__all__ = ["DEIT_VARIANTS", "Student", "check_model_name"]
