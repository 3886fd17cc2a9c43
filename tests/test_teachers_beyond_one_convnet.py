"""Any student trained here can teach (a ViT at its own size and normalisation), and several teachers teach as one."""
import json
import math

import pytest
import yaml
import torch

from distill.cli import cli_main
from distill.commands.compare import format_table, summarize_runs
from distill.common.errors import UserError
from students import Student
from teachers import Teacher, TeacherEnsemble
from tests.helpers import TINY_STUDENT, TINY_TEACHER, random_teacher_file, run_cli_error, scalars, shrink


def run_checkpoint(tmp_path, student: Student, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    """What `distill fit` saves of a student, as a teacher reads it: weights, student_config, normalisation."""
    path = tmp_path / f"{student.config['model_name']}.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
                "student_config": student.config,
                "hyper_parameters": {"input_mean": list(mean), "input_std": list(std), "img_size": student.config["img_size"]}},
               path)
    return path


@pytest.mark.parametrize("model_name, distill_head", [("deit_tiny", False), ("vit_tiny_r_s16_p8_224", True)])
def test_a_vit_trained_here_teaches_at_its_own_size_and_normalisation_as_it_evaluated(tmp_path, model_name, distill_head):
    torch.manual_seed(0)
    options = dict(TINY_STUDENT, model_name=model_name, patch_size=8 if model_name == "deit_tiny" else 2)
    vit = Student(10, 32, **options, distill_head=distill_head).eval()
    teacher = Teacher(model_name, weights=str(run_checkpoint(tmp_path, vit)), precision="32", channels_last=False)
    assert teacher.img_size == 32 and teacher.mean == (0.5, 0.5, 0.5) and teacher.num_classes == 10
    # the student's images: ImageNet-normalised, at 48 px; the teacher sees them resized to 32 and renormalised
    teacher.set_input_normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.rand(3, 3, 48, 48)
    student_view = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    own_view = torch.nn.functional.interpolate((pixels - 0.5) / 0.25, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = vit(own_view)  # eval: the average of its two heads
    assert torch.allclose(teacher(student_view), expected, atol=1e-4)


def test_a_run_checkpoint_of_another_student_is_not_taken_for_the_teacher_named(tmp_path):
    vit = Student(10, 32, **TINY_STUDENT)
    with pytest.raises(UserError, match=f"does not fit '{TINY_TEACHER}'"):
        Teacher(TINY_TEACHER, weights=str(run_checkpoint(tmp_path, vit)))
    with pytest.raises(UserError, match="num_classes is 5 but .* predicts 10 classes"):
        Teacher("deit_tiny", weights=str(run_checkpoint(tmp_path, vit)), num_classes=5)


def teachers(tmp_path, *names_and_classes):
    return [Teacher(name, weights=str(random_teacher_file(tmp_path, name, classes, name=f"{i}.safetensors")),
                    precision="32", channels_last=False) for i, (name, classes) in enumerate(names_and_classes)]


def test_an_ensembles_prediction_is_the_mean_of_its_members_probabilities(tmp_path):
    members = teachers(tmp_path, (TINY_TEACHER, 10), ("resnet10t", 10))
    ensemble = TeacherEnsemble(members)
    images = torch.randn(4, 3, 32, 32)
    logits, each = ensemble.forward_members(images)
    mean = (members[0](images).softmax(-1) + members[1](images).softmax(-1)) / 2
    assert torch.allclose(logits.softmax(-1), mean, atol=1e-6) and torch.allclose(logits.exp().sum(-1), torch.ones(4))
    assert len(each) == 2 and torch.equal(each[1], members[1](images))
    ensemble.train()
    assert not any(m.training for m in ensemble.modules()) and not any(p.requires_grad for p in ensemble.parameters())
    assert ensemble.config == {"members": [members[0].config, members[1].config]}


def test_an_ensemble_of_teachers_of_other_classes_is_refused(tmp_path):
    with pytest.raises(UserError, match="must predict the same classes.*: 10.*: 5"):
        TeacherEnsemble(teachers(tmp_path, (TINY_TEACHER, 10), (TINY_TEACHER, 5)))


def ensemble_overlay(tmp_path):
    """A config overlay giving model.teacher as a list: two teachers of different architectures."""
    files = [random_teacher_file(tmp_path, name, 10) for name in (TINY_TEACHER, "resnet10t")]
    overlay = tmp_path / "ensemble.yaml"
    overlay.write_text("model:\n  teacher:\n" + "".join(
        f"    - class_path: teachers.Teacher\n      init_args: {{model_name: {name}, weights: {path}, precision: '32'}}\n"
        for name, path in zip((TINY_TEACHER, "resnet10t"), files)))
    return overlay


def test_a_list_of_teachers_trains_as_their_ensemble_is_cached_like_one_teacher_and_logs_each_member(tmp_path):
    overlay = ["--config", str(ensemble_overlay(tmp_path))]
    base = shrink(tmp_path, "distill.yaml")
    cli_main(["cache-teacher", *base[:2], *overlay, *base[2:], "--model.distillation=hard", "--epochs=1", "--top_k=3",
              f"--out={tmp_path / 'cache'}"])
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert [m["model_name"] for m in meta["teacher"]["members"]] == [TINY_TEACHER, "resnet10t"]
    # from the cache, with the live ensemble checking it on every batch (and so validated beside the student)
    cli_main(["fit", *base[:2], *overlay, *base[2:], "--model.distillation=hard", f"--data.teacher_cache={tmp_path / 'cache'}",
              "--model.teacher_cache_verify=1.0", "--model.feature_weight=0", f"--metrics_json={tmp_path / 'result.json'}"])
    logged = scalars(tmp_path / "runs")
    assert logged["train/cache_view_match_step"] == [1.0] * 3 and logged["train/cache_agreement_step"] == [1.0] * 3
    metrics = json.loads((tmp_path / "result.json").read_text())["final_metrics"]
    assert {"val/teacher_acc", "val/teacher_acc_0", "val/teacher_acc_1"} <= set(metrics)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [m["model_name"] for m in checkpoint["teacher_config"]["members"]] == [TINY_TEACHER, "resnet10t"]


def test_the_comparison_shows_each_head_alone_and_each_teacher_of_an_ensemble():
    def result(acc, cls, dist):
        return {"final_metrics": {"val/acc": acc, "val/acc_cls": cls, "val/acc_dist": dist},
                "metrics": {"val/acc": acc, "val/teacher_acc": 0.95, "val/teacher_acc_0": 0.93, "val/teacher_acc_1": 0.92},
                "wall_time_s": 1.0}
    runs = [{"type": "soft", "seed": s, "result": result(0.96, 0.94 + s / 100, 0.95)} for s in (0, 1)]
    summary = summarize_runs(runs, ["soft"])
    row = summary["types"]["soft"]
    assert math.isclose(row["final_cls"]["mean"], 0.945) and math.isclose(row["final_dist"]["mean"], 0.95)
    assert summary["teacher_members"] == [0.93, 0.92]
    table = format_table(summary)
    assert "class head" in table and "dist. head" in table and "94.50 +- 0.71" in table
    assert "teacher (ensemble of 2)" in table and "teacher 0" in table and "93.00" in table and "92.00" in table


def test_a_pipeline_stage_of_an_ensemble_cannot_take_its_teacher_from_a_stage(tmp_path):
    from distill.commands.pipeline import stage_identity
    from tests.helpers import ROOT
    config = tmp_path / "ensemble_stage.yaml"  # the recipe with a list of two teachers
    recipe = yaml.safe_load((ROOT / "configs" / "distill.yaml").read_text())
    recipe["model"]["teacher"] = [{"class_path": "teachers.Teacher",
                                   "init_args": {"model_name": TINY_TEACHER, "weights": f"m{i}.ckpt"}} for i in range(2)]
    config.write_text(yaml.safe_dump(recipe))
    stage = {"name": "distill", "config": str(config), "teacher_from": "teacher"}
    with pytest.raises(UserError, match="stage 'distill' takes teacher_from 'teacher'.*list of teachers.*last member"):
        stage_identity(stage, tmp_path / "runs", [])
    assert stage_identity({"name": "distill", "config": str(config)}, tmp_path / "runs", [])  # without it: fine


def test_compare_refuses_an_option_that_would_change_one_member_of_an_ensemble(tmp_path, capsys):
    from tests.helpers import ROOT, run_cli_error
    line = run_cli_error(["compare", "--config", str(ROOT / "configs" / "distill.yaml"), "--config",
                          str(ROOT / "configs" / "teachers" / "ensemble.yaml"), "--out", str(tmp_path / "c"),
                          "--model.teacher.init_args.weights=other.ckpt"], capsys)
    assert "--model.teacher.init_args.weights would change the last teacher of the ensemble of 3 in" in line
    assert not (tmp_path / "c").exists()


def test_fit_refuses_an_option_that_would_change_one_member_of_an_ensemble(tmp_path, capsys):
    from tests.helpers import run_cli_error
    base = shrink(tmp_path, "distill.yaml")
    line = run_cli_error(["fit", *base[:2], "--config", str(ensemble_overlay(tmp_path)), *base[2:],
                          "--model.teacher.init_args.weights=other.ckpt"], capsys)
    assert "--model.teacher.init_args.weights would change the last teacher of the ensemble of 2 in" in line
    assert not (tmp_path / "ckpt").exists()
    # the ensemble given as --config=FILE after the recipe is found as well; a whole --model.teacher is taken
    line = run_cli_error(["fit", f"--config={base[1]}", f"--config={ensemble_overlay(tmp_path)}", *base[2:],
                          "--model.teacher.init_args.weights=other.ckpt"], capsys)
    assert "would change the last teacher of the ensemble of 2 in" in line


def test_a_teacher_named_by_a_deit_alias_or_with_a_hub_tag_is_the_architecture_its_run_trained(tmp_path):
    assert Teacher("deit_tiny", weights="none", num_classes=10).model.default_cfg["architecture"] == \
        "deit_tiny_distilled_patch16_224"
    vit = Student(10, 32, **dict(TINY_STUDENT, model_name="deit_tiny_distilled_patch16_224.fb_in1k"))
    teacher = Teacher("deit_tiny", weights=str(run_checkpoint(tmp_path, vit)))  # tag on one side, alias on the other
    assert teacher.img_size == 32 and teacher.mean == (0.5, 0.5, 0.5)


def test_the_students_initialisation_does_not_depend_on_how_its_teacher_was_loaded(tmp_path):
    from distill.training.cli import make_cli
    from tests.helpers import ROOT, config_overrides

    first = []
    for name in (TINY_TEACHER, "resnet10t"):  # other architectures, other files: other random draws while loading
        (tmp_path / name).mkdir()
        base = config_overrides(ROOT / "configs" / "distill.yaml", tmp_path / name)
        cli = make_cli([*base[:-1], f"--model.teacher.init_args.model_name={name}",
                        f"--model.teacher.init_args.weights={random_teacher_file(tmp_path, name, 10)}"], run=False)
        first.append(next(cli.model.student.parameters()).detach().clone())
    assert torch.equal(first[0], first[1])


def test_a_vit_teacher_under_the_recipes_imitation_is_refused_naming_the_way_out_and_caches_as_any_teacher(
        tmp_path, capsys):
    vit = Student(10, 32, **dict(TINY_STUDENT, model_name="deit_tiny", patch_size=8))  # every block at reduction 8
    base = [*shrink(tmp_path, "distill.yaml"), "--model.teacher.init_args.model_name=deit_tiny",
            f"--model.teacher.init_args.weights={run_checkpoint(tmp_path, vit)}", "--model.teacher.init_args.precision=32"]
    line = run_cli_error(["fit", *base], capsys)  # configs/distill.yaml imitates the teacher's stages by default
    assert line.startswith("error: model.feature_pairs: the teacher has no feature levels of reduction 4, 8")
    assert "give the pairs" in line and line.rstrip().endswith("model.feature_weight: 0  (DISTILL_DEBUG=1 shows the "
                                                               "traceback)")
    # a cache stores outputs, never features: it builds from the same options, and a run trains from it without
    cli_main(["cache-teacher", *base, "--epochs=1", "--top_k=2", f"--out={tmp_path / 'cache'}"])
    cli_main(["fit", *base, f"--data.teacher_cache={tmp_path / 'cache'}", "--model.teacher=null",
              "--model.feature_weight=0", f"--metrics_json={tmp_path / 'result.json'}"])
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 1
