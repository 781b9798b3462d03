"""The evaluation report: one directory of markdown, JSON, CSV and PNG files from a confusion matrix.

Layout written by :func:`write_report`::

    report.md             summary of the four metrics, per-class table, meta, comparison, worst images
    metrics.json          the same numbers, machine-readable (fractions in [0, 1]; null = n/a)
    per_class.csv         class_id, class, iou, accuracy, pixel_share, gt_pixels, pred_pixels
    confusion_matrix.png  row-normalised confusion matrix (rows ground truth, columns prediction)
    per_image.csv         one row per image (only when per-image results are given)
    worst/NN_<name>.png   image | ground-truth colours | prediction colours, worst first (when given)

Every file is written atomically; percentages are the JSON fractions times 100, n/a written "n/a".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fcn.data.io import check_writable, colorize, encode_png, write_bytes_atomic
from fcn.metrics import SUMMARY_KEYS, segmentation_scores
from fcn.palette import default_palette

__all__ = ["ReportError", "format_summary_table", "write_report"]

METRIC_LABELS = {
    "pixel_accuracy": "pixel accuracy",
    "mean_accuracy": "mean accuracy",
    "mean_iou": "mean IoU",
    "fw_iou": "frequency-weighted IoU",
}
NA = "n/a"
_PER_CLASS = ("per_class_iou", "per_class_accuracy", "pixel_share")


class ReportError(OSError):
    """The report directory or one of its files cannot be written."""


def _pct(x: float | None, digits: int = 2) -> str:
    return NA if x is None or math.isnan(x) else f"{100.0 * x:.{digits}f}"


def _signed_pct(x: float | None) -> str:
    text = NA if x is None else f"{100.0 * x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _num(x: float | None) -> str:
    """A CSV number: full precision, n/a for missing."""
    return NA if x is None or math.isnan(x) else repr(float(x))


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: tensors/arrays to lists, NaN/inf to None, paths and the rest to str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Tensor | np.ndarray | np.generic):
        return _jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj if obj is None or isinstance(obj, bool | int | str) else str(obj)


def _palette_array(palette: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    arr = np.asarray(default_palette(num_classes) if palette is None else palette, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < num_classes:
        raise ValueError(
            f"palette must hold one RGB triple per class ({num_classes}), got shape {arr.shape}; "
            "pass the data set's palette or None for default colours"
        )
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError("palette colours must be RGB values in [0, 255]")
    return arr[:num_classes].astype(np.uint8)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _atomic_write(path: Path, data: bytes) -> None:
    """:func:`fcn.data.io.write_bytes_atomic` with fsync; an OSError becomes a :class:`ReportError`."""
    try:
        write_bytes_atomic(path, data, fsync=True)
    except OSError as err:
        raise ReportError(
            f"cannot write the evaluation report to '{path.parent}': {err.strerror or err}; "
            "choose another output directory or make this one writable"
        ) from err


def confusion_matrix_png(confmat: Tensor | np.ndarray, class_names: Sequence[str]) -> bytes:
    """PNG bytes of the row-normalised confusion matrix (%), class names on both axes (Agg backend)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cm = _to_numpy(confmat).astype(np.float64)
    n = cm.shape[0]
    with np.errstate(invalid="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)  # 0 / 0 = NaN: a class absent from the gt
    side = max(6.0, 0.5 * n + 3.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")  # grey rows: classes absent from the gt
    im = ax.imshow(np.ma.masked_invalid(norm * 100.0), cmap=cmap, vmin=0.0, vmax=100.0)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(n), class_names, fontsize=9)
    ax.set(xlabel="prediction", ylabel="ground truth")
    ax.set_title("Confusion matrix (% of each ground-truth class)")
    size = 8 if n <= 20 else 6
    for (i, j), v in np.ndenumerate(norm):
        if n <= 40 and v >= 0.005:  # no numbers on large matrices; False for NaN
            colour = "white" if v > 0.5 else "black"
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=size, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="%")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def side_by_side(image: Any, target: Any, pred: Any, *, lut: np.ndarray) -> np.ndarray:
    """``image | ground-truth colours | prediction colours`` as one RGB uint8 array."""
    img, gt, pr = _to_numpy(image), _to_numpy(target), _to_numpy(pred)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"worst-image 'image' must be RGB (H, W, 3) uint8, got {img.dtype} {img.shape}")
    if gt.shape != img.shape[:2] or pr.shape != img.shape[:2]:
        raise ValueError(
            f"worst-image arrays disagree: image {img.shape[:2]}, target {gt.shape}, pred {pr.shape}; "
            "pass prediction and ground truth at the image's resolution"
        )
    sep = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)  # a 4-pixel white gap
    return np.concatenate([img, sep, colorize(gt, lut), sep, colorize(pr, lut)], axis=1)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def per_class_csv(scores: Mapping[str, Any]) -> str:
    """CSV text, one row per class: ``class_id,class,iou,accuracy,pixel_share,gt_pixels,pred_pixels``."""
    rows = [
        [i, name, *(_num(scores[k][i]) for k in _PER_CLASS), scores["gt_pixels"][i], scores["pred_pixels"][i]]
        for i, name in enumerate(scores["class_names"])
    ]
    header = ["class_id", "class", "iou", "accuracy", "pixel_share", "gt_pixels", "pred_pixels"]
    return _csv_text(header, rows)


def per_image_csv(per_image: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of per-image results: ``file,mean_iou,pixel_accuracy`` first, then any other keys."""
    keys: list[str] = ["file", "mean_iou", "pixel_accuracy"]
    for row in per_image:
        keys += [k for k in row if k not in keys]

    def cell(v: Any) -> Any:
        return _num(v) if v is None or isinstance(v, float | np.floating) else v

    return _csv_text(keys, [[cell(row.get(k)) for k in keys] for row in per_image])


def _comparison(
    scores: Mapping[str, Any], compare: Mapping[str, Tensor | np.ndarray], model_name: str
) -> dict[str, Any]:
    """Metrics and per-class IoU of the evaluated model (``scores``) and of each ``compare`` matrix, with
    ``delta[name]`` = evaluated - ``name`` (positive: the evaluated one is better; None if either is n/a).
    """

    def pick(s: Mapping[str, Any]) -> dict[str, Any]:
        return {**{k: s[k] for k in SUMMARY_KEYS}, "per_class_iou": list(s["per_class_iou"])}

    def diff(a: Any, b: Any) -> Any:  # per-class lists element-wise
        if isinstance(a, list):
            return [diff(x, y) for x, y in zip(a, b)]
        return None if a is None or b is None else a - b

    models, delta = {model_name: pick(scores)}, {}
    for name, other in compare.items():
        name = str(name)
        if (shape := _to_numpy(other).shape) != (scores["num_classes"],) * 2:
            raise ValueError(
                f"compare[{name!r}] has shape {shape} but the report has "
                f"{scores['num_classes']} classes; compare models evaluated on the same classes"
            )
        if name == model_name:
            raise ValueError(f"compare name {name!r} clashes with model_name; give the models distinct names")
        models[name] = pick(segmentation_scores(other, scores["class_names"]))
        delta[name] = {k: diff(v, models[name][k]) for k, v in models[model_name].items()}
    return {"model": model_name, "class_names": list(scores["class_names"]), "models": models, "delta": delta}


def format_summary_table(scores: Mapping[str, Any]) -> str:
    """Plain-text table of the four metrics and per-class IoU / accuracy / pixel share (in %)."""
    names = scores["class_names"]
    lines = [f"{METRIC_LABELS[k]:<24}{_pct(scores[k]):>8} %" for k in SUMMARY_KEYS]
    width = max([5, *(len(n) for n in names)])
    lines += ["", f"{'id':>3}  {'class':<{width}}  {'IoU %':>7}  {'acc %':>7}  {'share %':>7}"]
    for i, name in enumerate(names):
        iou, acc, share = (_pct(scores[key][i]) for key in _PER_CLASS)
        lines.append(f"{i:>3}  {name:<{width}}  {iou:>7}  {acc:>7}  {share:>7}")
    return "\n".join(lines)


def _meta_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(_jsonable(v)) if isinstance(v, Mapping | list | tuple) else str(v)


def _comparison_md(comparison: Mapping[str, Any]) -> list[str]:
    """The "Comparison" section: metrics, then per-class IoU, of every model and the deltas."""
    names, refs = list(comparison["models"]), list(comparison["delta"])
    head = "| | " + " | ".join(_md_escape(n) for n in names)
    head += "".join(f" | Δ vs {_md_escape(r)}" for r in refs) + " |"
    rule = "| --- |" + " ---: |" * (len(names) + len(refs))

    def row(label: str, get: Callable[[Mapping[str, Any]], Any]) -> str:
        cells = [_pct(get(comparison["models"][n])) for n in names]
        cells += [_signed_pct(get(comparison["delta"][r])) for r in refs]
        return f"| {label} | " + " | ".join(cells) + " |"

    out = ["## Comparison", "", f"Δ = {_md_escape(comparison['model'])} − reference, in points.", ""]
    out += [head, rule, *(row(METRIC_LABELS[k], lambda d, k=k: d[k]) for k in SUMMARY_KEYS)]
    out += ["", "Per-class IoU %:", "", head, rule]
    classes = enumerate(comparison["class_names"])
    out += [row(_md_escape(c), lambda d, i=i: d["per_class_iou"][i]) for i, c in classes]
    return [*out, ""]


def render_markdown(
    scores: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
    comparison: Mapping[str, Any] | None = None,
    per_image_summary: Mapping[str, Any] | None = None,
    worst: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The text of report.md."""
    out = ["# Evaluation report", ""]
    if meta:
        out += ["| | |", "| --- | --- |"]
        out += [f"| {_md_escape(k)} | {_md_escape(_meta_value(v))} |" for k, v in meta.items()]
        out.append("")
    out += [
        "## Summary",
        "",
        f"{scores['num_pixels']} labelled pixels, {scores['num_classes']} classes. "
        "Metrics of Long et al. (FCN); n/a classes are left out of the means.",
        "",
        "| metric | % |",
        "| --- | ---: |",
        *(f"| {METRIC_LABELS[k]} | {_pct(scores[k])} |" for k in SUMMARY_KEYS),
        "",
        "## Per class",
        "",
        "| id | class | IoU % | accuracy % | pixel share % |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(scores["class_names"]):
        pcts = " | ".join(_pct(scores[k][i]) for k in _PER_CLASS)
        out.append(f"| {i} | {_md_escape(name)} | {pcts} |")
    out += [
        "",
        "IoU n/a: the class is neither in the ground truth nor predicted. "
        "Accuracy n/a: the class is not in the ground truth.",
        "",
    ]
    if comparison:
        out += _comparison_md(comparison)
    out += ["## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", ""]
    if per_image_summary:
        out += [
            "## Per image",
            "",
            f"{per_image_summary['count']} images; mean of per-image mIoU "
            f"{_pct(per_image_summary['mean_of_mean_iou'])} %, median "
            f"{_pct(per_image_summary['median_mean_iou'])} %. All rows: [per_image.csv](per_image.csv).",
            "",
        ]
    if worst:
        out += ["## Worst images", "", "Each: image | ground truth | prediction.", ""]
        for w in worst:
            label = _md_escape(w["name"]) + (f" (mIoU {_pct(w['mean_iou'])} %)" if "mean_iou" in w else "")
            out += [f"### {label}", "", f"![{_md_escape(w['name'])}]({w['file']})", ""]
    return "\n".join(out)


def write_report(
    output_dir: str | os.PathLike[str],
    *,
    confmat: Tensor | np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | None = None,
    per_image: Sequence[Mapping[str, Any]] | None = None,
    worst_images: Sequence[Mapping[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
    compare: Mapping[str, Tensor | np.ndarray] | None = None,
    model_name: str = "model",
) -> dict[str, Any]:
    """Write the report directory (see the module docstring) and return the content of metrics.json.

    - ``confmat``: the evaluated model's ``(C, C)`` matrix (e.g. ``ConfusionMatrix.compute()``).
    - ``per_image``: rows of ``file`` and :func:`~fcn.metrics.image_scores` (more columns allowed).
    - ``worst_images``: in the order to show, dicts with ``name``, ``image`` (RGB ``(H, W, 3)`` uint8),
      ``target`` and ``pred`` (``(H, W)`` class ids; void drawn black) and optionally ``mean_iou``.
    - ``meta``: free key/values shown at the top; ``compare``: other models' matrices by name, compared
      with ``model_name`` side by side.

    Raises :class:`ReportError` (an ``OSError``) naming the directory when it cannot be written, and
    ``ValueError`` for inconsistent inputs (before anything is written)."""
    out_dir = Path(output_dir)
    scores = segmentation_scores(confmat, class_names)
    comparison = _comparison(scores, compare, model_name) if compare else None
    lut = _palette_array(palette, scores["num_classes"]) if worst_images else None
    worst: list[dict[str, Any]] = []
    panels: list[np.ndarray] = []
    for rank, w in enumerate(worst_images or [], start=1):
        missing = [k for k in ("name", "image", "target", "pred") if k not in w]
        if missing:
            raise ValueError(f"worst image #{rank} lacks {missing}; give name, image, target and pred")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(w["name"])).stem or "image")[:80]
        worst.append({"name": str(w["name"]), "file": f"worst/{rank:02d}_{stem}.png"})
        if "mean_iou" in w:
            worst[-1]["mean_iou"] = _jsonable(w["mean_iou"])
        panels.append(side_by_side(w["image"], w["target"], w["pred"], lut=lut))

    files = ["report.md", "metrics.json", "per_class.csv", "confusion_matrix.png"]
    per_image_summary = None
    if per_image is not None:
        vals = [float(v) for r in per_image if (v := r.get("mean_iou")) is not None and not math.isnan(v)]
        per_image_summary = {
            "count": len(per_image),
            "mean_of_mean_iou": float(np.mean(vals)) if vals else None,
            "median_mean_iou": float(np.median(vals)) if vals else None,
        }
        files.append("per_image.csv")
    files += [entry["file"] for entry in worst]

    metrics: dict[str, Any] = {
        **scores,
        "model_name": model_name,
        "meta": dict(meta or {}),
        "confusion_matrix": _to_numpy(confmat).astype(np.int64).tolist(),
        "comparison": comparison,
        "per_image": per_image_summary,
        "worst_images": worst,
        "files": files,
    }
    metrics = _jsonable(metrics)
    markdown = render_markdown(
        scores, meta=meta, comparison=comparison, per_image_summary=per_image_summary, worst=worst
    )

    check_writable(out_dir, "--output", error=ReportError)
    if worst:
        check_writable(out_dir / "worst", "--output", error=ReportError)
        for entry, rgb in zip(worst, panels):
            _atomic_write(out_dir / entry["file"], encode_png(rgb))
    _atomic_write(out_dir / "confusion_matrix.png", confusion_matrix_png(confmat, scores["class_names"]))
    _atomic_write(out_dir / "per_class.csv", per_class_csv(scores).encode())
    if per_image is not None:
        _atomic_write(out_dir / "per_image.csv", per_image_csv(per_image).encode())
    _atomic_write(out_dir / "metrics.json", (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
    _atomic_write(out_dir / "report.md", markdown.encode())  # last: its presence means a complete report
    return metrics
