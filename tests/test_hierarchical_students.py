"""Hierarchical students: Swin (and any timm backbone) with a distillation head on pooled features."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from distill.common.errors import UserError
from distill.commands.export import export_student
from distill.training.cli import make_cli
from distill.training.module import DistillationModule
from students import Student
from students.resize import adapt_student_state
from teachers import Teacher
from tests.helpers import TINY_SWIN, TINY_TEACHER, data_of, merged_config, shrink, teacher_of, train_tiny

ROOT = Path(__file__).resolve().parents[1]
# patch 4 at 32 px: an 8x8 grid, then 4x4; window 4 divides both


def swin_args(**overrides) -> list[str]:
    return [f"--model.student.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in {**TINY_SWIN, **overrides}.items()]


def test_both_heads_and_the_backbone_receive_gradients_and_eval_is_their_average():
    teacher = Teacher(TINY_TEACHER, weights="none", num_classes=10)
    module = DistillationModule(lambda c, s: Student(c, s, **TINY_SWIN), teacher, num_classes=10, img_size=32)
    student = module.student.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cls_logits, dist_logits = student(images)
    assert cls_logits.shape == dist_logits.shape == (4, 10)
    module.loss(cls_logits, dist_logits, labels, teacher(images))["loss"].backward()
    for name in ("model.patch_embed.proj.weight", "model.layers.1.blocks.0.attn.relative_position_bias_table",
                 "model.head.fc.weight", "head_dist.weight"):
        grad = student.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    student.eval()
    cls_logits, dist_logits = student.forward_heads(images)
    assert torch.allclose(student(images), (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)


def test_any_timm_backbone_takes_a_distillation_head_and_folds_it_into_its_classifier():
    student = Student(5, 32, model_name="test_resnet", distill_head=True).eval()
    images = torch.randn(2, 3, 32, 32)
    cls_logits, dist_logits = student.forward_heads(images)
    assert not torch.allclose(cls_logits, dist_logits)
    fused = student.fused_model()
    assert type(fused) is type(student.model) and not hasattr(fused, "head_dist")
    assert torch.allclose(fused(images), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_a_window_that_does_not_divide_a_stage_grid_is_a_clear_error():
    with pytest.raises(UserError, match="at image size 48 stage 1 has a 6x6 patch grid, not a multiple of its window 4; "
                                         "use an image size that is a multiple of 32"):
        Student(10, 48, **TINY_SWIN)


def test_a_larger_window_resizes_the_relative_position_tables():
    small, large = Student(10, 32, **TINY_SWIN), Student(10, 48, **{**TINY_SWIN, "window_size": 6})
    key = "model.layers.0.blocks.0.attn.relative_position_bias_table"
    adapted = adapt_student_state(small.state_dict(), large)
    assert small.state_dict()[key].shape == (7 * 7, 1) and adapted[key].shape == (11 * 11, 1)
    # the centre of the new table (relative offset 0) keeps the old centre's value
    assert torch.allclose(adapted[key][60], small.state_dict()[key][24], atol=1e-5)
    large.load_state_dict(adapted)


@pytest.fixture(scope="module")
def trained_swin(tmp_path_factory) -> Path:
    """A tiny Swin student distilled at 32 px on a generated 3-class folder (teacher trained first)."""
    return train_tiny(tmp_path_factory.mktemp("swin"), "distill_swin.yaml", tuple(swin_args()))


def test_swin_export_is_a_plain_timm_swin_matching_the_student(trained_swin, tmp_path):
    out = tmp_path / "export"
    report = export_student(trained_swin / "ckpt" / "best.ckpt", out, torchscript=False)
    assert all(r["max_abs_diff"] <= 1e-4 for r in report["formats"].values())
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "swin_tiny_patch4_window7_224"
    assert config["model_args"]["window_size"] == 4 and config["model_args"]["depths"] == [1, 1]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(model).__name__ == "SwinTransformer"
    from distill.commands.export import load_student
    student, _ = load_student(trained_swin / "ckpt" / "best.ckpt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
        assert torch.allclose(model(images), expected, atol=1e-5)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - expected.numpy()).max() < 1e-4


def test_a_swin_stage_at_48_px_starts_close_to_where_the_32_px_stage_ended(trained_swin):
    best = trained_swin / "ckpt" / "best.ckpt"
    before = torch.load(best, map_location="cpu", weights_only=True)
    previous = next(v["best_model_score"] for k, v in before["callbacks"].items() if "Checkpoint" in k).item()
    args = [*shrink(trained_swin / "hires", "distill_swin.yaml"), *swin_args(window_size=6), *data_of(trained_swin),
            "--data.img_size=48", f"--model.init_from={best}", "--trainer.limit_val_batches=1.0",
            *teacher_of(trained_swin), "--model.teacher.init_args.img_size=32"]
    cli = make_cli(args, run=False)
    assert cli.model.student.model.layers[0].blocks[0].attn.window_size == (6, 6)
    first = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/acc"]
    assert previous > 0.8  # well above chance (1/3), so closeness means the weights were carried over
    assert abs(first - previous) < 0.2, (first, previous)
    cli.trainer.fit(cli.model, cli.datamodule)  # and the stage trains at 48 px


def test_the_imagenet_swin_config_holds_the_swin_recipe():
    config = merged_config("swin_tiny")
    model, data = config["model"], config["data"]
    assert model["student"]["init_args"] == {"model_name": "swin_tiny_patch4_window7_224", "distill_head": True,
                                             "drop_path_rate": 0.2, "drop_rate": 0.0}
    assert (model["lr_scale_batch"], model["ema_decay"], data["repeated_aug"]) == (None, None, 1)
    assert model["teacher"]["init_args"]["model_name"] == "regnety_160.deit_in1k"
    assert (model["distillation"], model["lr"], model["weight_decay"], model["warmup_epochs"]) == ("hard", 1e-3, 0.05, 20)
    assert (config["trainer"]["max_epochs"], data["img_size"], data["crop_pct"]) == (300, 224, 0.875)
    assert (data["auto_augment"], data["mixup"], data["cutmix"], data["re_prob"]) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25)

    # that it parses, instantiates and trains (shrunk): tests/test_deit_recipe.py, with the other ImageNet configs
