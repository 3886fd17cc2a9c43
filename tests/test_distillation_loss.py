"""DistillationLoss against values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill.training.losses import DistillationLoss
from tests.helpers import distill_args, run_cli_error

torch.manual_seed(0)
B, C = 4, 5
STUDENT = torch.randn(B, C)
DIST = torch.randn(B, C)
TEACHER = torch.randn(B, C)
LABELS = torch.tensor([0, 3, 1, 4])


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    """sum_i p_t log(p_t / p_s) per sample, averaged over the batch."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s = [math.exp(v / tau) for v in s_row]
        p_t = [math.exp(v / tau) for v in t_row]
        p_s = [v / sum(p_s) for v in p_s]
        p_t = [v / sum(p_t) for v in p_t]
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
    return total / len(student)


def test_hard_distillation_with_a_one_hot_teacher_equals_cross_entropy_on_its_labels():
    teacher_labels = torch.tensor([2, 2, 0, 1])
    one_hot_teacher = F.one_hot(teacher_labels, C).float() * 10
    loss = DistillationLoss("hard", alpha=1.0, label_smoothing=0.0)
    parts = loss(STUDENT, DIST, LABELS, one_hot_teacher)
    by_hand = -sum(F.log_softmax(DIST, -1)[i, teacher_labels[i]].item() for i in range(B)) / B
    assert parts["loss_distill"].item() == pytest.approx(by_hand, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(by_hand, rel=1e-6)


def test_soft_distillation_at_tau_one_equals_kl_divergence():
    parts = DistillationLoss("soft", alpha=1.0, tau=1.0)(STUDENT, DIST, LABELS, TEACHER)
    assert parts["loss_distill"].item() == pytest.approx(kl_by_hand(DIST, TEACHER, 1.0), rel=1e-5)


def test_soft_distillation_scales_kl_at_temperature_by_tau_squared():
    parts = DistillationLoss("soft", alpha=1.0, tau=3.0)(STUDENT, DIST, LABELS, TEACHER)
    assert parts["loss_distill"].item() == pytest.approx(9.0 * kl_by_hand(DIST, TEACHER, 3.0), rel=1e-5)


def test_reference_normalization_is_batchmean_divided_by_classes():
    batchmean = DistillationLoss("soft", tau=2.0)(STUDENT, DIST, LABELS, TEACHER)["loss_distill"]
    reference = DistillationLoss("soft", tau=2.0, kl_normalization="reference")(STUDENT, DIST, LABELS, TEACHER)
    assert reference["loss_distill"].item() == pytest.approx(batchmean.item() / C, rel=1e-6)


def test_alpha_mixes_the_base_and_distillation_parts():
    parts = DistillationLoss("hard", alpha=0.3, label_smoothing=0.1)(STUDENT, DIST, LABELS, TEACHER)
    smoothed_ce = F.cross_entropy(STUDENT, LABELS, label_smoothing=0.1)
    teacher_ce = F.cross_entropy(DIST, TEACHER.argmax(-1))
    assert parts["loss_base"].item() == pytest.approx(smoothed_ce.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.7 * smoothed_ce.item() + 0.3 * teacher_ce.item(), rel=1e-6)


def test_soft_targets_from_mixup_use_soft_target_cross_entropy():
    soft = torch.softmax(torch.randn(B, C), -1)
    parts = DistillationLoss("none", alpha=0.5)(STUDENT, DIST, soft, None)
    by_hand = -(soft * F.log_softmax(STUDENT, -1)).sum(-1).mean()
    assert parts["loss_base"].item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_without_a_teacher_the_distillation_head_learns_the_labels():
    parts = DistillationLoss("none", alpha=0.5, label_smoothing=0.0)(STUDENT, DIST, LABELS)
    assert parts["loss_distill"].item() == pytest.approx(F.cross_entropy(DIST, LABELS).item(), rel=1e-6)


@pytest.mark.parametrize("option, expected", [
    ("--model.distillation=medium", "model.distillation: medium is not one of 'none', 'soft', 'hard', 'dkd', 'dist' "
                                    "(or a LogitMethod class with its options: NoTeacher, Soft, Hard, DKD, DIST)"),
    ("--model.distillation=fit.soft", "model.distillation: 'fit.soft' names no class (No module named 'fit'); give "
                                      "one of 'none', 'soft', 'hard', 'dkd', 'dist' or a LogitMethod class: NoTeacher"),
    ("--model.distillation=dkd --model.distillation.beta=2", "model.distillation: a method given by name takes no "
                                                             "options of its own ('beta'); give a class that takes "
                                                             "it, with them: --model.distillation CLASS "
                                                             "--model.distillation.beta VALUE (classes that take beta: "
                                                             "DKD, DIST)"),
    ("--model.distillation=none --model.distillation.standardize=true",
     "model.distillation: a method given by name takes no options of its own ('standardize'); give a class that "
     "takes it, with them: --model.distillation CLASS --model.distillation.standardize VALUE (classes that take "
     "standardize: Soft, Hard"),
    ("--model.distillation=soft --model.distillation.temperature=2",
     "model.distillation: no method takes an option 'temperature' (classes: NoTeacher, Soft, Hard, DKD, DIST)"),
    ("--model.distillation=DKD --model.distillation.betta=2", "model.distillation: DKD: Option 'betta' is not accepted "
                                                              "(its options: alpha, beta, tau, warmup_epochs, standardize)"),
    ("--model.distillation=DKD --model.tau=3", "model.tau: 3.0 applies to a method given by name; DKD takes its own "
                                               "(4.0 now): --model.distillation.tau 3.0"),
    ("--model.alpha=1.5", "model.alpha: 1.5 is out of range"),
    ("--model.tau=0", "model.tau: 0 is out of range"),
    ("--model.kl_normalization=mean", "model.kl_normalization: "),
    ("--model.feature_weight=-1", "model.feature_weight: -1 is out of range"),
    ("--model.distillation=DKD --model.distillation.beta=-1", "model.distillation.init_args.beta: -1 is out of range"),
    ("--model.distillation=DIST --model.distillation.tau=0", "model.distillation.init_args.tau: 0 is out of range"),
], ids=["unknown_method", "dotted_path_of_no_class", "name_with_options", "name_with_an_option_of_others",
         "an_option_no_method_takes", "class_with_unknown_option", "model_tau_beside_a_class", "alpha", "tau", "kl_normalization", "feature_weight", "dkd_beta", "dist_tau"])
def test_bad_loss_options_are_refused_by_their_types_in_one_line(tmp_path, capsys, option, expected):
    line = run_cli_error([*distill_args(tmp_path), *option.split()], capsys)
    assert line.startswith(f"error: {expected}"), line
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("method", ["DKD", "dkd"])
def test_a_methods_option_as_a_dotted_key_in_a_file_names_the_class_form_to_write(tmp_path, capsys, method):
    # `distillation: DKD` with `distillation.beta: 3` beside it: jsonargparse keeps the option and drops the name
    overlay = tmp_path / "dkd.yaml"
    overlay.write_text(f"model:\n  distillation: {method}\n  distillation.beta: 3\n")
    line = run_cli_error([*distill_args(tmp_path), "--config", str(overlay)], capsys)
    assert line.startswith("error: model.distillation: an option ('beta') without a class to take it"), line
    assert "`distillation: {class_path: CLASS, init_args: {beta: VALUE}}` (classes that take beta: DKD, DIST)" in line


def test_distillation_without_teacher_logits_is_an_error():
    with pytest.raises(ValueError, match="teacher logits"):
        DistillationLoss("hard")(STUDENT, DIST, LABELS, None)


@pytest.mark.parametrize("options, line", [
    ({"distillation": "hard", "tau": 3.0}, "model.tau 3.0 is not used: the method 'hard' does not take it"),
    ({"distillation": "none", "kl_normalization": "reference"}, "model.kl_normalization reference is not used"),
    ({"distillation": "DKD", "kl_normalization": "reference"},
     "model.kl_normalization reference is not used: the method 'DKD' does not take it (its options: alpha, beta"),
    ({"distillation": "soft", "tau": 3.0}, None),  # used
    ({"distillation": "hard", "tau": 1.0}, None),  # the default: nothing was asked
])
def test_a_model_option_the_method_does_not_take_is_said_not_silently_dropped(options, line):
    # said when a fit starts (DistillationModule.on_fit_start), not by export or predict rebuilding the loss
    from distill.training.methods import METHODS

    if options["distillation"] == "DKD":
        options = {**options, "distillation": METHODS["dkd"]()}
    said = DistillationLoss(**options).unused_options
    assert (len(said) == 1 and said[0].startswith(line)) if line else not said, said
