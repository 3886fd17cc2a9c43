"""The teacher-output cache: exact replay of augmented (mixed) views, cached targets, refusals."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distill.cache.format import TeacherCache
from distill.cache.targets import cached_teacher_logits
from distill.cli import cli_main
from distill.common.seeding import sample_seed
from distill.data.batch import TrainingBatch
from distill.training.datamodule import ImageDataModule
from distill.training.cli import make_cli
from distill.training.losses import DistillationLoss
from teachers import Teacher
from tests.helpers import TINY_TEACHER, random_teacher_file, run_cli_error, scalars, shrink

ROOT = Path(__file__).resolve().parents[1]
# the DeiT recipe's augmentation: RandAugment, random erasing, mixup and cutmix, all replayed
AUGMENT = ["--data.auto_augment=rand-m9-mstd0.5-inc1", "--data.re_prob=0.25", "--data.mixup=0.8", "--data.cutmix=1.0"]
# configs/distill.yaml's data (it has AUGMENT)
DATA = dict(img_size=32, scale=(0.08, 1.0), hflip=0.0, crop_pct=1.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
            mixup=0.8, cutmix=1.0)


def common(tmp_path: Path, teacher_file: Path) -> list[str]:
    return [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}", "--model.teacher.init_args.precision=32",
            "--trainer.max_epochs=2", "--model.distillation=hard", *AUGMENT,  # the stored top-1 is the target
            "--model.feature_weight=0"]  # a cache holds outputs, not the features that imitation needs


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache of 2 epochs, built once for this file (the build is the slow part; tests get a copy)."""
    tmp = tmp_path_factory.mktemp("cache_build")
    out = tmp / "cache"
    teacher = random_teacher_file(tmp)  # the weights of the `teacher_file` fixture, which the tests run live
    cli_main(["cache-teacher", *common(tmp, teacher), "--epochs=2", "--top_k=3", f"--out={out}"])
    return out


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    return Path(shutil.copytree(built_cache, tmp_path / "cache"))


def replayed_views(data: ImageDataModule, sampler, batch_size: int, workers: int, batches: int = 10**6) -> dict:
    """(epoch, index, repeat) -> the mixed view training sees, through the data module's batch hooks."""
    loader = DataLoader(data.train_set, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=TrainingBatch.collate)
    views = {}
    for step, batch in enumerate(loader):
        if step == batches:
            break
        batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
        views.update({tuple(key): image for key, image in zip(batch.key.tolist(), batch.images)})
    return views


def test_mixed_views_are_pixel_identical_whatever_the_workers_batch_size_or_rank():
    reference = ImageDataModule("digits", batch_size=4, num_workers=0, **DATA)
    reference.setup("fit")
    sampler = reference.train_sampler()
    sampler.set_epoch(1)
    expected = replayed_views(reference, sampler, 4, 0)
    assert len(expected) == 1436  # 1437 images: 718 mixing pairs, the odd one out waits for another epoch

    data = ImageDataModule("digits", batch_size=8, num_workers=2, **DATA)
    data.setup("fit")
    for rank in (0, 1):  # a DDP run's two ranks, 2 workers each, batches twice as large
        sampler = data.train_sampler(world=2, rank=rank)
        sampler.set_epoch(1)
        views = replayed_views(data, sampler, 8, 2, batches=6)
        assert len(views) == 48
        for key, view in views.items():
            assert torch.equal(view, expected[key]), key
    assert not torch.equal(*[expected[key] for key in list(expected)[:2]])


def test_cached_targets_are_the_live_teachers_on_the_same_views(cache, teacher_file):
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["epochs"] == 2 and meta["top_k"] == 3 and meta["fingerprint"]["mixing"]["cutmix"] == 1.0
    shard = cache / "shard-00000-of-00001"  # one process built it: one shard
    arrays = {name: np.load(shard / f"{name}.npy", mmap_mode="r") for name in ("index", "prob", "done")}
    assert arrays["index"].shape == (2, 1436, 3) and arrays["index"].dtype == np.int16  # 718 pairs an epoch
    assert arrays["done"].all()
    data = ImageDataModule("digits", batch_size=16, num_workers=0, **DATA)
    data.setup("fit")
    opened = TeacherCache.open(cache, data.cache_fingerprint(data.train_set.dataset), 2)  # the same data as the build
    sampler = data.train_sampler()
    sampler.set_epoch(1)
    views = replayed_views(data, sampler, 16, 0, batches=4)
    keys = list(views)
    teacher = Teacher(TINY_TEACHER, weights=str(teacher_file), precision="32")
    teacher.set_input_normalization(data.mean, data.std)  # as DistillationModule does
    live = teacher(torch.stack([views[k] for k in keys])).softmax(-1)
    rows = [opened.row(*key) for key in keys]
    cached_index = torch.from_numpy(np.stack([row["index"] for row in rows]).astype(np.int64))
    cached_prob = torch.from_numpy(np.stack([row["prob"] for row in rows]).astype(np.float32))
    assert torch.equal(cached_index[:, 0], live.argmax(-1))  # hard distillation: exactly the live argmax
    assert torch.allclose(cached_prob, live.gather(1, cached_index), atol=1e-3)  # fp16 probabilities
    assert [int(row["seed"]) for row in rows] == [sample_seed(0, 1, index) for _, index, _ in keys]  # their seeds


def test_fit_from_the_cache_verifies_views_and_targets_against_the_live_teacher(cache, tmp_path, teacher_file):
    # another worker count and batch size than the build: the views still replay exactly
    cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={cache}", "--data.num_workers=2",
              "--data.batch_size=8", "--model.teacher_cache_verify=1.0"])
    logged = scalars(tmp_path / "runs")
    assert logged["train/cache_view_match_step"] == [1.0] * 6
    assert logged["train/cache_agreement_step"] == [1.0] * 6


def test_views_that_no_longer_replay_are_reported_when_verifying(cache, tmp_path, teacher_file, capsys):
    checksums = np.load(cache / "shard-00000-of-00001" / "checksum.npy", mmap_mode="r+")
    checksums[0] += 1.0  # as if the transform had changed since the build
    checksums.flush()
    cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={cache}",
              "--model.teacher_cache_verify=1.0", "--trainer.max_epochs=1"])
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("UserWarning: ")]
    assert any("training views differ from the views the cache was built from" in line for line in warned)
    assert scalars(tmp_path / "runs")["train/cache_view_match_step"] == [0.0] * 3


@pytest.mark.parametrize("distillation", ["hard", "soft"])
def test_fit_from_the_cache_holds_no_teacher(cache, tmp_path, teacher_file, distillation):
    args = [*common(tmp_path, teacher_file), f"--data.teacher_cache={cache}", "--model.teacher=null",
            f"--model.distillation={distillation}", "--model.tau=2.0"]
    cli = make_cli(args, run=False)
    assert cli.model.teacher is None and cli.model.hparams.teacher_cache == str(cache)
    cli.trainer.fit(cli.model, cli.datamodule)
    losses = scalars(tmp_path / "runs")["train/loss_distill"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert "val/teacher_acc" not in cli.trainer.callback_metrics  # no teacher to validate


@pytest.mark.parametrize("override, message", [
    ("--data.scale=[0.3,1.0]", "built for another transform"),
    ("--seed_everything=1", "built for another seed (0 in the cache, 1 here)"),
    ("--data.mixup=0.5", "built for another mixing"),
    ("--data.repeated_aug=2", "built for another repeated_aug"),
    ("--trainer.max_epochs=3", "holds 2 epochs of teacher outputs but trainer.max_epochs is 3"),
    ("--data.dataset=IMAGES", "built for another classes"),
    ("--data.mean=[0.48501,0.456,0.406]", "built for another transform"),
])
def test_a_cache_built_for_other_data_or_schedule_is_refused(cache, tmp_path, teacher_file, image_folder, capsys,
                                                          override, message):
    override = override.replace("IMAGES", str(image_folder))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={cache}", "--model.teacher=null",
                  override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: data.teacher_cache: '{cache}'") and message in err
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # refused before any training


def test_cache_teacher_refuses_to_overwrite_and_an_interrupted_build_is_not_a_cache(cache, tmp_path, teacher_file,
                                                                                  capsys):
    before = (cache / "shard-00000-of-00001" / "index.npy").read_bytes()
    for extra, message in ((f"--out={cache}", "exists; pass --overwrite"),
                           (f"--out={tmp_path / 'other'} --top_k=11", "--top_k must lie in 1..10"),
                           (f"--out={tmp_path / 'other'} --batch_size=7", "--batch_size must be even"),
                           (f"--out={tmp_path / 'other'} --model.teacher=null", "no model.teacher")):
        with pytest.raises(SystemExit):
            cli_main(["cache-teacher", *common(tmp_path, teacher_file), "--epochs=2", *extra.split()])
        assert message in capsys.readouterr().err
    assert (cache / "shard-00000-of-00001" / "index.npy").read_bytes() == before and not (tmp_path / "other").exists()

    (tmp_path / "half.partial").mkdir()  # what a killed build leaves
    with pytest.raises(SystemExit):
        cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={tmp_path / 'half'}"])
    assert "a build was interrupted" in capsys.readouterr().err
    shutil.copytree(cache, tmp_path / "half.partial", dirs_exist_ok=True)  # its meta.json is written first
    with pytest.raises(SystemExit):
        cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={tmp_path / 'half.partial'}"])
    assert "is an unfinished build" in capsys.readouterr().err


def test_targets_from_top_k_spread_the_rest_evenly_and_keep_the_temperature_exact_among_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 3
    probs = logits.softmax(-1)
    full = cached_teacher_logits(*probs.topk(10, dim=-1)[::-1], num_classes=10)
    assert torch.allclose(full, logits.log_softmax(-1), atol=1e-5)  # k = C: the teacher itself
    soft = DistillationLoss("soft", tau=2.0).method
    student = torch.randn(4, 10)
    labels = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(soft(student, full, labels)["distill"], soft(student, logits, labels)["distill"], atol=1e-5)

    values, index = probs.topk(3, dim=-1)
    approx = cached_teacher_logits(index, values, num_classes=10).exp()
    assert torch.allclose(approx.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(approx.gather(1, index), values)
    rest = approx.scatter(1, index, 0.0)
    assert torch.allclose(rest.max(-1).values * 7, 1 - values.sum(-1), atol=1e-5)  # spread over the other 7
    assert torch.equal(approx.argmax(-1), logits.argmax(-1))
    tied = cached_teacher_logits(torch.tensor([[3, 1]]), torch.tensor([[0.45, 0.45]], dtype=torch.float16), 10)
    assert tied.argmax(-1).item() == 3  # fp16 rounded the top two together: the stored top-1 still wins
    tempered = F.softmax(approx.log() / 2.0, dim=-1)
    exact = F.softmax(logits / 2.0, dim=-1)
    ratio = tempered.gather(1, index) / exact.gather(1, index)  # the same up to one normalisation per row
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_with_repeated_augmentation_the_cache_holds_what_any_world_size_trains_on():
    from distill.training.cache_writer import CacheSampler
    data = ImageDataModule("digits", batch_size=8, num_workers=0, repeated_aug=3, **DATA)
    data.setup("fit")
    cached = set(CacheSampler(data.train_sampler(), epochs=1, num_replicas=1, rank=0))
    assert len(cached) == 1436  # one dataset's worth of views per epoch, as training uses (not 3x)
    for world in (1, 2, 3, 4):
        for rank in range(world):
            trained = set(data.train_sampler(world, rank))
            assert trained <= cached, (world, rank)


def test_a_two_process_ddp_build_writes_the_same_cache_as_one_process(cache, tmp_path, teacher_file, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cache_ddp"
    run = subprocess.run([sys.executable, "-m", "distill", "cache-teacher", *common(tmp_path, teacher_file),
                          "--epochs=2", "--top_k=3", f"--out={out}", "--trainer.strategy=ddp",
                          "--trainer.accelerator=cpu", "--trainer.devices=2", "--batch_size=32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("2872 views (2 epochs x 1436 of the 1437 images, in mixing pairs), top-3 of 10 classes; 81.3 KiB on disk"
            in run.stdout + run.stderr)
    assert sorted(path.name for path in out.iterdir()) == ["meta.json", "shard-00000-of-00002", "shard-00001-of-00002"]
    fingerprint = json.loads((cache / "meta.json").read_text())["fingerprint"]
    one, two = TeacherCache.open(cache, fingerprint, 2), TeacherCache.open(out, fingerprint, 2)
    assert sum(two.meta["shard_rows"]) == one.meta["shard_rows"][0] == 1436
    for epoch in (0, 1):  # every view of the 1-process build, found in one of the 2-process build's shards
        views = np.nonzero(one.locate(epoch) >= 0)[0]
        assert len(views) == 1436 and np.array_equal(np.nonzero(two.locate(epoch) >= 0)[0], views)
        for view in views:
            a, b = one.row(epoch, int(view), 0), two.row(epoch, int(view), 0)
            assert np.array_equal(a["index"], b["index"]) and a["seed"] == b["seed"], (epoch, view)
            assert np.allclose(a["prob"], b["prob"], atol=1e-3) and np.isclose(a["checksum"], b["checksum"], rtol=1e-9)
    # training from either build: the same weights, bit for bit (hard distillation reads the stored top-1)
    weights = []
    for source in (cache, out):
        folder = tmp_path / f"fit_{source.name}"
        cli_main(["fit", *common(tmp_path, teacher_file), f"--data.teacher_cache={source}", "--model.teacher=null",
                  "--trainer.max_epochs=2", f"--checkpoint.dirpath={folder / 'ckpt'}",
                  f"--trainer.logger.init_args.save_dir={folder / 'runs'}"])
        weights.append(torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    cli_main(["cache-teacher", f"--check={out}"])
    assert "complete, 2872 views (2 epochs x 1436), 2 shard(s)" in capsys.readouterr().out
    # a DDP fit from the cache, verifying half the batches: every rank verifies the same ones (no hang)
    fit = subprocess.run([sys.executable, "-m", "distill", "fit", *common(tmp_path, teacher_file),
                          f"--data.teacher_cache={out}", "--model.teacher_cache_verify=0.5", "--trainer.strategy=ddp",
                          "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.limit_train_batches=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    matches = scalars(tmp_path / "runs")["train/cache_view_match_step"]
    assert 0 < len(matches) < 8 and set(matches) == {1.0}


def test_check_finds_a_complete_cache_whole_and_names_an_unfinished_or_damaged_shard(cache, capsys):
    cli_main(["cache-teacher", f"--check={cache}"])
    assert "complete, 2872 views (2 epochs x 1436), 1 shard(s), top-3 of 10 classes" in capsys.readouterr().out
    shard = cache / "shard-00000-of-00001"
    done = np.load(shard / "done.npy", mmap_mode="r+")
    done[1, 5] = False  # a row the build never wrote
    done.flush()
    with pytest.raises(SystemExit):
        cli_main(["cache-teacher", f"--check={cache}"])
    assert f"'{shard}' has 1 unwritten rows (the first in epoch 1)" in capsys.readouterr().err
    done[1, 5] = True
    done.flush()
    view = np.load(shard / "view.npy", mmap_mode="r+")
    view[0, 3] = view[0, 4]  # one view twice, another missing
    view.flush()
    with pytest.raises(SystemExit):
        cli_main(["cache-teacher", f"--check={cache}"])
    assert "epoch 0 of" in (err := capsys.readouterr().err) and "holds a view twice" in err
    view[0, 3] = -1  # garbage
    view.flush()
    with pytest.raises(SystemExit):
        cli_main(["cache-teacher", f"--check={cache}"])
    assert "names a view out of 0..1436" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["cache-teacher", f"--check={cache}", "--epochs=2"])
    assert "--check DIR takes no other option" in capsys.readouterr().err


@pytest.mark.parametrize("method", [["--model.distillation=dkd"],
                                    ["--model.distillation=Soft", "--model.distillation.standardize=true"]],
                         ids=["dkd", "standardized_soft"])
def test_a_method_that_reads_every_class_is_refused_when_fit_trains_from_a_top_k_cache(cache, tmp_path, teacher_file,
                                                                                        capsys, method):
    args = [*common(tmp_path, teacher_file), f"--data.teacher_cache={cache}", "--model.teacher=null", *method]
    line = run_cli_error(["fit", *args], capsys)
    assert f"reads every class's teacher probability, but data.teacher_cache '{cache}' holds the top 3 of 10" in line
    assert not list(tmp_path.rglob("*.ckpt"))
