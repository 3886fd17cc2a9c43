"""The DeiT recipe pieces: LR scaling, repeated augmentation, AugReg presets, EMA, precision, DDP safety."""
import json
import logging
from pathlib import Path

import pytest
import torch

from distill.common.errors import UserError
from distill.training.datamodule import AUGREG_PRESETS, EpochSampler, ImageDataModule
from distill.training.cli import make_cli
from distill.training.module import DistillationModule, scaled_lr
from students import Student
from teachers import Teacher
from tests.helpers import (
    IMAGENET_RUNS,
    TINY_STUDENT,
    TINY_SWIN,
    TINY_TEACHER,
    imagenet_configs,
    make_image_folder,
    merged_config,
    random_teacher_file,
    scalars,
    shrink,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("devices, nodes, batch, accumulate, expected", [
    (16, 1, 64, 1, 1e-3),     # the paper: 1024 global -> 5e-4 x 2
    (8, 1, 128, 1, 1e-3),
    (1, 1, 64, 2, 1.25e-4),   # 128 global
    (4, 2, 32, 4, 1e-3),      # two nodes, accumulation: 4 x 2 x 32 x 4 = 1024
])
def test_scaled_lr_is_lr_times_global_batch_over_512(devices, nodes, batch, accumulate, expected):
    assert scaled_lr(5e-4, batch, devices, nodes, accumulate, 512) == pytest.approx(expected)


def test_fit_scales_lr_min_lr_and_warmup_lr_by_the_global_batch_and_logs_it(tmp_path, teacher_file, caplog):
    caplog.set_level(logging.INFO)
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}", "--model.lr_scale_batch=512", "--model.lr=5e-4",
            "--model.min_lr=1e-5", "--model.warmup_lr=1e-6", "--trainer.accumulate_grad_batches=2"]
    cli = make_cli(["fit", *args])
    scale = 16 * 2 / 512  # batch 16, accumulation 2, one device
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_values == [pytest.approx(5e-4 * scale)] * len(scheduler.base_values)
    assert scheduler.lr_min == pytest.approx(1e-5 * scale) and scheduler.warmup_lr_init == pytest.approx(1e-6 * scale)
    assert "lr scaled by the global batch: 0.0005 x 32 / 512" in caplog.text
    logged = scalars(tmp_path / "runs")
    assert logged["train/lr_scaled_peak"] == [pytest.approx(5e-4 * scale)] and logged["train/global_batch"] == [32]


def test_repeated_augmentation_spreads_each_images_copies_over_consecutive_ranks():
    data = ImageDataModule("digits", img_size=32, mixup=0, cutmix=0)
    data.setup("fit")
    shares = [list(EpochSampler(data.train_set, num_replicas=3, rank=r, seed=0, num_repeats=3)) for r in range(3)]
    assert [len(share) for share in shares] == [1437 // 3] * 3  # an epoch stays one dataset long
    keys = [set(share) for share in shares]
    assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])  # no (index, repeat) twice
    ranks_of = {}
    for rank, share in enumerate(shares):
        for _, index, repeat in share:
            ranks_of.setdefault(index, set()).add(rank)
    full = [ranks for ranks in ranks_of.values() if len(ranks) == 3]
    assert len(full) > 400  # the copies of an image are on different ranks (each sees its own view)
    epoch, index, _ = shares[0][0]
    views = [data.train_set[(epoch, index, repeat)]["image"] for repeat in range(3)]
    assert not torch.equal(views[0], views[1])  # three augmentations of one image
    assert torch.equal(data.train_set[(epoch, index, 1)]["image"], views[1])


@pytest.mark.parametrize("preset", sorted(AUGREG_PRESETS))
def test_augreg_presets_set_randaugment_and_mixup(preset):
    data = ImageDataModule("digits", img_size=32, augreg=preset)
    randaugment, alpha = AUGREG_PRESETS[preset]
    text = repr(data.train_transform())
    if randaugment:
        assert f"RandAugment(n={randaugment[0]}" in text and f"m={randaugment[1]}," in text
    else:
        assert "RandAugment" not in text
    assert "RandomErasing" not in text
    assert (data.mixup_fn.mixup_alpha, data.mixup_fn.cutmix_alpha) == (alpha, 0.0) if alpha else data.mixup_fn is None


def test_ema_is_validated_beside_the_raw_weights_and_exported_on_request(tmp_path, teacher_file):
    from distill.commands.export import export_student, load_student
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}", "--model.ema_decay=0.5"]
    cli = make_cli(["fit", *args])
    metrics = cli.trainer.callback_metrics
    for name in ("acc", "acc_cls", "acc_dist", "acc_top5"):
        assert f"val_ema/{name}" in metrics and f"val/{name}" in metrics
    assert all(not p.requires_grad for p in cli.model.ema.parameters())
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in cli.model.ema.parameters()}

    last = tmp_path / "ckpt" / "last.ckpt"
    raw, _ = load_student(last)
    ema, _ = load_student(last, ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), cli.model.ema.module.state_dict().values()))
    report = export_student(last, tmp_path / "export", onnx=False, torchscript=False, ema=True)
    assert report["weights"] == "ema" and json.loads((tmp_path / "export" / "export_report.json").read_text())["weights"] == "ema"


def test_export_ema_of_a_run_without_ema_is_a_clear_error(tmp_path, teacher_file):
    from distill.commands.export import export_student
    make_cli(["fit", *shrink(tmp_path, "teacher.yaml")])
    with pytest.raises(UserError, match="holds no EMA weights"):
        export_student(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export", ema=True)
    assert not (tmp_path / "export").exists()


def test_bf16_mixed_precision_runs_the_teacher_in_bf16_too(tmp_path, teacher_file):
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}", "--trainer.precision=bf16-mixed",
            "--trainer.limit_train_batches=2"]
    cli = make_cli(args, run=False)
    dtypes = []
    cli.model.teacher.model.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(scalars(tmp_path / "runs")["train/loss"])).all()


STUDENTS = {"deit": dict(TINY_STUDENT), "swin": dict(TINY_SWIN), "resnet": dict(model_name="test_resnet"),
            "resnet+head": dict(model_name="test_resnet", distill_head=True)}


@pytest.mark.parametrize("distillation", ["none", "soft", "hard"])
@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_every_trainable_parameter_gets_a_gradient_so_ddp_finds_no_unused_ones(student, distillation):
    teacher = None if distillation == "none" else Teacher(TINY_TEACHER, weights="none", num_classes=10)
    module = DistillationModule(lambda c, s: Student(c, s, **STUDENTS[student]), teacher, num_classes=10, img_size=32,
                                distillation=distillation, ema_decay=0.9)
    module.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cls_logits, dist_logits = module.student.forward_heads(images)
    module.loss(cls_logits, dist_logits, labels, teacher(images) if teacher else None)["loss"].backward()
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # what DDP (find_unused_parameters=False) would fail on


def shrunk_imagenet(run: str, tmp_path: Path, img_size: int = 32) -> list[str]:
    """An ImageNet run made CPU-sized: generated 3-class data, a tiny student of the same family and teacher."""
    student = merged_config(run)["model"]["student"]["init_args"]["model_name"]
    tiny = TINY_SWIN if student.startswith("swin") else TINY_STUDENT
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        random_teacher_file(tmp_path, num_classes=3, name=teacher.name)
    images = tmp_path / "images"
    if not images.exists():
        make_image_folder(images)
    return [*imagenet_configs(run), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
            "--trainer.strategy=auto", "--trainer.precision=32", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--checkpoint.dirpath={tmp_path / run}",
            f"--data.dataset={images}", f"--data.img_size={img_size}", "--data.batch_size=4", "--data.num_workers=0",
            *[f"--model.student.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in tiny.items()],
            f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher}"]


@pytest.mark.parametrize("run", list(IMAGENET_RUNS))
def test_each_imagenet_run_parses_instantiates_and_trains_a_few_steps_shrunk(run, tmp_path):
    extra = []
    if run == "finetune_384":  # starts from a 224 px stage: make one (at 32 px), fine-tune at 48
        make_cli(["fit", *shrunk_imagenet("deit_base", tmp_path)])
        extra = [f"--model.init_from={tmp_path / 'deit_base' / 'best.ckpt'}", "--data.img_size=48"]
    cli = make_cli(["fit", *shrunk_imagenet(run, tmp_path), *extra])
    assert cli.trainer.global_step == 2 and (tmp_path / run / "last.ckpt").is_file()
    assert cli.model.hparams.num_classes == 3 and cli.model.teacher is not None
    config = cli.config["fit"]  # the later files won where they set a value
    expected = merged_config(run)
    assert config.checkpoint.dirpath == str(tmp_path / run)
    assert (config.model.lr, config.model.ema_decay, config.data.repeated_aug) == (
        expected["model"]["lr"], expected["model"].get("ema_decay"), expected["data"]["repeated_aug"])


RECIPE = {  # the reference DeiT recipe, as the shared reference notes list it
    "model": {"distillation": "hard", "alpha": 0.5, "label_smoothing": 0.1, "optimizer": "adamw", "lr": 5e-4,
              "lr_scale_batch": 512, "weight_decay": 0.05, "opt_eps": 1e-8, "warmup_epochs": 5, "warmup_lr": 1e-6,
              "min_lr": 1e-5, "ema_decay": 0.99996},
    "data": {"img_size": 224, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel",
             "scale": [0.08, 1.0], "hflip": 0.5, "crop_pct": 0.875, "interpolation": "bicubic", "mixup": 0.8,
             "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "repeated_aug": 3},
}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_the_deit_configs_fix_every_value_of_the_reference_recipe(size):
    config = merged_config(f"deit_{size}")
    for section, values in RECIPE.items():
        assert {k: config[section][k] for k in values} == values, section
    student = config["model"]["student"]["init_args"]
    assert (student["model_name"], student["drop_path_rate"], student["drop_rate"]) == (f"deit_{size}", 0.1, 0.0)
    assert config["model"]["teacher"]["init_args"]["model_name"] == "regnety_160.deit_in1k"
    assert config["trainer"]["max_epochs"] == 300
    global_batch = config["trainer"]["devices"] * config["trainer"]["num_nodes"] * config["data"]["batch_size"]
    assert global_batch == 1024  # the paper's global batch (16 x 64)


def test_the_384_fine_tune_is_the_reference_one_with_distillation():
    config = merged_config("finetune_384")
    model, data = config["model"], config["data"]
    assert (data["img_size"], model["lr"], model["weight_decay"], config["trainer"]["max_epochs"]) == (384, 5e-6, 1e-8, 30)
    assert model["distillation"] == "hard" and model["init_from"].endswith("best.ckpt")
    assert model["teacher"]["init_args"]["img_size"] is None  # the teacher at 384 too
    assert config["trainer"]["devices"] * data["batch_size"] == 512
