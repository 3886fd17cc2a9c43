"""DeiT-style distillation of frozen CNN teachers into ViT students, on Lightning and timm."""
from distill.data import ImageDataModule
from distill.losses import DistillationLoss
from distill.module import DistillationModule

__all__ = ["DistillationLoss", "DistillationModule", "ImageDataModule"]
