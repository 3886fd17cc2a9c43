"""Feature imitation (Li et al. 2022's locality guidance): the student's blocks learn the teacher's feature maps, from
one forward of each, beside the logit distillation; the projections train with the student and are never exported."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from distill.cli import cli_main
from distill.common.errors import UserError
from distill.training.imitation import FeatureImitation, imitation_for
from distill.training.module import DistillationModule
from students import Student
from teachers import Teacher, TeacherEnsemble
from tests.helpers import TINY_STUDENT, TINY_SWIN, TINY_TEACHER, random_teacher_file, scalars, shrink


def teacher(tmp_path, name: str = "0", model_name: str = TINY_TEACHER) -> Teacher:
    path = random_teacher_file(tmp_path, model_name, 10, name=f"{name}.safetensors")
    return Teacher(model_name, weights=str(path), precision="32", channels_last=False)


def test_one_forward_gives_the_logits_and_the_maps_of_the_levels_asked_in_the_order_asked(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    guide = teacher(tmp_path)
    logits, maps = guide.forward_with_features(images, [2, 1])
    assert torch.equal(logits, guide(images))
    assert [tuple(m.shape) for m in maps] == [(3, 48, 4, 4), (3, 32, 8, 8)]  # test_resnet: layer2, then layer1
    student = Student(10, 32, **dict(TINY_STUDENT, depth=3)).eval()
    cls_logits, dist_logits, blocks = student.forward_heads_and_features(images, [2, 0])
    assert torch.allclose(cls_logits, student.forward_heads(images)[0]) and torch.allclose(dist_logits, student.forward_heads(images)[1])
    assert [tuple(b.shape) for b in blocks] == [(3, 32, 4, 4)] * 2 and not torch.equal(blocks[0], blocks[1])


def test_in_training_the_heads_are_those_of_the_students_own_forward_dropout_included():
    student = Student(10, 32, **dict(TINY_STUDENT, drop_rate=0.5, drop_path_rate=0.0)).train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    expected = student.forward_heads(images)
    torch.manual_seed(1)
    cls_logits, dist_logits, _ = student.forward_heads_and_features(images, [1])
    assert torch.allclose(cls_logits, expected[0]) and torch.allclose(dist_logits, expected[1])


def test_the_default_pairs_are_the_students_first_middle_and_last_blocks_with_the_teachers_first_three_stages(tmp_path):
    student = Student(10, 32, **dict(TINY_STUDENT, depth=6))
    imitation = imitation_for(student, teacher(tmp_path), 2.5, None, None)
    assert imitation.student_levels == [0, 3, 5] and imitation.teacher_levels == [[1, 2, 3]]  # reductions 4, 8, 16
    assert [p.out_channels for p in imitation.project] == [32, 48, 192]
    explicit = imitation_for(student, teacher(tmp_path), 1.0, [(5, 4), (1, 1)], None)
    assert explicit.student_levels == [5, 1] and explicit.teacher_levels == [[4, 1]]


def test_the_loss_is_zero_when_the_student_holds_the_teachers_maps_and_falls_as_the_student_learns_them(tmp_path):
    imitation = FeatureImitation([32], [32])
    with torch.no_grad():  # an identity projection: the student's map is compared as it is
        imitation.project[0].weight.copy_(torch.eye(32).view(32, 32, 1, 1))
        imitation.project[0].bias.zero_()
    target = torch.randn(2, 32, 8, 8)
    assert imitation([target], [target]).item() == 0.0
    assert imitation([torch.nn.functional.avg_pool2d(target, 2)], [target]).item() > 0  # resized to 8 x 8 to compare
    torch.manual_seed(0)
    guide, student = teacher(tmp_path), Student(10, 32, **dict(TINY_STUDENT, depth=3, drop_path_rate=0.0))
    imitation = imitation_for(student, guide, 1.0, None, None)
    optimizer = torch.optim.AdamW([*student.parameters(), *imitation.parameters()], lr=3e-3)
    images = torch.randn(8, 3, 32, 32)
    losses = []
    for _ in range(40):
        _, _, loss = imitation.step(guide, student.forward_heads_and_features, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


STUDENTS = {"deit": dict(TINY_STUDENT, depth=3), "swin": dict(TINY_SWIN),
            "resnet+head": dict(model_name="test_resnet", distill_head=True)}


@pytest.mark.parametrize("student", sorted(STUDENTS))
@pytest.mark.parametrize("distillation", ["soft", "dkd"])
def test_every_trainable_parameter_gets_a_gradient_with_imitation_too(tmp_path, student, distillation):
    pairs = [(0, 1), (1, 2)] if student == "swin" else None  # Swin's two stages: explicit pairs
    module = DistillationModule(lambda c, s: Student(c, s, **STUDENTS[student]), teacher(tmp_path), num_classes=10,
                                img_size=32, distillation=distillation, feature_weight=2.5, feature_pairs=pairs)
    module.train()
    teacher_logits, (cls_logits, dist_logits), feature = module.imitation.step(
        module.teacher, module.student.forward_heads_and_features, torch.randn(4, 3, 32, 32))
    loss = module.loss(cls_logits, dist_logits, torch.tensor([0, 1, 2, 3]), teacher_logits, feature)["loss"]
    loss.backward()
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # what DDP (find_unused_parameters=False) would fail on
    groups = module.imitation.parameter_groups(module.student, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))


def test_an_ensemble_is_imitated_member_by_member_each_pair_through_its_own_projection(tmp_path):
    members = [teacher(tmp_path, "a"), teacher(tmp_path, "b", "test_convnext")]  # stages /4, /8, /16: 1-3 and 0-2
    ensemble = TeacherEnsemble(members)
    student = Student(10, 32, **dict(TINY_STUDENT, depth=3)).eval()
    imitation = imitation_for(student, ensemble, 1.0, None, None)
    assert imitation.teacher_levels == [[1, 2, 3], [0, 1, 2]]
    assert [p.out_channels for p in imitation.project] == [32, 48, 192, 24, 32, 48]
    images = torch.randn(2, 3, 32, 32)
    logits, _, loss = imitation.step(ensemble, student.forward_heads_and_features, images)
    _, _, blocks = student.forward_heads_and_features(images, imitation.student_levels)
    each = []  # each member's error: the sum over its pairs, through its own projections
    for index, (member, levels) in enumerate(zip(members, imitation.teacher_levels)):
        _, maps = member.forward_with_features(images, levels)
        each.append(sum(torch.nn.functional.mse_loss(
            torch.nn.functional.interpolate(imitation.project[3 * index + i](b), size=m.shape[-2:], mode="bilinear")
            if m.shape[-1] > b.shape[-1] else imitation.project[3 * index + i](b),
            m if m.shape[-1] >= b.shape[-1] else torch.nn.functional.interpolate(m, size=b.shape[-2:], mode="bilinear"))
            for i, (b, m) in enumerate(zip(blocks, maps))))
    assert torch.allclose(loss, (each[0] + each[1]) / 2) and torch.equal(logits, ensemble(images))


@pytest.mark.parametrize("case, message", [
    ("cache", "model.feature_weight: a teacher cache holds the teacher's top-k outputs, not its features"),
    ("no teacher", "model.feature_weight: feature imitation needs a model.teacher; set one, or "
                   "model.feature_weight: 0"),
    ("student level", "model.feature_pairs: student level 7 does not exist (the student has 2 feature levels: 0..1)"),
    ("teacher level", "model.feature_pairs: teacher level 9 does not exist (the teacher has 5 feature levels: 0..4)"),
    ("no pairs", "model.feature_pairs: give at least one [student level, teacher level] pair, or null"),
    ("no weight", "model.feature_pairs is set but model.feature_weight is 0 (imitation off)"),
    ("vit teacher", "model.feature_pairs: the teacher has no feature levels of reduction 4, 8 to pair by default"),
])
def test_a_pairing_that_cannot_work_is_refused_naming_the_option(tmp_path, case, message):
    student = Student(10, 32, **TINY_STUDENT)
    guide = None if case == "no teacher" else teacher(tmp_path)
    if case == "vit teacher":  # every block of a ViT is at reduction 8 here
        guide = Teacher("deit_tiny_patch16_224", weights="none", num_classes=10, img_size=32)
        guide.model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    pairs = {"student level": [(7, 1)], "teacher level": [(0, 9)], "no pairs": [], "no weight": [(0, 1)]}.get(case)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        imitation_for(student, guide, 0.0 if case == "no weight" else 2.5, pairs, "runs/cache" if case == "cache" else None)


def test_a_fit_with_imitation_logs_its_loss_saves_its_projections_and_exports_the_student_alone(tmp_path, teacher_file):
    cli_main(["fit", *shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
              f"--model.teacher.init_args.weights={teacher_file}", "--model.feature_weight=2.5",
              "--model.student.init_args.depth=3"])
    logged = scalars(tmp_path / "runs")
    assert len(logged["train/loss_feature"]) == len(logged["train/loss"]) == 3  # every step (log_every_n_steps 1)
    for total, base, distill, feature in zip(*(logged[f"train/{k}"] for k in ("loss", "loss_base", "loss_distill",
                                                                               "loss_feature"))):
        assert total == pytest.approx(0.5 * base + 0.5 * distill + 2.5 * feature, rel=1e-4)  # alpha 0.5
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["feature_weight"] == 2.5
    assert any(k.startswith("imitation.project.") for k in checkpoint["state_dict"])
    cli_main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "export"),
              "--no-onnx", "--no-torchscript"])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    exported = set(load_file(tmp_path / "export" / "model.safetensors"))
    student = {k.removeprefix("student.model.") for k in checkpoint["state_dict"] if k.startswith("student.model.")}
    assert config["architecture"] == "deit_tiny_distilled_patch16_224" and exported == student  # no projection
    timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)  # timm's strict load of those keys
