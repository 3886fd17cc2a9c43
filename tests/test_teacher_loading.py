"""Teachers: frozen, loaded safely from every accepted source, clear errors otherwise."""
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from distill.common.errors import UserError
from teachers import Teacher
from tests.helpers import TINY_TEACHER, distill_args, run_cli_error


def test_teacher_stays_in_eval_mode_without_gradients_through_train_calls(teacher_file):
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file))
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher(torch.randn(2, 3, 32, 32)).requires_grad


def test_teacher_reads_its_class_count_and_weights_from_a_safetensors_file(teacher_file):
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="32", channels_last=False)
    reference = timm.create_model(TINY_TEACHER, num_classes=10)
    from safetensors.torch import load_file
    reference.load_state_dict(load_file(str(teacher_file)))
    reference.eval()
    images = torch.randn(2, 3, 32, 32)
    assert teacher.num_classes == 10
    assert torch.equal(teacher(images), reference(images))


def test_teacher_loads_a_plain_a_nested_and_a_wrapped_pytorch_state_dict(tmp_path, teacher_file):
    from safetensors.torch import load_file
    state = load_file(str(teacher_file))
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "compiled.pth")
    for name in ("plain.pth", "nested.pth", "compiled.pth"):
        teacher = Teacher(TINY_TEACHER, weights=str(tmp_path / name))
        assert torch.equal(teacher.model.fc.weight, state["fc.weight"])


def test_teacher_loads_this_projects_checkpoint_with_its_normalisation(tmp_path, teacher_file):
    from safetensors.torch import load_file
    state = {f"student.model.{k}": v for k, v in load_file(str(teacher_file)).items()}
    ckpt = {"state_dict": state, "hyper_parameters": {"input_mean": (0.5, 0.5, 0.5), "input_std": (0.25, 0.25, 0.25)}}
    torch.save(ckpt, tmp_path / "teacher.ckpt")
    teacher = Teacher(TINY_TEACHER, weights=str(tmp_path / "teacher.ckpt"))
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25)


def test_teacher_renormalises_when_the_student_data_uses_another_normalisation(teacher_file):
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                      precision="32", channels_last=False)
    raw = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    student_mean, student_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    as_student = (raw - torch.tensor(student_mean).view(1, 3, 1, 1)) / torch.tensor(student_std).view(1, 3, 1, 1)
    teacher.set_input_normalization(student_mean, student_std)
    expected = teacher.model((raw - 0.5) / 0.5)
    assert torch.allclose(teacher(as_student), expected, atol=1e-5)


def test_a_crafted_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": Exploit()}, f)
    with pytest.raises(UserError, match="evil.pth' is not a weights file"):
        Teacher(TINY_TEACHER, weights=str(path))
    assert not marker.exists()


def test_a_file_that_is_not_weights_names_the_file_and_what_is_accepted(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    with pytest.raises(UserError, match=r"notes.txt' is not a weights file .*expected a \.safetensors file"):
        Teacher(TINY_TEACHER, weights=str(path))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="broken.safetensors' is not a weights file"):
        Teacher(TINY_TEACHER, weights=str(broken))


def test_a_missing_weights_file_is_named_with_the_folder_a_relative_path_was_read_from(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="missing.pth' does not exist; expected"):
        Teacher(TINY_TEACHER, weights=str(tmp_path / "missing.pth"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"'runs/missing.pth' does not exist \\(from {tmp_path}\\); expected"):
        Teacher(TINY_TEACHER, weights="runs/missing.pth")


def test_weights_of_another_architecture_name_the_first_mismatched_keys(tmp_path):
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(tmp_path / "r10.safetensors"))
    with pytest.raises(UserError, match=r"does not fit 'test_resnet': \d+ (missing|unexpected|of another shape) \(e\.g\. '"):
        Teacher(TINY_TEACHER, weights=str(tmp_path / "r10.safetensors"))


def test_declared_class_count_that_disagrees_with_the_weights_is_an_error(teacher_file):
    with pytest.raises(UserError, match="num_classes is 5 but .* predicts 10 classes"):
        Teacher(TINY_TEACHER, weights=str(teacher_file), num_classes=5)


def test_unknown_teacher_name_suggests_close_names():
    with pytest.raises(UserError, match="teacher.model_name: unknown timm model 'resnet_18'.*resnet18"):
        Teacher("resnet_18", weights="none")


def test_hub_weights_that_cannot_be_fetched_point_to_local_files(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("teachers.teacher.timm.create_model", offline)
    with pytest.raises(UserError, match="could not fetch pretrained weights for 'regnety_160.deit_in1k'.*teacher.weights"):
        Teacher("regnety_160.deit_in1k", weights="pretrained")


def test_teacher_loads_a_timm_local_dir_folder(tmp_path):
    from timm.models import save_for_hf
    model = timm.create_model(TINY_TEACHER, num_classes=4)
    save_for_hf(model, tmp_path / "folder", safe_serialization=True)
    teacher = Teacher(TINY_TEACHER, weights=str(tmp_path / "folder"))
    assert teacher.num_classes == 4
    assert torch.equal(teacher.model.fc.weight, model.fc.weight)
    with pytest.raises(UserError, match="holds a 'test_resnet', not the teacher.model_name 'resnet18'"):
        Teacher("resnet18", weights=str(tmp_path / "folder"))


def test_the_fast_path_runs_bf16_weights_and_records_its_agreement_with_fp32(teacher_file):
    reference = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="32", channels_last=False)
    fast = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="bf16")
    images = torch.randn(64, 3, 32, 32)
    expected, logits = reference(images), fast(images)
    assert logits.dtype == torch.float32 and not logits.requires_grad and not logits.is_inference()
    assert next(fast.model.parameters()).dtype == torch.bfloat16 and not fast.training
    assert fast.fast_agreement is not None and fast.fast_agreement >= 0.99
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    assert torch.allclose(logits, expected, atol=0.1, rtol=0.05)


def test_the_fast_path_falls_back_to_fp32_when_it_would_change_the_teachers_labels(teacher_file):
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="bf16", channels_last=False)
    with torch.no_grad():  # logits 1.0000, 1.0001, ...: distinct in fp32, all equal in bf16
        teacher.model.fc.weight.zero_()
        teacher.model.fc.bias.copy_(1 + 1e-4 * torch.arange(10))
    exact = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with pytest.warns(UserWarning, match="stays in fp32"):
        logits = teacher(torch.randn(8, 3, 32, 32))
    assert teacher.fast_agreement == 0.0 and teacher.fast_dtype is None
    assert (logits.argmax(-1) == 9).all()
    assert all(torch.equal(v, exact[k]) for k, v in teacher.model.state_dict().items())  # fp32 weights restored


@pytest.mark.parametrize("precision, expected", [("32", None), ("bf16", torch.bfloat16), ("16", torch.float16)])
def test_teacher_precision_choices(precision, expected):
    from teachers.teacher import _fast_dtype
    assert _fast_dtype(precision, torch.device("cpu")) == expected
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert _fast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)


def test_a_compiled_teacher_gives_the_eager_teachers_labels(teacher_file):
    eager = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="bf16")
    compiled = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="bf16", compile=True)
    images = torch.randn(16, 3, 32, 32)
    logits = compiled(images)
    assert isinstance(compiled._run, torch._dynamo.eval_frame.OptimizedModule)
    assert torch.equal(logits.argmax(-1), eager(images).argmax(-1))
    assert torch.allclose(logits, eager(images), atol=0.05)


def test_the_fallback_threshold_is_an_option(teacher_file):
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="bf16", fast_min_agreement=0.0)
    with torch.no_grad():  # as above: bf16 cannot tell the logits apart, but the user accepts any agreement
        teacher.model.fc.weight.zero_()
        teacher.model.fc.bias.copy_(1 + 1e-4 * torch.arange(10))
    teacher(torch.randn(8, 3, 32, 32))
    assert teacher.fast_agreement == 0.0 and teacher.fast_dtype == torch.bfloat16
    with pytest.raises(UserError, match="teacher.fast_min_agreement must lie in"):
        Teacher(TINY_TEACHER, weights=str(teacher_file), fast_min_agreement=1.5)


def broken_teacher(tmp_path: Path, how: str) -> Path:
    """A test_resnet weights file whose weights (nan) or whose outputs (a negative BatchNorm variance) are not finite."""
    import timm
    state = timm.create_model(TINY_TEACHER, num_classes=10).state_dict()
    if how == "weights":
        state["fc.weight"][0, 0] = float("nan")
    else:
        state["bn1.running_var"].fill_(-1.0)  # sqrt(-1): every output NaN, every weight finite
    path = tmp_path / f"teacher_{how}.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("how", ["weights", "outputs"])
def test_a_teacher_that_is_not_finite_stops_the_run_naming_the_teacher(tmp_path, capsys, how):
    args = [*distill_args(tmp_path), f"--model.teacher.init_args.weights={broken_teacher(tmp_path, how)}"]
    line = run_cli_error(args, capsys)
    assert f"teacher '{TINY_TEACHER}'" in line and ("outputs on the first batch are not finite" if how == "outputs"
                                                    else "weights") in line
    assert ("non-finite" if how == "weights" else "not finite") in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_an_export_folder_without_weights_given_as_the_teacher_is_named(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    line = run_cli_error([*distill_args(tmp_path), f"--model.teacher.init_args.weights={folder}"], capsys)
    assert f"teacher.weights: folder '{folder}' is not a timm model folder" in line and "config.json" in line


def test_a_state_that_does_not_fit_is_named_by_counts_and_first_keys():
    from distill.common.checkpoints import state_mismatch
    model = {"stem.weight": (8, 3), "head.weight": (26, 8), "head.bias": (26,)}
    assert state_mismatch(model, dict(model)) is None
    found = {"stem.weight": (8, 3), "head.weight": (10, 8), "fc.bias": (10,)}
    assert state_mismatch(model, found) == ("1 missing (e.g. 'head.bias'), 1 unexpected (e.g. 'fc.bias'), 1 of another "
                                            "shape (e.g. 'head.weight': [10, 8] in the file, [26, 8] in the model)")
    assert state_mismatch(model, found, shapes=False) == "1 missing (e.g. 'head.bias'), 1 unexpected (e.g. 'fc.bias')"
