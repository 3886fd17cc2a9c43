"""Student sizes timm would refuse with a bare assert (or a traceback) are one line when the student is built.

Each refusal is a `distill fit` with exit code 2 and one `error:` line naming the options and what is accepted:
- the recipe's hybrid student (configs/distill.yaml: a ResNet stem, then patches) at MNIST's 28 px, at 18 px,
  and patch 3 at 16 px: the stem's reduction (4, read from the model) x patch_size, and the nearest sizes;
- the same size for the DeiT token student (configs/students/deit.yaml) and the Swin student
  (configs/distill_swin.yaml: every stage's grid against its window);
- a hi-res stage (model.init_from a 32 px checkpoint) at a size its student refuses;
- a width its heads do not divide (the recipe's own width, or the architecture's), one num_heads for Swin's
  stages, a list of heads for a ViT, a window list of the wrong length;
- a bare timm assert none of these explains: still one line, quoting it (any other error stays a bug's traceback).
Sizes that fit (32 and 48 px) still build, run and take a 32 px stage's weights.
"""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from timm.layers import HybridEmbed
from torch import nn

from distill.common.errors import UserError
from students import Student
from students.checks import explain_build_error
from students.resize import adapt_student_state
from tests.helpers import ROOT, TINY_TEACHER, nothing_written, random_teacher_file, run_cli_error

RECIPE_STUDENT = yaml.safe_load((ROOT / "configs" / "distill.yaml").read_text())["model"]["student"]["init_args"]
OPTION = "--model.student.init_args."


def fit_args(tmp_path: Path, *configs: str) -> list[str]:
    """`distill fit` of real configs with a tiny random teacher; one batch if a refusal ever failed to come."""
    return ["fit", *[arg for name in configs for arg in ("--config", str(ROOT / "configs" / name))],
            "--data.num_workers=0", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={random_teacher_file(tmp_path)}"]


def student_options(options: dict) -> list[str]:
    """`--model.student.init_args.KEY=VALUE` arguments, lists and null as JSON."""
    return [f"{OPTION}{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()]


def refusal(args: list[str], capsys) -> str:
    """The one `error:` line of an exit-2 run, without the DISTILL_DEBUG pointer a translated timm error carries."""
    return run_cli_error(args, capsys).removesuffix("  (DISTILL_DEBUG=1 shows the traceback)")


@pytest.mark.parametrize("img_size, patch_size, feature_map, accepted", [
    (28, 2, "7x7", "= 4 x 2 = 8: 24, 32, 40, ..."),
    (18, 2, "5x5", "= 4 x 2 = 8: 16, 24, 32, ..."),
    (16, 3, "4x4", "= 4 x 3 = 12: 12, 24, 36, ..."),
])
def test_a_size_the_recipes_stem_and_patch_do_not_divide_names_the_options_and_the_sizes_that_work(
        tmp_path, capsys, img_size, patch_size, feature_map, accepted):
    line = refusal([*fit_args(tmp_path, "distill.yaml"), f"--data.img_size={img_size}",
                          f"{OPTION}patch_size={patch_size}"], capsys)
    assert line.startswith("error: student 'deit_tiny_r_s16_p8_distilled_224': ")
    assert f"(data.img_size {img_size}, model.student.init_args.patch_size {patch_size})" in line
    assert f"the convolutional stem gives a {feature_map} feature map" in line
    assert line.endswith(f"img_size must be a multiple of stem reduction x patch_size {accepted}")
    assert nothing_written(tmp_path)  # refused when the student is built, before training


def test_the_deit_token_student_refuses_a_size_its_patch_does_not_divide_in_the_same_words(tmp_path, capsys):
    line = refusal([*fit_args(tmp_path, "distill.yaml", "students/deit.yaml"), "--data.img_size=28"], capsys)
    assert line == ("error: student 'deit_tiny': image size 28 is not divisible by patch size 8 (data.img_size 28, "
                    "model.student.init_args.patch_size 8); img_size must be a multiple of 8: 24, 32, 40, ...")


def test_the_swin_student_refuses_a_size_whose_stage_grid_its_window_does_not_divide(tmp_path, capsys):
    line = refusal([*fit_args(tmp_path, "distill_swin.yaml"), "--data.img_size=28"], capsys)
    assert "at image size 28 stage 0 has a 7x7 patch grid, not a multiple of its window 4" in line
    assert "use an image size that is a multiple of 32 (data.img_size): 32, 64, 96, ..." in line
    assert line.endswith("or another model.student.init_args.window_size")


def test_a_hires_stage_from_a_32_px_checkpoint_at_a_size_its_student_refuses_is_the_same_line(tmp_path, capsys):
    stage = Student(10, 32, **RECIPE_STUDENT)
    checkpoint = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in stage.state_dict().items()},
                "student_config": stage.config}, checkpoint)
    line = refusal([*fit_args(tmp_path, "distill.yaml"), f"--model.init_from={checkpoint}",
                          "--data.img_size=28"], capsys)
    assert "(data.img_size 28, model.student.init_args.patch_size 2)" in line
    assert line.endswith("img_size must be a multiple of stem reduction x patch_size = 4 x 2 = 8: 24, 32, 40, ...")


@pytest.mark.parametrize("options, expected", [
    ({"num_heads": 5}, "model.student.init_args.embed_dim 128 is not divisible by model.student.init_args.num_heads 5; "
                       "embed_dim must be a multiple of num_heads = 5: 125, 130, 135, ..."),
    ({"embed_dim": None, "num_heads": 5, "model_name": "deit_tiny"},
     "the architecture's embed_dim 192 (model.student.init_args.embed_dim) is not divisible by "
     "model.student.init_args.num_heads 5; num_heads must divide 192: 4 or 6"),
    ({"num_heads": [2, 4]}, "model.student.init_args.num_heads [2, 4] is one number per stage, but the student is "
                            "one stack of blocks and takes one number, e.g. 3"),
])
def test_heads_the_width_does_not_split_into_are_refused_with_the_values_that_work(tmp_path, capsys, options, expected):
    line = refusal([*fit_args(tmp_path, "distill.yaml"), *student_options(options)], capsys)
    assert line.endswith(expected)


@pytest.mark.parametrize("options, expected", [
    ({"num_heads": 2}, "model.student.init_args.num_heads 2 is one number, but the student has 2 stages and takes "
                       "one per stage, e.g. [2, 4]"),
    ({"window_size": [4, 4, 4]}, "model.student.init_args.window_size [4, 4, 4] has 3 entries for the 2 stages of "
                                 "model.student.init_args.depths [2, 6]; give one per stage"),
])
def test_swin_options_that_do_not_give_one_value_per_stage_are_refused(tmp_path, capsys, options, expected):
    line = refusal([*fit_args(tmp_path, "distill_swin.yaml"), *student_options(options)], capsys)
    assert line == f"error: student 'swin_tiny_patch4_window7_224': {expected}"


def test_a_bare_assert_no_check_explains_is_still_one_line_quoting_it_and_any_other_error_stays_a_bug():
    def build(**kwargs) -> nn.Module:  # timm's bare grid assert, whatever the probes relax
        return HybridEmbed(nn.Conv2d(3, 8, 1), img_size=6, patch_size=4)

    with pytest.raises(AssertionError) as assertion:
        build()
    explained = explain_build_error(assertion.value, "vit_x", 6, {"patch_size": 4}, build)
    assert isinstance(explained, UserError)
    line = str(explained)
    assert line.startswith("student 'vit_x': timm refuses model.student.init_args.patch_size 4 at data.img_size 6: "
                           "assert self.feature_size[0] % self.patch_size[0] == 0")
    assert re.search(r"\(hybrid_embed\.py:\d+\)$", line) and "\n" not in line
    bug = TypeError("'NoneType' object is not callable")
    assert explain_build_error(bug, "vit_x", 6, {"patch_size": 4}, build) is bug


@pytest.mark.parametrize("img_size, tokens", [(32, 4 * 4), (48, 6 * 6)])
def test_sizes_the_recipes_student_accepts_still_build_run_and_take_a_32_px_stages_weights(img_size, tokens):
    stage = Student(10, 32, **RECIPE_STUDENT)
    student = Student(10, img_size, **RECIPE_STUDENT)
    assert student.model.patch_embed.num_patches == tokens  # 4x stem, patch 2
    student.load_state_dict(adapt_student_state(stage.state_dict(), student))
    assert student.eval()(torch.zeros(2, 3, img_size, img_size)).shape == (2, 10)
