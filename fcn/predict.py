"""The predict command: a thin command line over :func:`fcn.predictor.load_predictor` and
:func:`fcn.pipeline.run_predict`.

``python scripts/predict.py --checkpoint CKPT --input PATH --output DIR`` writes, for every input
``REL/name.ext`` (its path relative to the input folder), ``DIR/<kind>/REL/name.png`` for each selected
output kind: ``label`` (class ids), ``color`` (palette colours), ``overlay`` (image blended with the
colours) and ``confidence`` (max softmax probability, 8 or 16 bit). Unreadable files are reported and
skipped (exit code 1); ``--skip-existing`` resumes an interrupted run; ``--benchmark`` times the run
against the bare forward pass (:mod:`fcn.benchmark`).

Videos (``--input drive.mp4``, or among the images of a folder or list) give colour / overlay videos and
per-frame PNGs (:mod:`fcn.video`); ``--every``, ``--start`` / ``--end`` select frames, ``--smooth`` the
softmax averaged over the last K frames.

Under ``torchrun --nproc_per_node N`` (and ``--nnodes``) each rank predicts its share of the inputs
(:func:`fcn.distributed.split_balanced` by :func:`fcn.inputs.input_weights`: the same split on every
rank), writes its own outputs and checks its own share for ``--skip-existing``; rank 0 prints one summary
for the whole run (the counts gathered over the ranks), the other ranks print only their errors.
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
from fcn.data.io import missing_dirs, remove_empty_dirs
from fcn.inputs import OUTPUT_MARKER, InputItem, check_output_dir, collect_inputs, input_weights
from fcn.pipeline import (
    DEFAULT_OUTPUTS,
    OUTPUT_KINDS,
    PredictError,
    PredictInterrupted,
    PredictOptions,
    PredictSummary,
    run_predict,
)
from fcn.predictor import DEVICES, PRECISIONS, InferenceError, Predictor, load_predictor, resolve_device
from fcn.tuning import onednn_convolutions
from fcn.video import is_video


def _parse_outputs(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict",
        description="Segment images with a training checkpoint or an exported .onnx / TorchScript model.",
    )
    parser.add_argument("--checkpoint", required=True, help=".ckpt from training, or .onnx / .pt from export")
    parser.add_argument(
        "--input", required=True, help="image or video, folder (recursive), 'glob' or .txt list"
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (DIR/<kind>/REL.png)")
    parser.add_argument(
        "--outputs",
        type=_parse_outputs,
        default=list(DEFAULT_OUTPUTS),
        help=f"comma list of {','.join(OUTPUT_KINDS)} (default: label,color)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight in [0, 1]")
    parser.add_argument("--confidence-bits", type=int, choices=(8, 16), default=8)
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose outputs all exist")
    parser.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward pass")
    parser.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)  # older commands: now --writers
    parser.add_argument(
        "--writers",
        type=int,
        default=None,
        help="threads that decode and write; default: 2 with overlap, else one per core (they run "
        "between forward passes, when every core is free)",
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold BatchNorm into the convolutions of a checkpoint's model (same labels, faster)",
    )
    parser.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode and write while the model runs (default: on a GPU, or with 2+ spare CPU cores)",
    )
    hw: dict[str, Any] = {"type": int, "nargs": 2, "metavar": ("H", "W")}
    parser.add_argument("--resize", **hw, help="infer at a fixed size")
    parser.add_argument("--sliding-window", action="store_true", help="infer on overlapping crops")
    parser.add_argument("--crop", **hw, default=(512, 512), help="window size")
    parser.add_argument("--stride", **hw, help="default: half the crop")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA factors")
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped predictions (TTA)")
    # older commands: `--tta flip` is now --flip (the spelling of scripts/evaluate.py)
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format for PyTorch models (default: on; measured faster on CPU)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    video = parser.add_argument_group("videos")
    video.add_argument("--every", type=int, default=1, metavar="N", help="keep one frame in N")
    video.add_argument("--start", type=float, default=0.0, metavar="S", help="first second to predict")
    video.add_argument("--end", type=float, metavar="S", help="predict up to this second (default: the end)")
    video.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="K",
        help="labels from the softmax averaged over the last K frames (a sliding window; less flicker)",
    )
    parser.add_argument(
        "--benchmark",
        type=int,
        nargs="?",
        const=3,
        metavar="N",
        help="run N times (default 3) alternating with the bare forward pass at the same batch size; "
        "print the median share of the forward's throughput that predict reaches; runs after the first "
        "write new files into a temporary folder inside --output",
    )
    parser.add_argument(
        "--benchmark-rewrite",
        action="store_true",
        help="with --benchmark: every run replaces the files of the first run instead",
    )
    return parser


def main(argv: list[str]) -> int:
    """The predict command; returns 0, 1 when some images failed, 2 for a user error."""
    args = build_parser().parse_args(argv)
    created = missing_dirs(args.output)  # a failed run removes them again when nothing was written
    threads = torch.get_num_threads()
    world = distributed.World()
    try:
        world = distributed.world_from_env()
        return _main(args, world)
    except PredictInterrupted as stop:
        _discard(created)
        summary = stop.summary
        what = "inputs" if summary.videos else "images"
        rank = f"rank {world.rank}: " if world.distributed else ""
        print(
            f"interrupted: {rank}{summary.done + summary.skipped} of {summary.total} {what} have their "
            f"outputs in {args.output}; run the same command with --skip-existing to finish",
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
        kinds=tuple(args.outputs),
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
    check_output_dir(output)
    device = distributed.rank_device(args.device, world)

    def load() -> Predictor:  # not called when --skip-existing finds every output present
        return load_predictor(
            args.checkpoint,
            device=device,
            precision=args.precision,
            channels_last=args.channels_last,
            fuse=args.fuse,
            onednn=onednn_convolutions(),
        )

    if args.benchmark:
        if any(is_video(it.path) for it in items):
            raise PredictError("--benchmark times images only; pass the video's frames as images")
        from fcn.benchmark import benchmark_predict, predict_report_lines

        rewrite = args.benchmark_rewrite
        report = benchmark_predict(load(), items, options, repeats=args.benchmark, rewrite=rewrite)
        print("\n".join(predict_report_lines(report, options, repeats=args.benchmark, rewrite=rewrite)))
        return 1 if report["failed"] else 0
    with distributed.process_group(resolve_device(device), world):
        summary = run_predict(load, _share(items, options, world), options)
        summary = _gathered(summary)
    summary.ignored = ignored
    if world.main:
        print(summary.line())
    return 1 if summary.failed else 0


def _share(items: list[InputItem], options: PredictOptions, world: distributed.World) -> list[InputItem]:
    """This rank's inputs (all of them for one process), balanced by pixels to predict."""
    if not world.distributed:
        return items
    paths = [it.path for it in items]
    weights = input_weights(paths, every=options.every, start=options.start, end=options.end)
    return [items[i] for i in distributed.split_balanced(weights, world.size)[world.rank]]


_SUMMED = ("total", "done", "skipped", "failed", "videos", "videos_done", "frames")


def _gathered(summary: PredictSummary) -> PredictSummary:
    """The whole run's summary: counts summed over the ranks, the slowest rank's seconds, every rank's
    failures in rank order (the summary itself for one process)."""
    mine = {k: getattr(summary, k) for k in _SUMMED}
    parts = distributed.all_gather({**mine, "seconds": summary.seconds, "failures": summary.failures})
    if len(parts) == 1:
        return summary
    whole = PredictSummary(**{k: sum(p[k] for p in parts) for k in _SUMMED})
    whole.seconds = max(p["seconds"] for p in parts)
    whole.failures = [f for p in parts for f in p["failures"]]
    whole.predictor, whole.overlap = summary.predictor, summary.overlap
    return whole
