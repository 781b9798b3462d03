"""Training end to end: the CLI, checkpoints, staged init, bad input, DDP metric equality, real data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fcn.checkpoint import load_model, save_checkpoint
from fcn.cli import train_main
from fcn.data.datamodule import SegDataModule
from fcn.data.demo import make_demo_dataset
from fcn.lit import SegmentationModule
from fcn.models import build_model
from fcn.train import DEMO_CONFIG

TINY = {"width_mult": 0.125, "fc_dim": 32, "dropout": 0.0}
CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, layout="camvid", n_train=8, n_val=4, size=(64, 80), seed=0)
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DEMO_CONFIG),
        "--data.dataset",
        "camvid",
        "--data.data_root",
        str(root),
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--data.crop_size",
        "[64, 80]",
        "--model.init_args.model_kwargs",
        '{"width_mult": 0.125, "fc_dim": 32}',
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "false",
        "--checkpoint.dirpath",
        str(out / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def test_fit_prints_miou_and_writes_self_describing_checkpoints(demo_root, tmp_path, capsys) -> None:
    assert train_main(_args(demo_root, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "val mIoU: " in out
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    assert best.is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    model, info = load_model(best)  # weights_only=True and validated
    assert info.model_name == "fcn8s" and info.num_classes == 11
    assert info.class_names[0] == "Sky" and len(info.palette) == 11
    assert model(torch.randn(1, 3, 37, 53)).shape == (1, 11, 37, 53)
    # validate / resume from it through the CLI
    val = ["validate", *_args(demo_root, tmp_path)[1:], "--ckpt_path", str(best)]
    assert train_main(val) == 0
    resume = [*_args(demo_root, tmp_path, "--trainer.max_epochs", "3"), "--ckpt_path", str(best)]
    assert train_main(resume) == 0


def test_staged_init_from_coarser_checkpoint(tmp_path) -> None:
    coarse = build_model("fcn32s", num_classes=11, **TINY)
    torch.nn.init.normal_(coarse.score_fr.weight)
    ckpt = save_checkpoint(tmp_path / "fcn32s.ckpt", model=coarse, model_name="fcn32s", model_kwargs=TINY)
    module = SegmentationModule(model="fcn16s", model_kwargs=TINY, num_classes=11, init_from=str(ckpt))
    torch.testing.assert_close(module.model.score_fr.weight, coarse.score_fr.weight)
    assert module.model.score_pool4.weight.abs().sum() == 0


def test_bad_input_is_one_clear_error(demo_root, tmp_path, capsys) -> None:
    # unknown model name lists the known ones
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.model", "fcn4s")) == 2
    assert "known models" in capsys.readouterr().err
    # missing resume checkpoint
    assert train_main([*_args(demo_root, tmp_path), "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a file that is not a checkpoint, as init_from
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.init_from", str(junk))) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    # num_classes mismatch names both numbers
    other = save_checkpoint(
        tmp_path / "c19.ckpt", model=build_model("fcn32s", num_classes=19, **TINY), model_name="fcn32s"
    )
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.init_from", str(other))) == 2
    err = capsys.readouterr().err
    assert "19 classes" in err and "11" in err
    # output dir not writable (a path below a regular file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_main(_args(demo_root, blocker / "out")) == 2
    assert "not writable" in capsys.readouterr().err


def test_nan_loss_stops_with_step_and_hint(demo_root, tmp_path, capsys) -> None:
    code = train_main(
        _args(demo_root, tmp_path, "--model.init_args.lr", "1e12", "--model.init_args.warmup_steps", "0")
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "at global step" in err and "lower the learning rate" in err


def test_print_config_is_complete(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(DEMO_CONFIG), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("seed_everything:", "trainer:", "model:", "data:", "checkpoint:", "poly_power:"):
        assert key in out


def _validate(root: Path, ckpt: Path, devices: int, out: Path) -> float:
    dm = SegDataModule(dataset="camvid", data_root=str(root), batch_size=2, num_workers=0, val_batch_size=1)
    module = SegmentationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",  # see the DDP test below
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val/mIoU"]


def test_ddp_two_processes_report_the_single_process_metric(demo_root, tmp_path, monkeypatch) -> None:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    torch.manual_seed(0)
    module = SegmentationModule(model="fcn8s", model_kwargs=TINY, num_classes=11)
    for layer in (module.model.score_fr, module.model.score_pool4, module.model.score_pool3):
        torch.nn.init.normal_(layer.weight, std=0.5)  # non-trivial predictions
    trainer = L.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    # A random tiny model has pixels whose two best logits differ by ~1e-5: in float32 another summation
    # order (another thread count, or kernels that follow memory alignment: one CI run in ~25 saw the
    # spawned ranks differ so) may flip one of them, and one pixel moves this mIoU by ~1e-3. Both runs
    # are float64 (a flip would need a gap under ~1e-13) with one intra-op thread in every process.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Lightning's launcher would leave MASTER_PORT in this process's environment; set here, it is undone.
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _validate(demo_root, ckpt, 1, tmp_path)
    finally:
        torch.set_num_threads(threads)
    double = _validate(demo_root, ckpt, 2, tmp_path)  # gloo, 2 CPU processes, 2 val images each
    assert single > 0
    assert double == pytest.approx(single, abs=1e-6)


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/data/camvid not present")
def test_loss_decreases_on_real_camvid_batch() -> None:
    from fcn.data.camvid import CamVid
    from fcn.data.transforms import eval_transform

    torch.manual_seed(0)
    ds = CamVid(CAMVID, "train", transform=eval_transform(size=(96, 128)))
    images, masks = zip(*(ds[i] for i in range(4)))
    x, y = torch.stack(images), torch.stack(masks)
    module = SegmentationModule(model="student", num_classes=11, optimizer="adamw", lr=1e-3)
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = module.loss(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "config", sorted(str(p.relative_to(DEMO_CONFIG.parent)) for p in DEMO_CONFIG.parent.rglob("*.yaml"))
)
def test_every_shipped_config_parses(config, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(DEMO_CONFIG.parent / config), "--print_config"])
    assert exc.value.code == 0
    assert "class_path: fcn.lit." in capsys.readouterr().out


# -- long runs: last.ckpt, signals, resume, linked arguments (README "Long runs") --------------------------
def _step(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["epoch"], ckpt["global_step"]


def test_last_ckpt_is_the_last_step_and_resume_continues(demo_root, tmp_path) -> None:
    # mode=min on mIoU keeps an early epoch as "best": last.ckpt must still be the newest step.
    args = _args(demo_root, tmp_path, "--trainer.max_epochs", "4", "--checkpoint.mode", "min")
    assert train_main(args) == 0
    steps_per_epoch = 2  # 8 images, batch 4
    assert _step(tmp_path / "ckpt" / "last.ckpt") == (3, 4 * steps_per_epoch)
    resumed = _args(demo_root, tmp_path, "--trainer.max_epochs", "6", "--checkpoint.mode", "min")
    assert train_main([*resumed, "--ckpt_path", "last"]) == 0  # "last": the --checkpoint.dirpath one
    assert _step(tmp_path / "ckpt" / "last.ckpt") == (5, 6 * steps_per_epoch)


def test_last_every_n_epochs_writes_last_ckpt_every_nth_epoch(demo_root, tmp_path) -> None:
    args = _args(demo_root, tmp_path, "--trainer.max_epochs", "3", "--last_every_n_epochs", "2")
    assert train_main(args) == 0
    assert _step(tmp_path / "ckpt" / "last.ckpt") == (1, 2 * 2)  # epoch 1 (the 2nd), 2 steps an epoch
    assert train_main([*args[:-2], "--last_every_n_epochs", "0"]) != 0  # refused in one line


def test_last_ckpt_is_written_inside_an_epoch_every_interval(demo_root, tmp_path) -> None:
    from fcn.train import last_checkpoints

    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            last = tmp_path / "last.ckpt"
            seen.append(_step(last)[1] if last.exists() else None)

    dm = SegDataModule(
        dataset="camvid", data_root=str(demo_root), batch_size=2, num_workers=0, crop_size=(64, 80)
    )
    module = SegmentationModule(model="fcn8s", model_kwargs=TINY, num_classes=11)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        callbacks=[Probe(), *last_checkpoints(tmp_path, every_minutes=1e-6)],
    )
    trainer.fit(module, datamodule=dm)
    assert seen == [None, 1, 2, 3]  # the newest step before each batch of the (4-batch) epoch


def _signal_run(
    demo_root: Path, out: Path, signum: int, *, group: bool, extra: tuple[str, ...] = ()
) -> tuple[int, str, int]:
    """Train in a subprocess with 2 loader workers, send ``signum`` once the first epoch's last.ckpt is
    there; return (exit code, stderr, the step last.ckpt held before the signal)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = _args(demo_root, out, "--trainer.max_epochs", "1000", "--data.num_workers", "2", *extra)
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    # A DDP rendezvous port left in this process's environment by an in-process run must not be reused.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    log = out / "stderr.txt"  # a file, not a pipe: a pipe nobody reads can fill and block the run
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest may run in background
        )
    last = out / "ckpt" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        if not last.exists():
            pytest.fail(f"no {last} (exit code {proc.poll()}); stderr ends:\n{log.read_text()[-3000:]}")
        before = _step(last)[1]
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left behind: {leftovers}"
    return proc.returncode, err, before


DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")  # gloo, 2 CPU processes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signame", "group", "code", "extra"),
    [
        ("SIGTERM", True, 143, ()),
        ("SIGTERM", False, 143, ()),
        ("SIGINT", True, 130, ()),
        ("SIGTERM", True, 143, DDP),  # every rank gets it
        ("SIGTERM", False, 143, DDP),  # rank 0 alone
    ],
)
def test_a_signal_saves_last_ckpt_and_prints_how_to_resume(
    demo_root, tmp_path, signame, group, code, extra
) -> None:
    import signal

    rc, err, before = _signal_run(demo_root, tmp_path, getattr(signal, signame), group=group, extra=extra)
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith(f"stopped by {signame}")]
    assert len(lines) == 1, err  # one line, also with several ranks
    line = lines[0]
    step = int(line.split("global step ")[1].split(";")[0])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _step(last)[1] == step >= before
    assert f"--ckpt_path {last}" in line and "resume with: python " in line
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name not in ("best.ckpt", "last.ckpt")]


def test_linked_model_arguments_are_refused_with_the_data_flag(demo_root, tmp_path, capsys) -> None:
    weights = "[" + ", ".join(["2.0"] * 11) + "]"
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.class_weights", weights)) == 2
    assert "--data.class_weighting" in capsys.readouterr().err
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.ignore_index", "11")) == 2
    assert "--data.ignore_index" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_print_config_shows_the_linked_values(demo_root, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        weighted = _args(demo_root, tmp_path, "--data.class_weighting", "median_frequency")
        train_main([*weighted, "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    linked = out.split("# linked from the data module")[1]
    assert "#   num_classes: 11" in linked and "#   class_names: ['Sky'," in linked
    weights = eval(linked.split("#   class_weights: ")[1].splitlines()[0])
    assert len(weights) == 11 and all(w > 0 for w in weights)


def test_bad_settings_and_resume_files_are_one_line(demo_root, tmp_path, capsys) -> None:
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.lr", "-1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model.init_args.lr" in err
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.momentum", "1.5")) == 2
    assert "momentum" in capsys.readouterr().err
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.ohem_fraction", "0")) == 2
    assert "--model.init_args.ohem_fraction 0" in capsys.readouterr().err
    truncated = tmp_path / "truncated.ckpt"
    good = save_checkpoint(
        tmp_path / "good.ckpt",
        model=build_model("fcn8s", num_classes=11, **TINY),
        model_name="fcn8s",
        model_kwargs=TINY,
    )
    truncated.write_bytes(good.read_bytes()[:1000])
    assert train_main([*_args(demo_root, tmp_path), "--ckpt_path", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt_path") and "Traceback" not in err and err.count("\n") == 1
    assert train_main([*_args(demo_root, tmp_path), "--ckpt_path", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # an unwritable checkpoint folder is found before training, naming its option
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_main(_args(demo_root, tmp_path, "--checkpoint.dirpath", str(blocker / "ckpt"))) == 2
    assert "--checkpoint.dirpath" in capsys.readouterr().err


def test_train_script_prints_no_args_and_command_line_warning(demo_root, tmp_path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    args = _args(demo_root, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1")
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "val mIoU: " in run.stdout
    assert "not recommended to provide both args and command line" not in run.stderr
    shown = subprocess.run(
        [sys.executable, str(script), *args, "--print_config"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "max_epochs: 1" in shown.stdout, shown.stderr
    assert "not recommended to provide both args and command line" not in shown.stderr


def test_a_bad_image_in_a_loader_worker_is_one_line(tmp_path, capsys) -> None:
    root = tmp_path / "demo"
    make_demo_dataset(root, layout="camvid", n_train=4, n_val=2, size=(64, 80), seed=0)
    bad = sorted((root / "train").iterdir())[0]
    bad.write_bytes(b"not an image")
    args = _args(root, tmp_path / "out", "--data.num_workers", "1", "--data.persistent_workers", "false")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # not the worker's traceback
    assert bad.name in err


def _bf16_advice(args: list[str]) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert train_main(args) == 0
    return [str(w.message) for w in seen if "no native bf16" in str(w.message)]


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_fix(demo_root, tmp_path, monkeypatch) -> None:
    """On a CPU without AVX512-BF16 / AMX, bf16 is emulated (~14x slower): fit names the flag and its fix."""
    from types import SimpleNamespace

    import fcn.train
    from fcn.tuning import cpu_has_native_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    args = _args(demo_root, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1")
    bf16 = [*args, "--trainer.precision", "bf16-mixed"]
    monkeypatch.setattr(fcn.train, "cpu_has_native_bf16", lambda: False)  # the CPU's flags, not a component
    advice = _bf16_advice(bf16)
    assert len(advice) == 1 and "--trainer.precision bf16-mixed" in advice[0], advice
    assert "add --trainer.precision 32" in advice[0]
    assert _bf16_advice(args) == []  # fp32 (the demo's precision): nothing to say
    monkeypatch.setattr(fcn.train, "cpu_has_native_bf16", lambda: True)
    assert _bf16_advice(bf16) == []
    # a distillation teacher in bf16 under an fp32 trainer
    teacher = SimpleNamespace(hparams=SimpleNamespace(teacher_precision="bf16"))
    trainer = L.Trainer(accelerator="cpu", precision="32", logger=False)
    (line,) = fcn.train.emulated_bf16(trainer, teacher, native=False)
    assert "add --model.init_args.teacher_precision 32" in line
    assert fcn.train.emulated_bf16(trainer, teacher, native=True) == []
