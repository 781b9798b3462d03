"""The predict command: a command line over :func:`fcn.predictor.load_predictor` and
:func:`fcn.pipeline.run_predict`.

Every input ``REL/name.ext`` gives ``OUT/<kind>/REL/name.png`` per selected kind (``label``, ``color``,
``overlay``, ``confidence``; ``probs``: ``REL/name.npy``, images only); videos give videos and per-frame
PNGs (:mod:`fcn.video`). Unreadable files are reported and skipped (exit code 1). Under ``torchrun`` each
rank predicts its pixel-balanced share (:func:`fcn.distributed.split_balanced` by
:func:`fcn.inputs.input_weights`) and rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fcn import distributed
from fcn.data.io import check_writable, missing_dirs, remove_empty_dirs
from fcn.exposure import EXPOSURE_HELP, exposure_argument
from fcn.inputs import OUTPUT_MARKER, collect_inputs, input_weights
from fcn.pipeline import (
    OUTPUT_KINDS,
    PredictError,
    PredictInterrupted,
    PredictOptions,
    check_video_kinds,
    run_predict,
)
from fcn.predictor import (
    DEVICES,
    PRECISIONS,
    InferenceError,
    Predictor,
    load_predictor,
    resolve_device,
    set_exposure_target,
)
from fcn.tuning import onednn_convolutions
from fcn.video import is_video


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict",
        description="Segment images with a training checkpoint or an exported .onnx / TorchScript model.",
    )
    parser.add_argument("--checkpoint", required=True, help=".ckpt from training, or .onnx / .pt from export")
    parser.add_argument("--input", required=True, help="image or video, folder, 'glob' or .txt list")
    parser.add_argument("--output", required=True, type=Path, help="output folder (DIR/<kind>/REL.png)")
    kinds = ",".join(OUTPUT_KINDS)
    parser.add_argument(
        "--outputs", default="label,color", help=f"comma list of {kinds} (default: %(default)s)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight in [0, 1]")
    parser.add_argument("--confidence-bits", type=int, choices=(8, 16), default=8)
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose outputs all exist")
    parser.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward pass")
    parser.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)  # older commands: now --writers
    parser.add_argument(
        "--writers", type=int, help="threads that decode and write (default: 2 with overlap, else one a core)"
    )
    on_off = argparse.BooleanOptionalAction
    parser.add_argument("--fuse", action=on_off, default=True, help="fold BatchNorm into the convolutions")
    parser.add_argument(
        "--overlap",
        action=on_off,
        help="decode and write beside the model (default: on GPU or 2+ spare cores)",
    )
    hw: dict[str, Any] = {"type": int, "nargs": 2, "metavar": ("H", "W")}
    parser.add_argument("--resize", **hw, help="infer at a fixed size")
    parser.add_argument("--sliding-window", action="store_true", help="infer on overlapping crops")
    parser.add_argument("--crop", **hw, default=(512, 512), help="window size")
    parser.add_argument("--stride", **hw, help="default: half the crop")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA factors")
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped predictions (TTA)")
    parser.add_argument("--exposure-target", type=exposure_argument, metavar="GREY|off", help=EXPOSURE_HELP)
    # older commands: `--tta flip` is now --flip (the spelling of scripts/evaluate.py)
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--channels-last", action=on_off, help="for PyTorch models (default: on, faster)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    video = parser.add_argument_group("videos")
    video.add_argument("--every", type=int, default=1, metavar="N", help="keep one frame in N")
    video.add_argument("--start", type=float, default=0.0, metavar="S", help="first second to predict")
    video.add_argument("--end", type=float, metavar="S", help="predict up to this second (default: the end)")
    video.add_argument("--smooth", type=int, default=1, metavar="K", help="mean softmax of the last K frames")
    parser.add_argument(
        "--benchmark",
        type=int,
        nargs="?",
        const=3,
        metavar="N",
        help="run N times (default 3) beside the bare forward pass; print the share of its throughput "
        "predict reaches (later runs write into a temporary folder inside --output)",
    )
    parser.add_argument("--benchmark-rewrite", action="store_true", help="later runs replace the first's")
    return parser


def main(argv: list[str]) -> int:
    """The predict command; returns 0, 1 when some images failed, 2 for a user error."""
    args = build_parser().parse_args(argv)
    created = missing_dirs(args.output)
    threads = torch.get_num_threads()
    world = distributed.World()
    try:
        world = distributed.world_from_env()
        return _main(args, world)
    except PredictInterrupted as stop:
        _discard(created)  # a failed run removes the output folders it created while they hold nothing
        done, what = stop.summary.done + stop.summary.skipped, "inputs" if stop.summary.videos else "images"
        rank = f"rank {world.rank}: " if world.distributed else ""
        print(
            f"interrupted: {rank}{done} of {stop.summary.total} {what} have their outputs in "
            f"{args.output}; run the same command with --skip-existing to finish",
            file=sys.stderr,
        )
        return 130
    except (PredictError, InferenceError, distributed.DistributedError) as err:
        _discard(created)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        _discard(created)
        raise
    finally:
        torch.set_num_threads(threads)  # --threads: for this command only


def _discard(created: Sequence[Path]) -> None:
    """Remove the output folders this run created while they hold nothing but :data:`OUTPUT_MARKER`."""
    if not created:
        return
    with contextlib.suppress(OSError):  # no folder (not created yet), or already gone
        if [p.name for p in created[0].iterdir()] == [OUTPUT_MARKER]:
            (created[0] / OUTPUT_MARKER).unlink()
    remove_empty_dirs(created)


def _main(args: argparse.Namespace, world: distributed.World) -> int:
    output = args.output.expanduser()
    same = ("batch_size", "writers", "overlap", "alpha", "confidence_bits", "skip_existing", "every")
    options = PredictOptions(
        output=output,
        kinds=tuple(k.strip() for k in args.outputs.split(",") if k.strip()),
        resize=tuple(args.resize) if args.resize else None,
        crop=tuple(args.crop) if args.sliding_window else None,
        stride=tuple(args.stride) if (args.sliding_window and args.stride) else None,
        scales=tuple(args.scales),
        flip=args.flip or args.tta == "flip",
        progress=not args.quiet and world.main,
        **{name: getattr(args, name) for name in (*same, "start", "end", "smooth")},  # flag = field
    )
    if args.threads is not None and args.threads < 1:
        raise PredictError(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark and world.distributed:
        raise PredictError("--benchmark times one process; run it without torchrun")
    items, ignored = collect_inputs(args.input, exclude=output)
    check_video_kinds(items, options.kinds)  # before the ranks split the inputs
    check_writable(output, "--output")  # creates it; PermissionError naming --output
    (output / OUTPUT_MARKER).touch()
    device = distributed.rank_device(args.device, world)

    def load() -> Predictor:  # not called when --skip-existing finds every output present
        flags = {name: getattr(args, name) for name in ("precision", "channels_last", "fuse")}
        predictor = load_predictor(args.checkpoint, device=device, onednn=onednn_convolutions(), **flags)
        set_exposure_target(predictor, args.exposure_target)
        return predictor

    if args.benchmark:
        if any(is_video(it.path) for it in items):
            raise PredictError("--benchmark times images only; pass the video's frames as images")
        from fcn.benchmark import benchmark_predict, predict_report_lines

        rewrite = args.benchmark_rewrite
        report = benchmark_predict(load(), items, options, repeats=args.benchmark, rewrite=rewrite)
        print("\n".join(predict_report_lines(report, options, repeats=args.benchmark, rewrite=rewrite)))
        return 1 if report["failed"] else 0
    with distributed.process_group(resolve_device(device), world):
        if world.distributed:  # this rank's share, balanced by the pixels to predict
            paths = [it.path for it in items]
            weights = input_weights(paths, every=args.every, start=args.start, end=args.end)
            items = [items[i] for i in distributed.split_balanced(weights, world.size)[world.rank]]
        summary = run_predict(load, items, options).gathered()
    summary.ignored = ignored
    if world.main:
        print(summary.line())
    return 1 if summary.failed else 0
