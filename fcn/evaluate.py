"""``scripts/evaluate.py``: score a checkpoint on a labelled split at full resolution
(:func:`fcn.scoring.evaluate_model`), write the report directory (:func:`fcn.report.write_report`) and
optionally Cityscapes labelId PNGs. Under ``torchrun`` each rank scores a share; rank 0 writes the report."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fcn.checkpoint import ModelMeta
from fcn.data.base import UNKNOWN_LABELS
from fcn.data.cityscapes import train_ids_to_label_ids
from fcn.data.datamodule import build_dataset
from fcn.data.errors import DataError
from fcn.data.io import check_writable, missing_dirs, remove_empty_dirs, write_png_atomic
from fcn.data.transforms import eval_transform
from fcn.distributed import (
    DistributedError,
    World,
    process_group,
    rank_device,
    split_balanced,
    world_from_env,
)
from fcn.exposure import EXPOSURE_HELP, exposure_argument
from fcn.inputs import input_weights
from fcn.predictor import (
    PRECISIONS,
    InferenceError,
    Predictor,
    load_predictor,
    resolve_device,
    set_exposure_target,
)
from fcn.report import ReportError, format_summary_table, write_report
from fcn.scoring import PassResult, PredictOptions, evaluate_model, gather_pass
from fcn.tuning import onednn_convolutions

__all__ = ["EvaluationError", "PassResult", "PredictOptions", "build_parser", "evaluate_model", "main"]

DATASETS = ("camvid", "cityscapes", "folder")


class EvaluationError(ValueError):
    """Options or inputs that cannot be evaluated together; the message says which and the fix."""


# -- arguments ----------------------------------------------------------------------------------------
def _number(cast: type, low: float, what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` of at least ``low`` (finite), else the message ``expected what``."""

    def parse(text: str) -> Any:
        with contextlib.suppress(ValueError):
            if low <= (value := cast(text)) < float("inf"):
                return value
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")

    return parse


_positive_int = _number(int, 1, "a positive integer")
_non_negative_int = _number(int, 0, "an integer >= 0")
_positive_float = _number(float, 1e-300, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``scripts/evaluate.py``."""
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a checkpoint on a labelled split and write a report directory "
        "(report.md, metrics.json, per_class.csv, per_image.csv, confusion_matrix.png, worst/).",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help=".ckpt, or .onnx / .pt from export")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="data set layout")
    p.add_argument("--data-root", required=True, type=Path, help="data set root directory")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--output", required=True, type=Path, help="report directory (created)")
    p.add_argument(
        "--label-type",
        choices=("labelIds", "labelTrainIds"),
        default="labelIds",
        help="cityscapes: gtFine files to read (default %(default)s)",
    )
    p.add_argument("--classes-file", type=Path, help="folder: class file (default ROOT/classes.yaml)")
    p.add_argument(
        "--unknown-labels",
        choices=UNKNOWN_LABELS,
        default="error",
        help="labels outside the class table: stop with an error, or ignore those pixels",
    )
    g = p.add_argument_group("prediction")
    g.add_argument("--sliding-window", action="store_true", help="average --crop windows every --stride")
    size: dict[str, Any] = {"nargs": 2, "type": _positive_int, "metavar": ("H", "W")}
    g.add_argument("--crop", **size, help="sliding-window crop")
    g.add_argument("--stride", **size, help="sliding-window stride, <= crop (default: half the crop)")
    g.add_argument(
        "--scales",
        nargs="+",
        type=_positive_float,
        default=[1.0],
        metavar="S",
        help="multi-scale test-time augmentation, e.g. 0.5 0.75 1.0 1.25 (default 1.0)",
    )
    g.add_argument("--flip", action="store_true", help="add horizontally flipped predictions (TTA)")
    g.add_argument("--exposure-target", type=exposure_argument, metavar="GREY|off", help=EXPOSURE_HELP)
    g.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward pass (default 1)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast precision")
    g.add_argument("--num-workers", type=_non_negative_int, default=2, help="loader processes (default 2)")
    g.add_argument("--limit", type=_positive_int, help="evaluate only the first N images of the split")
    r = p.add_argument_group("report")
    r.add_argument("--worst", type=_non_negative_int, default=5, help="overlays of the N worst images")
    r.add_argument("--compare", type=Path, metavar="CKPT2", help="also evaluate this checkpoint and compare")
    r.add_argument("--compare-name", help="name of the --compare model in the report")
    r.add_argument("--write-labelids", type=Path, metavar="DIR", help="labelId PNGs for Cityscapes' server")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _predict_options(args: argparse.Namespace) -> PredictOptions:
    tta = PredictOptions(scales=tuple(args.scales), flip=args.flip)
    if not args.sliding_window:
        if args.crop is not None or args.stride is not None:
            raise EvaluationError("--crop / --stride only apply with --sliding-window; add --sliding-window")
        return tta
    if args.crop is None:
        raise EvaluationError("--sliding-window needs --crop H W (e.g. --crop 512 1024)")
    crop = (args.crop[0], args.crop[1])
    stride = (args.stride[0], args.stride[1]) if args.stride else (max(1, crop[0] // 2), max(1, crop[1] // 2))
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise EvaluationError(
            f"--stride {stride[0]} {stride[1]} is larger than --crop {crop[0]} {crop[1]}; "
            "windows would leave gaps: use a stride <= the crop"
        )
    return replace(tta, sliding_window=True, crop=crop, stride=stride)


def class_mismatch(
    expected: Sequence[str], actual: Sequence[str], *, expected_label: str, actual_label: str
) -> str | None:
    """A sentence saying how two class lists differ (counts and names), or None when they are equal."""
    a, b = [str(n) for n in expected], [str(n) for n in actual]
    if a == b:
        return None

    def short(items: Sequence[str], limit: int = 8) -> str:
        return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    if len(a) == len(b):
        diffs = [f"{i}: {x!r} vs {y!r}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return (
            f"{expected_label} and {actual_label} both have {len(a)} classes but the names differ at "
            f"class id {short(diffs)}"
        )
    text = f"{expected_label} has {len(a)} classes but {actual_label} has {len(b)}"
    for label, mine, theirs in ((expected_label, a, b), (actual_label, b, a)):
        only = [repr(n) for n in mine if n not in theirs]
        text += f"; only in {label}: {short(only)}" if only else ""
    return text


def _require_classes(
    args: argparse.Namespace, meta: ModelMeta, classes: Sequence[str], label: str, fix: str
) -> None:
    """:class:`EvaluationError` (the difference, then ``fix``) unless ``classes`` are the checkpoint's."""
    checkpoint = f"checkpoint {args.checkpoint}"
    if problem := class_mismatch(meta.class_names, classes, expected_label=checkpoint, actual_label=label):
        raise EvaluationError(f"{problem}; {fix}")


def _build_dataset(args: argparse.Namespace, info: ModelMeta) -> Any:
    kwargs: dict[str, Any] = {"unknown_labels": args.unknown_labels}
    if args.dataset == "cityscapes":
        kwargs["label_type"] = args.label_type
    if args.classes_file is not None:  # a folder data set (checked in main)
        kwargs["classes_file"] = args.classes_file
    transform = eval_transform(mean=info.mean, std=info.std)
    dataset = build_dataset(args.dataset, args.data_root, args.split, transform=transform, **kwargs)
    if len(dataset) == 0:
        raise DataError(
            f"the {args.split!r} split of {args.dataset} data at {args.data_root} holds no image; "
            "check --data-root and --split"
        )
    return dataset


def labelid_filename(image_path: str | os.PathLike[str]) -> str:
    """``frankfurt_000000_000294_leftImg8bit.png`` for a Cityscapes image (any extension)."""
    return f"{Path(image_path).stem.removesuffix('_leftImg8bit')}_leftImg8bit.png"


def main(argv: list[str]) -> int:
    """Returns the exit code: 2 with one ``error:`` line for bad input (data and checkpoint errors reach
    :mod:`fcn.cli`, which prints them so). A failed run removes the empty folders it created."""
    args = build_parser().parse_args(argv)
    created = missing_dirs(args.output)
    if args.write_labelids is not None:
        created = missing_dirs(args.write_labelids) + created
    try:
        options = _predict_options(args)
        world = world_from_env()
        device = resolve_device(rank_device(args.device, world))
        if args.write_labelids is not None and args.dataset != "cityscapes":
            raise EvaluationError(
                "--write-labelids writes Cityscapes labelIds; use it with --dataset cityscapes"
            )
        if args.classes_file is not None and args.dataset != "folder":
            raise EvaluationError("--classes-file describes a folder data set; use it with --dataset folder")
        if args.compare is None and args.compare_name is not None:
            raise EvaluationError("--compare-name names the --compare model; add --compare CKPT2")
        check_writable(args.output, "--output", error=ReportError)
        if args.write_labelids is not None:
            check_writable(args.write_labelids, "--write-labelids", error=ReportError)
        with process_group(device, world):
            return _evaluate(args, options, device, world)
    except (EvaluationError, InferenceError, ReportError, DistributedError) as err:
        remove_empty_dirs(created)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        remove_empty_dirs(created)
        raise


def _evaluate(args: argparse.Namespace, options: PredictOptions, device: torch.device, world: World) -> int:
    onednn = onednn_convolutions()
    predictor = load_predictor(args.checkpoint, device=device, precision=args.precision, onednn=onednn)
    set_exposure_target(predictor, args.exposure_target)
    meta = predictor.meta
    other: Predictor | None = None
    if args.compare is not None:
        other = load_predictor(args.compare, device=device, precision=args.precision, onednn=onednn)
        set_exposure_target(other, args.exposure_target)
        same = "compare models trained on the same classes"
        _require_classes(args, meta, other.meta.class_names, f"--compare checkpoint {args.compare}", same)
    names = _model_names(args, meta, other.meta if other else None)
    dataset = _build_dataset(args, meta)
    data = f"the {args.dataset} data at {args.data_root}"
    _require_classes(args, meta, dataset.classes, data, "evaluate on the data set the model was trained for")
    common: dict[str, Any] = {
        "options": options,
        "data_root": args.data_root,
        "ignore_index": dataset.ignore_index,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "limit": args.limit,
        "worst": args.worst,
        "progress": not args.no_progress and world.main,
        "indices": _share(dataset, args.limit, world),
    }
    writer = None
    if args.write_labelids is not None:

        def writer(index: int, pred: Tensor) -> None:  # labelId PNGs for the Cityscapes server
            path = args.write_labelids / labelid_filename(dataset.samples[index][0])
            write_png_atomic(path, train_ids_to_label_ids(pred.numpy()))

    result = evaluate_model(predictor, dataset, on_prediction=writer, desc=names[0], **common)
    result = gather_pass(result, worst=args.worst)
    del predictor
    compare_result = None
    if other is not None:
        same_norm = (other.meta.mean, other.meta.std) == (meta.mean, meta.std)
        other_data = dataset if same_norm else _build_dataset(args, other.meta)
        compare_result = evaluate_model(other, other_data, per_image=False, desc=names[1], **common)
        compare_result = gather_pass(compare_result, worst=0)
    if not world.main:  # rank 0 writes the report
        return 0
    report_meta: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": meta.model_name,
        "dataset": args.dataset,
        "data_root": str(args.data_root),
        "split": args.split,
        "images": result.images,
        "prediction": options.describe()
        + (f", exposure to grey {meta.exposure_target:g}" if meta.exposure_target is not None else ""),
        "exposure_target": meta.exposure_target,
        "options": {
            **asdict(options),  # sliding_window, crop, stride, scales, flip
            "batch_size": args.batch_size,
            "device": str(device),
            **{flag: getattr(args, flag) for flag in ("precision", "num_workers", "limit", "worst")},
        },
        **result.timing(),
    }
    if args.write_labelids is not None:
        report_meta["labelids"] = str(args.write_labelids)
    if compare_result is not None:
        report_meta["compare_checkpoint"] = str(args.compare)
        keys = ("seconds", "images_per_second", "metric_overhead")
        report_meta |= {f"compare_{k}": v for k, v in compare_result.timing().items() if k in keys}
    metrics = write_report(
        args.output,
        confmat=result.confmat,
        class_names=meta.class_names,
        palette=meta.palette,
        per_image=result.per_image,
        worst_images=result.worst,
        meta=report_meta,
        compare={names[1]: compare_result.confmat} if compare_result is not None else None,
        model_name=names[0],
    )
    print(format_summary_table(metrics))
    for name, s in (metrics["comparison"] or {"models": {}})["models"].items():
        miou = "n/a" if s["mean_iou"] is None else f"{100 * s['mean_iou']:.2f} %"
        print(f"mean IoU {name}: {miou}")
    t = result.timing()
    print(
        f"{result.images} images in {t['seconds']:.1f} s ({t['images_per_second']:.2f} img/s); "
        f"metric overhead {100 * t['metric_overhead']:.2f} % of the pass"
    )
    print(f"report: {args.output}")
    return 0


def _share(dataset: Any, limit: int | None, world: World) -> list[int] | None:
    """This rank's images under torchrun, balanced by pixels (None, all of them, for one process)."""
    if not world.distributed:
        return None
    count = len(dataset) if limit is None else min(limit, len(dataset))
    weights = input_weights([Path(dataset.samples[i][0]) for i in range(count)])
    return split_balanced(weights, world.size)[world.rank]


def _model_names(args: argparse.Namespace, meta: ModelMeta, other: ModelMeta | None) -> list[str]:
    """The report's names: the evaluated model's, then the --compare model's (made distinct)."""
    main_name = meta.model_name
    if other is None:
        return [main_name]
    if args.compare_name == main_name:
        raise EvaluationError(f"--compare-name {main_name!r} is the evaluated model's name; choose another")
    if args.compare_name is not None:
        return [main_name, args.compare_name]
    name = other.model_name
    return [main_name, f"{name} ({Path(args.compare).stem})" if name == main_name else name]
