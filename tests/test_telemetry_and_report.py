"""TensorBoard telemetry read back from the event files, and `distill report`."""
import io
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.cli import cli_main
from distill.training.cli import make_cli
from distill.training.telemetry import _confusion_figure, attention_maps
from tests.helpers import TINY_TEACHER, random_teacher_file, shrink, tiny_student

SCALARS = ["train/loss", "train/loss_base", "train/loss_distill", "train/lr", "train/img_per_s", "train/epoch_time_s",
           "val/acc", "val/acc_cls", "val/acc_dist", "val/acc_top5", "val/acc_cls_top5", "val/acc_dist_top5",
           "val/teacher_acc", "val/teacher_agreement", "val/teacher_kl", "val/head_cosine", "val/token_cosine",
           "val_ema/acc", "val_ema/acc_cls", "val_ema/acc_dist", "hp/best_acc", "hp/final_acc"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, object, EventAccumulator]:
    tmp = tmp_path_factory.mktemp("telemetry")
    random_teacher_file(tmp, name="teacher.safetensors")
    args = [*shrink(tmp, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={tmp / 'teacher.safetensors'}", "--trainer.max_epochs=2",
            "--model.ema_decay=0.9", "--telemetry.attention_every_n_epochs=1", "--telemetry.attention_images=4"]
    cli = make_cli(["fit", *args])
    events = EventAccumulator(str(next((tmp / "runs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return tmp, cli, events


def test_every_scalar_a_distillation_user_watches_is_logged_with_finite_values(run):
    _, cli, events = run
    tags = events.Tags()["scalars"]
    for tag in SCALARS:
        assert tag in tags, tag
        assert all(math.isfinite(e.value) for e in events.Scalars(tag)), tag
    assert -1 <= events.Scalars("val/token_cosine")[-1].value <= 1 and events.Scalars("val/teacher_kl")[-1].value >= 0
    assert "train/img_per_s" in cli.trainer.progress_bar_metrics and "train/loss_distill" in cli.trainer.progress_bar_metrics
    best = cli.trainer.checkpoint_callback.best_model_score.item()
    assert events.Scalars("hp/best_acc")[-1].value == pytest.approx(best)
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HPARAMS tab


def image(events: EventAccumulator, tag: str, index: int = -1) -> Image.Image:
    return Image.open(io.BytesIO(events.Images(tag)[index].encoded_image_string))


def test_pictures_are_logged_at_the_expected_sizes(run):
    _, _, events = run
    assert len(events.Images("train/augmented_views")) == 1  # once
    assert image(events, "train/augmented_views").size == (8 * 98 + 2, 2 * 98 + 2)  # 16 images 32 -> 96 px, 8 a row
    assert len(events.Images("val/confusion_matrix")) == 2  # every validation epoch (no sanity check)
    width, height = _confusion_figure(torch.eye(10), [str(d) for d in range(10)]).get_size_inches() * 100  # 100 dpi
    assert image(events, "val/confusion_matrix").size == (round(width), round(height))
    for token in ("cls", "dist"):
        assert len(events.Images(f"val/attention_{token}")) == 2
        assert image(events, f"val/attention_{token}").size == (4 * 98 + 2, 98 + 2)


def test_the_confusion_matrix_shows_long_class_names_whole_with_axis_titles(tmp_path):
    names = ["diamond", "a_rather_long_name_x", "sunflower_field_tall", "x", "tulip", "emerald_green_stone", "cat",
             "truck_with_trailers", "airplane", "ship_at_sea_at_dusk", "frog", "horse"]  # up to 20 characters
    figure = _confusion_figure(torch.eye(12) * 0.7 + 0.025, names)
    figure.savefig(tmp_path / "confusion.png")  # draws it, with the layout it is logged with
    renderer, page = figure.canvas.get_renderer(), figure.bbox
    axes = figure.axes[0]
    shown = [label for label in [*axes.get_xticklabels(), *axes.get_yticklabels()] if label.get_text()]
    assert sorted(label.get_text() for label in shown) == sorted(names * 2)  # every name, whole, on both axes
    for text in [*shown, axes.xaxis.label, axes.yaxis.label]:
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted", "true")


def test_attention_maps_are_distributions_over_the_patch_grid():
    student = tiny_student().train()
    attention = student.model.blocks[-1].attn
    fused = attention.fused_attn
    maps = attention_maps(student, torch.randn(3, 3, 32, 32))
    assert maps.shape == (3, 2, 4, 4) and (maps >= 0).all()
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(3, 2))
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # two tokens, two maps
    assert student.training and attention.fused_attn == fused  # mode and fused attention restored


def test_report_prints_the_best_accuracy_the_checkpoint_callback_recorded(run, capsys):
    tmp, cli, _ = run
    cli_main(["report", str(tmp / "runs")])
    out = capsys.readouterr().out
    best = cli.trainer.checkpoint_callback.best_model_score.item()
    row = next(line for line in out.splitlines() if line.startswith("distill/version_0"))
    assert row.split()[1] == f"{100 * best:.2f}"


def test_report_on_a_pipeline_folder_has_a_row_per_stage_and_plots(run, tmp_path, capsys):
    tmp, _, _ = run
    run_dir = next((tmp / "runs").rglob("events.out.tfevents.*")).parent
    for stage in ("teacher", "distill"):
        shutil.copytree(run_dir, tmp_path / "pipe" / stage / "version_0")
    cli_main(["report", str(tmp_path / "pipe"), "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["distill/version_0", "teacher/version_0"]
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["distill_version_0.png", "teacher_version_0.png"]
    assert Image.open(tmp_path / "plots" / plots[0]).size == (1100, 400)


def test_report_on_a_folder_without_event_files_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no TensorBoard event files" in err[0]


def test_report_names_a_run_whose_event_file_was_cut_short(run, tmp_path, capsys):
    tmp, _, _ = run
    events = next((tmp / "runs").rglob("events.out.tfevents.*"))
    (tmp_path / "cut" / "version_0").mkdir(parents=True)
    (tmp_path / "cut" / "version_0" / events.name).write_bytes(events.read_bytes()[:100])  # a copy that stopped early
    cli_main(["report", str(tmp_path / "cut")])
    assert "no validation figures in: version_0" in capsys.readouterr().out
