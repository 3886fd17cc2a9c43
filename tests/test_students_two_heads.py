"""Students: two heads in training, their average in eval, gradients reach both tokens."""
import subprocess
import sys

import pytest
import timm
import torch

from distill.cli import cli_main
from distill.common.errors import UserError
from distill.commands.export import export_student, load_student
from distill.training.cli import make_cli
from distill.training.module import DistillationModule
from students import Student
from teachers import Teacher
from tests.helpers import ROOT, TINY_STUDENT, TINY_TEACHER, shrink, tiny_student


def test_distilled_student_returns_both_heads_in_training_and_their_average_in_eval():
    student = tiny_student()
    images = torch.randn(3, 3, 32, 32)
    student.train()
    cls_logits, dist_logits = student(images)
    assert cls_logits.shape == dist_logits.shape == (3, 10)
    student.eval()
    cls_logits, dist_logits = student.forward_heads(images)
    assert torch.allclose(student(images), (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)


def test_distillation_token_and_both_heads_receive_gradients(student_factory):
    teacher = Teacher(TINY_TEACHER, weights="none", num_classes=10)
    module = DistillationModule(student_factory, teacher, num_classes=10, img_size=32, distillation="hard")
    module.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cls_logits, dist_logits = module.student.forward_heads(images)
    module.loss(cls_logits, dist_logits, labels, teacher(images))["loss"].backward()
    model = module.student.model
    for name in ("dist_token", "cls_token", "pos_embed", "head.weight", "head_dist.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_student_without_distillation_token_distills_through_its_single_head():
    student = Student(10, 32, model_name="test_resnet")
    assert not student.distilled
    student.train()
    cls_logits, dist_logits = student.forward_heads(torch.randn(2, 3, 32, 32))
    assert cls_logits is dist_logits and cls_logits.shape == (2, 10)


def test_custom_sizes_reach_the_timm_model():
    student = Student(7, 48, model_name="deit_small", patch_size=8, embed_dim=48, depth=3, num_heads=3)
    model = student.model
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (48, 3, 3)
    assert model.pos_embed.shape == (1, 6 * 6 + 2, 48)  # 36 patches + class + distillation tokens
    assert model.head.out_features == model.head_dist.out_features == 7


def test_named_deit_variants_resolve_to_timm_distilled_models():
    student = Student(10, 32, model_name="deit_base", patch_size=16, depth=1)
    assert student.distilled and student.model.embed_dim == 768


def test_image_size_not_divisible_by_patch_size_is_a_clear_error():
    with pytest.raises(UserError, match="image size 36 is not divisible by patch size 8"):
        Student(10, 36, **TINY_STUDENT)


def test_unknown_student_name_suggests_close_names():
    with pytest.raises(UserError, match="unknown timm model 'deit_tinyy'.*deit_tiny"):
        Student(10, 32, model_name="deit_tinyy")


def test_no_weight_decay_on_tokens_position_embedding_norms_and_biases(student_factory):
    module = DistillationModule(student_factory, None, num_classes=10, img_size=32, distillation="none")

    class FakeTrainer:  # configure_optimizers reads only these
        max_epochs, estimated_stepping_batches = 2, 10
    module.trainer = FakeTrainer()  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.student.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"model.cls_token", "model.dist_token", "model.pos_embed", "model.norm.weight", "model.head.bias"} <= no_decay
    assert "model.blocks.0.attn.qkv.weight" in decay and "model.head.weight" in decay
    assert len(no_decay) + len(decay) == len(names)


def test_learning_rate_warms_up_then_decays_by_cosine_to_min_lr(student_factory):
    module = DistillationModule(student_factory, None, num_classes=10, img_size=32, distillation="none",
                                lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=2)

    class FakeTrainer:
        max_epochs, estimated_stepping_batches = 10, 100  # 10 steps per epoch
    module.trainer = FakeTrainer()  # type: ignore[assignment]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for step in range(100):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx((1e-6 + 1e-3) / 2, rel=0.05)  # halfway through warmup
    assert max(lrs) == pytest.approx(1e-3, rel=0.02) and lrs.index(max(lrs)) in (19, 20)
    assert lrs[-1] == pytest.approx(1e-5, rel=0.2) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_the_head_student_trains_and_exports_as_a_plain_timm_model(tmp_path, teacher_file):
    shrunk = shrink(tmp_path, "distill.yaml")
    keep = [a for a in shrunk if not a.startswith("--model.student.")]  # the recipe's width and depth
    args = [*keep[:2], "--config", str(ROOT / "configs" / "students" / "heads.yaml"), *keep[2:],
            f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher_file}"]
    student = make_cli(args, run=False).model.student  # the convolutional stem in front of the transformer
    assert student.config["model_name"] == "vit_tiny_r_s16_p8_224" and student.config["embed_dim"] == 128
    assert student.model.patch_embed.grid_size == (4, 4) and student.head_dist is not None
    cli_main(["fit", *args])
    out = tmp_path / "export"
    export_student(tmp_path / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    trained, _ = load_student(tmp_path / "ckpt" / "best.ckpt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images)
        assert torch.allclose(exported, trained(images), atol=1e-5)  # the two heads folded into one classifier


def test_the_recipes_student_has_both_tokens_on_its_stem_trains_and_exports_to_every_format(tmp_path, teacher_file):
    shrunk = shrink(tmp_path, "distill.yaml")
    keep = [a for a in shrunk if not a.startswith("--model.student.")]  # the recipe's own student, full size
    args = [*keep, f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher_file}"]
    student = make_cli(args, run=False).model.student
    assert student.distilled and student.model.num_prefix_tokens == 2  # a class token and a distillation token
    assert type(student.model.patch_embed).__name__ == "HybridEmbed" and student.model.patch_embed.grid_size == (4, 4)
    cli_main(["fit", *args])
    out = tmp_path / "export"
    report = export_student(tmp_path / "ckpt" / "best.ckpt", out)  # ONNX and TorchScript checked against PyTorch
    assert set(report["formats"]) == {"timm", "onnx", "torchscript"}
    trained, _ = load_student(tmp_path / "ckpt" / "best.ckpt")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cls_logits, dist_logits, _ = trained.forward_with_tokens(images)
    torch.save(images, tmp_path / "images.pt")
    # another program: `import students` registers the architecture, then timm builds the export alone
    code = ("import sys, torch, timm, students\n"
            f"model = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
            f"torch.save(model(torch.load('{tmp_path / 'images.pt'}')), '{tmp_path / 'out.pt'}')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300)
    loaded = torch.load(tmp_path / "out.pt")
    assert torch.allclose(loaded, (cls_logits + dist_logits) / 2, atol=1e-5)  # the average of the two heads
