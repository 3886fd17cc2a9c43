"""Each distillation method of distill/training/methods/ against its paper's formula, written here again from the
equations (numpy, float64, loop by loop: no code shared with the methods), on random logits with labels and with
mixup-style soft targets, to 1e-6; the total written once; the table as configs and compare see it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.common.errors import UserError
from distill.training.losses import DistillationLoss, loss_options
from distill.training.methods import METHODS, method_names
from distill.training.methods.dist import DIST
from distill.training.methods.dkd import DKD
from distill.training.methods.hard import Hard
from distill.training.methods.soft import Soft
from distill.training.run_checks import check_cache_holds

B, C = 6, 7
GEN = torch.Generator().manual_seed(0)
STUDENT = torch.randn(B, C, generator=GEN, dtype=torch.float64) * 3
TEACHER = torch.randn(B, C, generator=GEN, dtype=torch.float64) * 3
LABELS = torch.tensor([0, 3, 1, 6, 2, 3])
# mixup of each image with the next one's label (lam 0.7), label smoothing 0.1 folded in, as timm's Mixup does
_ONE_HOT = torch.nn.functional.one_hot(LABELS, C).double() * 0.9 + 0.1 / C
MIXED = 0.7 * _ONE_HOT + 0.3 * _ONE_HOT.roll(1, 0)
TARGETS = {"labels": LABELS, "mixed": MIXED}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))


def zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean()) / z.std()


def by_paper(name: str, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, standardize: bool = False,
             **options: object) -> dict[str, float]:
    """The method's unweighted terms from the paper's equations."""
    s_rows, t_rows = student.numpy(), teacher.numpy()
    if standardize:  # Sun et al.: both logit vectors; hard's target is the teacher's argmax, which it keeps
        s_rows = s_rows if name == "hard" else np.stack([zscore(r) for r in s_rows])
        t_rows = np.stack([zscore(r) for r in t_rows])
    tau = options.get("tau", 1.0)
    if name == "soft":  # Hinton et al.: KL(p_T || p_S) at T, times T^2, mean over the batch
        return {"distill": np.mean([kl(softmax(t / tau), softmax(s / tau)) for s, t in zip(s_rows, t_rows)]) * tau**2}
    if name == "hard":  # DeiT: -log p_S[argmax p_T]
        return {"distill": np.mean([-np.log(softmax(s)[int(np.argmax(t))]) for s, t in zip(s_rows, t_rows)])}
    if name == "dkd":  # Zhao et al. eq. (1)-(4): b = (p_t, 1 - p_t); p_hat over the classes other than t
        classes = target.argmax(-1).numpy() if target.ndim == 2 else target.numpy()
        tckd, nckd = [], []
        for s, t, gt in zip(s_rows, t_rows, classes):
            p_s, p_t = softmax(s / tau), softmax(t / tau)
            tckd.append(kl(np.array([p_t[gt], 1 - p_t[gt]]), np.array([p_s[gt], 1 - p_s[gt]])))
            others = [j for j in range(C) if j != gt]
            nckd.append(kl(softmax(t[others] / tau), softmax(s[others] / tau)))
        return {"tckd": np.mean(tckd) * tau**2, "nckd": np.mean(nckd) * tau**2}
    if name == "dist":  # Huang et al. eq. (5)-(8): 1 - Pearson per sample (inter) and per class (intra)
        y_s = np.stack([softmax(s / tau) for s in s_rows])
        y_t = np.stack([softmax(t / tau) for t in t_rows])
        inter = np.mean([1 - np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(B)])
        intra = np.mean([1 - np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(C)])
        return {"inter": inter * tau**2, "intra": intra * tau**2}
    raise AssertionError(name)


CASES = [
    ("soft", Soft, {}), ("soft", Soft, {"tau": 4.0}), ("soft", Soft, {"tau": 2.0, "standardize": True}),
    ("hard", Hard, {}), ("hard", Hard, {"standardize": True}),
    ("dkd", DKD, {}), ("dkd", DKD, {"tau": 1.0, "standardize": True}),
    ("dist", DIST, {}), ("dist", DIST, {"tau": 4.0, "standardize": True}),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name, method, options", CASES, ids=[f"{n}-{o}" for n, _, o in CASES])
def test_each_method_equals_its_papers_formula_with_labels_and_with_mixed_targets(name, method, options, target):
    built = method(**options)
    terms = built(STUDENT, TEACHER, TARGETS[target])
    expected = by_paper(name, STUDENT, TEACHER, TARGETS[target], **built.options())  # the method's own defaults
    assert set(terms) == set(expected)
    for term, value in expected.items():
        assert float(terms[term]) == pytest.approx(value, abs=1e-6, rel=1e-6), term


def test_dkd_splits_a_mixed_view_at_the_class_with_the_most_of_its_target():
    """On a mixed view DKD's target class is the larger share (0.7 of image i's label), not the other image's."""
    split_at_main = DKD()(STUDENT, TEACHER, MIXED)
    split_at_other = DKD()(STUDENT, TEACHER, LABELS.roll(1, 0))
    assert torch.allclose(torch.stack(list(split_at_main.values())), torch.stack(list(DKD()(STUDENT, TEACHER,
                                                                                              LABELS).values())))
    assert not torch.allclose(split_at_main["nckd"], split_at_other["nckd"])


def test_the_total_is_label_method_terms_and_features_each_weighted_once():
    cls_logits = torch.randn(B, C, generator=GEN, dtype=torch.float64)
    feature = torch.tensor(0.37, dtype=torch.float64)
    dkd = DKD(alpha=0.5, beta=3.0, tau=2.0, warmup_epochs=4.0)
    loss = DistillationLoss(dkd, alpha=0.4, label_smoothing=0.0, feature_weight=2.5)
    parts = loss(cls_logits, STUDENT, LABELS, TEACHER, feature, epoch=1.0)  # a quarter through DKD's warm-up
    paper = by_paper("dkd", STUDENT, TEACHER, LABELS, tau=2.0)
    label = np.mean([-np.log(softmax(z)[y]) for z, y in zip(cls_logits.numpy(), LABELS.numpy())])
    expected = 0.6 * label + 0.4 * (0.25 * 0.5 * paper["tckd"] + 0.25 * 3.0 * paper["nckd"]) + 2.5 * 0.37
    assert float(parts["loss"]) == pytest.approx(expected, abs=1e-6)
    assert sorted(parts) == ["loss", "loss_base", "loss_feature", "loss_nckd", "loss_tckd"]
    assert float(parts["loss_tckd"]) == pytest.approx(paper["tckd"], abs=1e-6)  # logged unweighted


def test_by_name_a_method_takes_the_models_tau_and_records_itself_so_a_checkpoint_rebuilds_it():
    assert DistillationLoss("soft", tau=3.0).method.tau == 3.0
    assert DistillationLoss("dkd", tau=2.0).method.tau == 2.0 and DistillationLoss("hard").method.name == "hard"
    recorded = loss_options({"distillation": DKD(beta=2.0, standardize=True)})["distillation"]
    assert recorded == {"class_path": "distill.training.methods.dkd.DKD",
                        "init_args": {"alpha": 1.0, "beta": 2.0, "tau": 4.0, "warmup_epochs": 20.0, "standardize": True}}


def test_the_table_is_the_methods_folder_and_compare_takes_every_name():
    assert method_names() == ("none", "soft", "hard", "dkd", "dist")
    assert all(METHODS[name].name == name for name in method_names())
    from distill.commands import compare

    assert "none, soft, hard, dkd, dist" in compare.compare.__doc__


def test_a_method_that_reads_every_class_is_refused_with_a_top_k_cache(monkeypatch):
    from distill.cache.format import TeacherCache

    monkeypatch.setattr(TeacherCache, "read_meta", classmethod(lambda cls, path: {"top_k": 3}))
    with pytest.raises(UserError, match=r"model.distillation 'dkd' reads every class's teacher probability, but "
                                        r"data.teacher_cache 'c' holds the top 3 of 7"):
        check_cache_holds(DKD(), "c", 7)
    check_cache_holds(Soft(), "c", 7)  # soft and hard train from a top-k cache
    check_cache_holds(DIST(), "c", 3)  # a cache of every class serves DIST


def test_dkd_stays_exact_and_keeps_teaching_a_student_that_is_sure_of_itself():
    """A confident student (its target logit 30 above the others) against an unsure teacher: the loss and its
    gradient from log space, where probabilities near 0 neither vanish nor clamp away the gradient."""
    student = torch.tensor([[30.0, 0.0, 0.0], [1500.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.zeros(2, 3)
    terms = DKD(tau=1.0)(student, teacher, torch.tensor([0, 0]))
    # row 0 by hand: b_T = (1/3, 2/3), log b_S = (-log(1 + 2e^-30), log(2e^-30) - log(1 + 2e^-30))
    log_b_s = np.array([-np.log1p(2 * np.exp(-30.0)), np.log(2.0) - 30.0 - np.log1p(2 * np.exp(-30.0))])
    row0 = (1 / 3) * (np.log(1 / 3) - log_b_s[0]) + (2 / 3) * (np.log(2 / 3) - log_b_s[1])
    row1 = (1 / 3) * np.log(1 / 3) + (2 / 3) * (np.log(2 / 3) - (np.log(2.0) - 1500.0))
    assert float(terms["tckd"]) == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert float(terms["nckd"]) == pytest.approx(0.0, abs=1e-6)  # both spread their rest evenly
    terms["tckd"].backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 0] > 0.3  # it still pulls the target down


def test_standardized_soft_is_refused_with_a_top_k_cache_and_a_method_subclass_never_takes_its_parents_name(
        monkeypatch):
    from distill.cache.format import TeacherCache
    from distill.training.methods.base import LogitMethod

    monkeypatch.setattr(TeacherCache, "read_meta", classmethod(lambda cls, path: {"top_k": 3}))
    with pytest.raises(UserError, match="'soft' with standardize .*, or leave standardize off$"):
        check_cache_holds(Soft(standardize=True), "c", 7)
    check_cache_holds(Hard(standardize=True), "c", 7)  # the argmax, which the cache's first class is, z-scored or not

    class MyDKD(DKD):
        pass

    assert LogitMethod.registry["dkd"] is DKD and MyDKD.name == "dkd"


def test_validate_takes_a_methods_class_and_options_as_trained_and_refuses_other_ones(tmp_path, capsys):
    from distill.cli import cli_main
    from tests.helpers import distill_args, run_cli_error

    args = [*distill_args(tmp_path), "--model.distillation=DKD", "--model.distillation.beta=2"]
    cli_main(args)
    checkpoint = f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"
    cli_main(["validate", *args[1:], checkpoint])  # the same class and options as trained: measured
    assert "val/acc" in capsys.readouterr().out
    line = run_cli_error(["validate", *args[1:-1], "--model.distillation.beta=3", checkpoint], capsys)
    assert "sets model.distillation.beta=3 (the checkpoint has 2.0)" in line
    line = run_cli_error(["validate", *args[1:-2], "--model.distillation=DIST", checkpoint], capsys)
    assert "sets model.distillation=DIST (the checkpoint has {'class_path': 'distill.training.methods.dkd.DKD'" in line


def test_none_builds_no_teacher_so_the_recipes_teacher_file_need_not_exist(tmp_path, capsys):
    from distill.cli import cli_main
    from tests.helpers import distill_args

    args = [a if not a.startswith("--model.teacher.init_args.weights=") else
            f"--model.teacher.init_args.weights={tmp_path / 'not_trained_yet.ckpt'}" for a in distill_args(tmp_path)]
    cli_main([*args, "--model.distillation=none"])
    import torch

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved.get("teacher_config") is None and saved["hyper_parameters"]["feature_weight"] == 0.0
