"""Training curves from CSVLogger runs: val mIoU and training loss against epoch, several runs in one PNG.

``python scripts/plot_curves.py outputs/camvid_cpu/student outputs/camvid_cpu/distill_offline \\
    --labels student offline --output curves.png``

A run is a ``metrics.csv`` or a folder: every ``metrics.csv`` below it is read in version order
(``version_0``, ``version_1`` ... of a resumed run), a later file's epochs replacing an earlier one's.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fcn.data.errors import DataError
from fcn.data.io import atomic_path


@dataclass
class Curves:
    """One run's per-epoch values: ``metric`` (validation) and ``loss`` (mean of the epoch's steps)."""

    label: str
    metric: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)


def metrics_files(run: str | Path) -> list[Path]:
    """The ``metrics.csv`` files of a run (a file, or every one below a folder, in version order)."""
    path = Path(run)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"run {path} does not exist; pass a metrics.csv or a run folder")

    def natural(p: Path) -> tuple:  # version_10 after version_9
        return tuple(
            tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)) for part in p.parts
        )

    found = sorted(path.rglob("metrics.csv"), key=natural)
    if not found:
        raise FileNotFoundError(f"no metrics.csv below {path}; is it a run folder with a CSVLogger?")
    return found


def _number(text: str | None) -> float | None:
    """A finite float, or None (for None, "" and anything else)."""
    with contextlib.suppress(TypeError, ValueError):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def read_curves(
    run: str | Path, *, label: str | None = None, metric: str = "val/mIoU", loss: str = "train/loss"
) -> Curves:
    """Read a run's ``metric`` (last value per epoch) and ``loss`` (mean per epoch) from its CSV logs."""
    curves = Curves(label or (Path(run).name if Path(run).is_dir() else str(run)))
    for path in metrics_files(run):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "epoch" not in reader.fieldnames:
                raise DataError(f"{path} is not a CSVLogger metrics file (no 'epoch' column)")
            losses: dict[int, list[float]] = {}  # this file's: they replace an earlier file's epochs
            for row in reader:
                if (epoch := _number(row.get("epoch"))) is None:
                    continue
                if (value := _number(row.get(metric))) is not None:
                    curves.metric[int(epoch)] = value
                if (value := _number(row.get(loss))) is not None:
                    losses.setdefault(int(epoch), []).append(value)
        curves.loss.update({e: sum(v) / len(v) for e, v in losses.items()})
    if not curves.metric and not curves.loss:
        raise DataError(
            f"run {run} logged neither {metric!r} nor {loss!r}; choose the columns with --metric/--loss"
        )
    return curves


def plot_curves(
    runs: Sequence[Curves], output: str | Path, *, metric: str = "val/mIoU", loss: str = "train/loss"
) -> Path:
    """Plot ``metric`` and ``loss`` against epoch (0-based, as logged) for every run into one PNG."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_metric, ax_loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        for ax, values, style in ((ax_metric, run.metric, "o-"), (ax_loss, run.loss, "-")):
            if values:
                epochs = sorted(values)
                ax.plot(epochs, [values[e] for e in epochs], style, ms=3, color=f"C{i % 10}", label=run.label)
    for ax, name in ((ax_metric, metric), (ax_loss, f"{loss} (epoch mean)")):
        ax.set(xlabel="epoch", title=name)
        ax.grid(alpha=0.3)
    ax_metric.legend(loc="best", fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=100, format=output.suffix.lstrip(".") or None)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot_curves.py", description="Plot val mIoU and train loss of CSVLogger runs against epoch."
    )
    parser.add_argument("runs", nargs="+", help="metrics.csv files or run folders (searched recursively)")
    parser.add_argument("--output", default="curves.png", help="the PNG to write (default curves.png)")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run (default: folder names)")
    parser.add_argument("--metric", default="val/mIoU", help="validation column (default val/mIoU)")
    parser.add_argument("--loss", default="train/loss", help="training column (default train/loss)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    labels = args.labels or [None] * len(args.runs)
    runs = [read_curves(r, label=lb, metric=args.metric, loss=args.loss) for r, lb in zip(args.runs, labels)]
    path = plot_curves(runs, args.output, metric=args.metric, loss=args.loss)
    print(f"wrote {path}")
    return 0
