"""Batch inference over an image, a folder (recursive), a glob or a text file of paths.

``python scripts/predict.py --checkpoint CKPT --input PATH --output DIR`` writes, for every input
``REL/name.ext`` (its path relative to the input folder), ``DIR/<kind>/REL/name.png`` for each selected
output kind: ``label`` (class ids), ``color`` (palette colours), ``overlay`` (image blended with the
colours) and ``confidence`` (max softmax probability, 8 or 16 bit).

Pipeline: a batch sampler groups images of equal size so every image runs at its own resolution; the model
runs under ``torch.inference_mode``; a thread pool (``--writers``) encodes and writes the PNGs (each
atomically). With spare cores (a GPU, or a CPU with 2+ cores beyond the model's threads) a DataLoader
(``--num-workers`` processes) decodes and the PNGs are written while the next batch computes; without them
the pool decodes and writes between forward passes, so nothing preempts the model's threads (``--overlap``
/ ``--no-overlap`` force either). Unreadable files are reported and skipped (exit code 1);
``--skip-existing`` resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from fcn.checkpoint import require_file
from fcn.inference import (
    DEVICES,
    IMAGE_EXTENSIONS,
    PRECISIONS,
    ImageReadError,
    InferenceError,
    Predictor,
    class_ids,
    colorize,
    deflate_label_rows,
    forward_throughput,
    label_png,
    labels_and_confidence,
    load_predictor,
    missing_dirs,
    overlay,
    predict_logits,
    probe_size,
    read_image_rgb,
    remove_empty_dirs,
    resolve_device,
    write_bytes_atomic,
    write_png_atomic,
)
from fcn.tuning import keeps_freed_memory, onednn_convolutions

OUTPUT_KINDS = ("label", "color", "overlay", "confidence")
DEFAULT_OUTPUTS = ("label", "color")
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})


# An empty hidden file marking a folder as predict's output: later runs never take its PNGs as input
OUTPUT_MARKER = ".fcn-predict-output"


class PredictError(ValueError):
    """A user error of the predict command (bad option combination); printed as one ``error:`` line."""


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_predict`; ``summary`` counts the images whose outputs were written."""

    def __init__(self, summary: PredictSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One input image and its output path stem relative to the output folder of each kind."""

    path: Path
    rel: Path


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


def _is_output_dir(folder: Path) -> bool:
    """Whether ``folder`` holds the outputs of a predict run (:data:`OUTPUT_MARKER`)."""
    return (folder / OUTPUT_MARKER).is_file()


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    base = []
    for part in parts:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def _make_items(paths: Sequence[Path], base: Path) -> list[InputItem]:
    """Relative output stems; inputs that share a stem in one folder (a.png, a.jpg) keep their extension."""
    rels: list[Path] = []
    for p in paths:
        try:
            rels.append(p.relative_to(base))
        except ValueError:
            rels.append(Path(p.name))
    stems: dict[Path, int] = {}
    for r in rels:
        stems[r.with_suffix("")] = stems.get(r.with_suffix(""), 0) + 1
    items = []
    for p, r in zip(paths, rels):
        stem = r.with_suffix("")
        if stems[stem] > 1:
            stem = r.with_name(r.name.replace(".", "_"))
        items.append(InputItem(path=p, rel=stem))
    return items


def collect_inputs(spec: str | Path, *, exclude: Path | None = None) -> tuple[list[InputItem], int]:
    """Expand ``spec`` into images and count the non-image files that were ignored.

    ``spec`` is an image, a folder (searched recursively for image extensions; hidden entries, ``exclude``
    and the output folders of earlier runs skipped), a glob (``**`` recursive; earlier runs' outputs
    skipped) or a ``.txt`` / ``.lst`` / ``.list`` file with one path a line (relative paths from the list's
    folder; ``#`` comments). Listed files are tried whatever their extension. Raises
    :class:`FileNotFoundError` for a missing input or one without images.
    """
    text = str(spec)
    path = Path(text).expanduser()
    exclude = exclude.resolve() if exclude is not None else None
    ignored = 0
    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            root_path = Path(root)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and not _inside(root_path / d, exclude)
                and not _is_output_dir(root_path / d)
            )
            for name in sorted(files):
                p = root_path / name
                if name.startswith("."):
                    continue
                if _is_image_name(p):
                    found.append(p)
                else:
                    ignored += 1
        items = _make_items(found, path)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FileNotFoundError(f"cannot read the list of paths {path} ({err})") from err
        listed: dict[Path, None] = {}
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            listed[Path(os.path.abspath(p if p.is_absolute() else path.parent / p))] = None
        paths = list(listed)
        base = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else path.parent
        items = _make_items(paths, base)
    elif path.is_file():
        items = [InputItem(path=path, rel=Path(path.stem))]
    elif glob.has_magic(text):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
        base = _glob_base(os.path.expanduser(text))
        parents = {d for m in matches for d in m.parents if d.is_relative_to(base)}
        outputs = {d for d in parents if _is_output_dir(d)}
        files = [m for m in matches if m.is_file() and not _inside(m, exclude)]
        files = [m for m in files if not any(d in outputs for d in m.parents)]
        images = [m for m in files if _is_image_name(m)]
        ignored = len(files) - len(images)
        items = _make_items(images, base)
    else:
        raise FileNotFoundError(
            f"input {text} does not exist; pass an image, a folder, a glob in quotes or a .txt list of paths"
        )
    if not items:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"no images found in {text} (looked for {exts})")
    return items, ignored


def output_paths(item: InputItem, output: Path, kinds: Sequence[str]) -> dict[str, Path]:
    """``{kind: output / kind / rel.png}`` for the selected output kinds."""
    return {k: output / k / item.rel.with_name(item.rel.name + ".png") for k in kinds}


def check_output_dir(output: Path) -> None:
    """Create ``output`` and prove it is writable by writing :data:`OUTPUT_MARKER` into it;
    :class:`PermissionError` with the fix otherwise."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / OUTPUT_MARKER).touch()
    except OSError as err:
        raise PermissionError(
            f"cannot write to the output folder {output} ({err.strerror or err}); choose another --output"
        ) from err


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


class StageTimes:
    """CPU time per stage of predict's per-image work, summed over the threads that did it, and the forward
    passes' wall time: where the time goes (printed by ``--benchmark``).

    Stages: ``decode`` (read + decode a file), ``normalise`` (``cv2.LUT`` into the batch buffer),
    ``arg-max``, ``encode`` (deflate + PNG chunks of the label/colour maps), ``write`` (folders, temporary
    file, rename), ``other outputs`` (overlay, confidence: encode + write). Only this process's threads
    are timed: with ``--overlap`` the DataLoader worker processes' decoding is not.
    """

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.forward_wall = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.cpu[stage] += spent


_stage_times: StageTimes | None = None  # set by benchmark_predict while it runs


def _stage(name: str) -> contextlib.AbstractContextManager[None]:
    return _stage_times(name) if _stage_times is not None else contextlib.nullcontext()


class ImageListDataset(Dataset):
    """Decodes input images: ``{"index", "image" (uint8 HWC, resized when asked), "size", "original"}``.

    A file that cannot be read gives ``{"index", "error"}`` instead of raising, so one bad file does not
    stop the run. ``original`` (the full-size image) is only kept when resizing and an overlay is needed.
    """

    def __init__(
        self,
        items: Sequence[InputItem],
        *,
        resize: tuple[int, int] | None = None,
        keep_original: bool = False,
    ) -> None:
        self.items = list(items)
        self.resize = resize
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.items[index].path
        try:
            with _stage("decode"):
                image = read_image_rgb(path)
        except ImageReadError as err:
            return {"index": index, "error": str(err)}
        size = image.shape[:2]
        sample: dict[str, Any] = {"index": index, "size": size, "original": None}
        if self.resize is not None:
            if self.keep_original:
                sample["original"] = image
            image = cv2.resize(image, (self.resize[1], self.resize[0]), interpolation=cv2.INTER_LINEAR)
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image))
        return sample


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images of equal shape; a batch with several shapes (a wrong header) splits into groups."""
    errors = [(s["index"], s["error"]) for s in samples if "error" in s]
    by_shape: OrderedDict[tuple[Any, ...], list[dict[str, Any]]] = OrderedDict()
    for s in samples:
        if "error" not in s:
            by_shape.setdefault((*s["image"].shape, s["image"].dtype), []).append(s)
    groups = [
        {
            "indices": [s["index"] for s in group],
            "images": _stack(group),
            "normalized": group[0]["image"].dtype == torch.float32,
            "sizes": [tuple(s["size"]) for s in group],
            "originals": [s["original"] for s in group],
        }
        for group in by_shape.values()
    ]
    return {"groups": groups, "errors": errors}


def _stack(group: Sequence[dict[str, Any]]) -> torch.Tensor:
    """The group's images as one batch: the shared batch buffer itself when the images fill it in order
    (normalised in place by :class:`_ThreadedBatches`), else a stacked copy."""
    buffer = group[0].get("buffer")
    in_order = all(s.get("buffer") is buffer and s.get("slot") == k for k, s in enumerate(group))
    if buffer is not None and len(buffer) == len(group) and in_order:
        return torch.from_numpy(buffer)
    return torch.stack([s["image"] for s in group])


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Batches of up to ``batch_size`` indices that share a key (an image size).

    Indices with key ``None`` (size unknown) get a batch of their own. Batches are ordered by their first
    index, so the run follows the input order; only the last batch of each size may be short.
    """

    def __init__(self, keys: Sequence[Hashable | None], batch_size: int) -> None:
        if batch_size < 1:
            raise PredictError(f"--batch-size must be at least 1, got {batch_size}")
        groups: OrderedDict[Hashable, list[int]] = OrderedDict()
        batches: list[list[int]] = []
        for i, key in enumerate(keys):
            if key is None:
                batches.append([i])
            else:
                groups.setdefault(key, []).append(i)
        for indices in groups.values():
            batches.extend(indices[j : j + batch_size] for j in range(0, len(indices), batch_size))
        self.batches = sorted(batches, key=lambda b: b[0])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_: int) -> None:
    # No cv2.setNumThreads here: reconfiguring OpenCV's thread pool in a forked child deadlocks when the
    # parent's pool had threads; run_predict switches the parent's pool off before forking instead.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def probe_sizes(items: Sequence[InputItem], *, threads: int = 8) -> list[tuple[int, int] | None]:
    """Header sizes of all items (in a thread pool; ``None`` where unknown)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda it: probe_size(it.path), items))


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    """Counts and speed of one run."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    predictor: Predictor | None = field(default=None, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        extra = f", {self.ignored} non-image files ignored" if self.ignored else ""
        return (
            f"done {self.done}, skipped {self.skipped}, failed {self.failed}{extra} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)"
        )


def _write_outputs(
    paths: dict[str, Path],
    *,
    label: np.ndarray | None,
    logits: np.ndarray | None,
    confidence: np.ndarray | None,
    image: np.ndarray | None,
    palette: list[list[int]],
    alpha: float,
) -> None:
    """Encode and write one image's outputs (in a writer thread); ``label`` comes from ``logits`` if None."""
    if label is None and logits is not None:
        # (C, H, W) logits -> ids, in this writer thread rather than on the model's threads
        with _stage("arg-max"):
            label = class_ids(logits)
    if label is None:
        raise ValueError("_write_outputs needs label or logits")
    with _stage("write"):
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
    if "confidence" in paths and confidence is not None:
        with _stage("other outputs"):
            write_png_atomic(paths["confidence"], confidence)
    if "overlay" in paths and image is not None:
        with _stage("other outputs"):
            write_png_atomic(paths["overlay"], overlay(image, colorize(label, palette), alpha=alpha))
    if label.dtype == np.uint8:  # label and colour PNGs share one deflate of the ids (indexed colour)
        idat = None
        for kind, pal in (("color", palette), ("label", None)):
            if kind in paths:
                with _stage("encode"):
                    idat = idat or deflate_label_rows(label)
                    data = label_png(idat, label.shape, palette=pal)
                with _stage("write"):
                    write_bytes_atomic(paths[kind], data)
    else:  # more than 256 classes: 16-bit ids, RGB colours
        with _stage("other outputs"):
            if "color" in paths:
                write_png_atomic(paths["color"], label, palette=palette)
            if "label" in paths:
                write_png_atomic(paths["label"], label)


def _predict_group(
    predictor: Predictor,
    group: dict[str, Any],
    *,
    resize: tuple[int, int] | None,
    crop: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    scales: Sequence[float],
    flip: bool,
    confidence_bits: int | None,
    overlay: bool,
) -> list[tuple[int, dict[str, np.ndarray | None]]]:
    """Run one same-shape group; per image: its index and what :func:`_write_outputs` needs.

    On CPU without a confidence output the arg-max is left to the writer threads (``logits`` as a
    ``(C, H, W)`` array); otherwise labels (and confidences) are computed here, on the model's device.
    """
    images = group["images"]
    x = predictor.normalized_input(images) if group.get("normalized") else predictor.normalize(images)
    start = time.perf_counter()
    logits = predict_logits(predictor, x, crop=crop, stride=stride, scales=scales, flip=flip)
    if _stage_times is not None:
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        _stage_times.forward_wall += time.perf_counter() - start
    want_conf = confidence_bits is not None
    defer = logits.device.type == "cpu" and not want_conf
    top = 255.0 if confidence_bits == 8 else 65535.0
    results = []
    for k, index in enumerate(group["indices"]):
        one = logits[k : k + 1]
        if resize is not None:  # back to the image's own size: bilinear on the logits, then arg-max
            one = F.interpolate(one, size=group["sizes"][k], mode="bilinear", align_corners=False)
        out: dict[str, np.ndarray | None] = {"label": None, "logits": None, "confidence": None, "image": None}
        if defer:
            out["logits"] = one[0].numpy()  # (C, H, W), a view of the batch's logits
        else:
            lab, cf = labels_and_confidence(one, confidence=want_conf)
            label = lab[0].to(torch.uint8 if predictor.num_classes <= 256 else torch.int32).cpu().numpy()
            out["label"] = label if label.dtype == np.uint8 else label.astype(np.uint16)
            if cf is not None:
                conf = (cf[0] * top).round_().to(torch.int32).cpu().numpy()
                out["confidence"] = conf.astype(np.uint8 if top == 255.0 else np.uint16)
        if overlay:
            original = group["originals"][k]
            out["image"] = original if original is not None else group["images"][k].numpy()
        results.append((index, out))
    return results


def spare_cores(device: torch.device, threads: int) -> bool:
    """Whether decoding and writing can run beside the model without slowing it: on a GPU, or on a CPU with
    at least two cores more than the model's ``threads``.

    Otherwise (e.g. 2 cores, 2 model threads) helper threads would preempt the model's threads, and each
    parallel operator waits for its slowest thread; :func:`run_predict` then decodes and writes between
    forward passes, on all its threads (measured faster there, see docs/RESULTS.md section 7).
    """
    if device.type != "cpu":
        return True
    return _cores() >= threads + 2


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _ThreadedBatches:
    """The DataLoader's batches decoded by ``pool``'s threads, for running without spare cores.

    :meth:`prefetch` queues the next batch's decoding behind the work already in the pool (the previous
    batch's writes), so both keep all the threads busy between two forward passes instead of one waiting
    for the other's last task; iterating starts any batch not prefetched and collates it.

    With a ``table`` (:meth:`Predictor.normalize_table`) each thread also normalises its images, with
    ``cv2.LUT``, straight into one float32 ``(N, H, W, 3)`` buffer per batch (``keys`` give the probed
    sizes), which becomes the model input without a copy; otherwise the main thread would normalise the
    whole batch between two forward passes. Images whose size differs from the probe stay uint8. The
    buffers of each batch shape take turns (two of them): a batch's buffer is refilled two batches later,
    long after its forward pass, instead of allocating 8 MB per batch.
    """

    def __init__(
        self,
        dataset: ImageListDataset,
        sampler: Iterable[list[int]],
        pool: ThreadPoolExecutor,
        *,
        keys: Sequence[Hashable | None] = (),
        keep_originals: bool = False,
    ) -> None:
        self.dataset = dataset
        self.indices = iter(sampler)
        self.pool = pool
        self.keys = keys
        self.keep_originals = keep_originals
        self.table: np.ndarray | None = None
        self.ahead: list[Future] | None = None
        self.ring: dict[tuple[int, ...], deque[np.ndarray]] = {}

    def _decode_into(self, index: int, buffer: np.ndarray, slot: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if "error" in sample or tuple(sample["image"].shape) != buffer.shape[1:]:
            return sample
        image = sample["image"].numpy()
        with _stage("normalise"):
            cv2.LUT(image, self.table, dst=buffer[slot])
        if self.keep_originals and sample["original"] is None:
            sample["original"] = image
        sample.update(image=torch.from_numpy(buffer[slot]), buffer=buffer, slot=slot)
        return sample

    def prefetch(self) -> None:
        if self.ahead is not None:
            return
        indices = next(self.indices, None)
        if indices is None:
            self.ahead = []
            return
        size = self.keys[indices[0]] if self.table is not None and self.keys else None
        if size is not None and all(self.keys[i] == size for i in indices):
            height, width = size  # type: ignore[misc]
            shape = (len(indices), height, width, 3)
            ring = self.ring.setdefault(shape, deque())
            if len(ring) < 2:  # a new buffer, then the oldest in turn
                ring.appendleft(np.empty(shape, np.float32))
            buffer = ring[0]
            ring.rotate(-1)
            self.ahead = [self.pool.submit(self._decode_into, i, buffer, k) for k, i in enumerate(indices)]
        else:
            self.ahead = [self.pool.submit(self.dataset.__getitem__, i) for i in indices]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        self.prefetch()
        futures, self.ahead = self.ahead or [], None
        if not futures:
            raise StopIteration
        return collate_images([f.result() for f in futures])


def _make_progress(enabled: bool):  # -> rich Progress or a no-op stand-in
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )


def run_predict(
    predictor: Predictor | Callable[[], Predictor],
    items: Sequence[InputItem],
    *,
    output: Path,
    kinds: Sequence[str] = DEFAULT_OUTPUTS,
    batch_size: int = 4,
    num_workers: int = 2,
    writers: int | None = None,
    resize: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    alpha: float = 0.5,
    confidence_bits: int = 8,
    skip_existing: bool = False,
    pin_memory: bool | None = None,
    overlap: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Predict every item and write its outputs under ``output``; failures are counted, not raised.

    ``predictor`` may be a function that loads it: it is then called after the decoding workers have
    started (they decode the first batches while the model loads), and not at all when ``skip_existing``
    finds every output present. ``summary.seconds`` counts the input checks and everything from the
    model being ready to the last file written (not the model loading). ``pin_memory`` defaults to
    "the predictor runs on CUDA" (for a loader function: CUDA is available).
    """
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(OUTPUT_KINDS))
    if unknown or not kinds:
        raise PredictError(f"--outputs takes a comma list of {', '.join(OUTPUT_KINDS)}; got {kinds}")
    if not 0.0 <= alpha <= 1.0:
        raise PredictError(f"--alpha must be in [0, 1], got {alpha}")
    if confidence_bits not in (8, 16):
        raise PredictError(f"--confidence-bits must be 8 or 16, got {confidence_bits}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    summary = PredictSummary(total=len(items))
    t0 = time.perf_counter()

    todo: list[InputItem] = []
    for item in items:
        if skip_existing and all(p.is_file() for p in output_paths(item, output, kinds).values()):
            summary.skipped += 1
        else:
            todo.append(item)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    keys: Sequence[Hashable | None] = [resize] * len(todo) if resize else probe_sizes(todo)
    cuda = predictor.device.type == "cuda" if isinstance(predictor, Predictor) else torch.cuda.is_available()
    if pin_memory is None:
        pin_memory = cuda
    if overlap is None:
        if isinstance(predictor, Predictor):
            overlap = spare_cores(predictor.device, predictor.cpu_threads())
        else:
            overlap = spare_cores(torch.device("cuda" if cuda else "cpu"), torch.get_num_threads())
    if writers is None:  # without overlap the pool runs while the model waits: every core is free
        writers = 2 if overlap else _cores()
    dataset = ImageListDataset(todo, resize=resize, keep_original=resize is not None and "overlay" in kinds)
    sampler = SizeGroupedBatchSampler(keys, batch_size)
    loader = None
    if overlap:  # decoding processes and writer threads run beside the model
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_images,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init,
            prefetch_factor=2 if num_workers > 0 else None,
        )
    infer = {
        "resize": resize, "crop": crop, "stride": stride, "scales": scales, "flip": flip,
        "confidence_bits": confidence_bits if "confidence" in kinds else None, "overlay": "overlay" in kinds,
    }  # fmt: skip
    pending: deque[tuple[InputItem, Future]] = deque()
    # Without spare cores, each batch's outputs are written (and the next batch decoded) by all the
    # threads while the model waits, instead of fighting the model's threads for the cores.
    max_pending = max(4, 2 * batch_size * max(1, writers)) if overlap else 0

    def harvest(block: bool) -> None:
        while pending and (block or pending[0][1].done()):
            item, fut = pending.popleft()
            if fut.cancelled():  # after Ctrl-C
                continue
            try:
                fut.result()
            except (OSError, cv2.error) as err:
                summary.failed += 1
                summary.failures.append(f"{item.path}: cannot write outputs ({err})")
                log(f"failed: {item.path}: cannot write outputs ({err})")
            else:
                summary.done += 1
            bar.advance(task)

    # OpenCV's pthreads pool is not fork-safe: with it off in this process while the workers fork, they
    # start clean (a live pool deadlocked them). Decoding and PNG encoding run in our own threads anyway.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with (
            _make_progress(progress) as bar,
            ThreadPoolExecutor(max_workers=max(1, writers)) as pool,
        ):
            prepared = time.perf_counter() - t0
            start = time.perf_counter()
            # iter(loader) forks the workers now: they decode while the model loads
            threaded = None
            if loader is None:
                threaded = _ThreadedBatches(
                    dataset, sampler, pool, keys=keys, keep_originals="overlay" in kinds
                )
            batches = iter(loader) if loader is not None else threaded
            if not isinstance(predictor, Predictor):
                predictor = predictor()
                start = time.perf_counter()  # loading is not prediction time (the workers' start overlaps)
            summary.predictor = predictor
            palette = predictor.meta.palette
            if threaded is not None and predictor.device.type == "cpu":
                threaded.table = predictor.normalize_table()
            task = bar.add_task("predict", total=len(items), completed=summary.skipped)
            try:
                for batch in batches:
                    for _index, message in batch["errors"]:
                        summary.failed += 1
                        summary.failures.append(message)
                        log(f"failed: {message}")
                        bar.advance(task)
                    for group in batch["groups"]:
                        for index, outputs in _predict_group(predictor, group, **infer):
                            item = todo[index]
                            fut = pool.submit(
                                _write_outputs,
                                output_paths(item, output, kinds),
                                **outputs,
                                palette=palette,
                                alpha=alpha,
                            )
                            pending.append((item, fut))
                    if threaded is not None:  # the next batch decodes beside this one's writes
                        threaded.prefetch()
                    harvest(block=False)
                    while len(pending) > max_pending:  # back-pressure: never queue more than a few batches
                        pending[0][1].exception()  # waits without raising; harvest reports it
                        harvest(block=False)
                harvest(block=True)
            except KeyboardInterrupt:  # Ctrl-C: writes under way finish (each is atomic), queued ones do not
                pool.shutdown(wait=True, cancel_futures=True)
                harvest(block=True)
                summary.seconds = prepared + time.perf_counter() - start
                raise PredictInterrupted(summary) from None
    finally:
        cv2.setNumThreads(cv2_threads)
    summary.seconds = prepared + time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _parse_outputs(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"choose a comma list of {', '.join(OUTPUT_KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict",
        description="Segment images with a training checkpoint or an exported .onnx / TorchScript model.",
    )
    parser.add_argument("--checkpoint", required=True, help=".ckpt from training, or .onnx / .pt from export")
    parser.add_argument("--input", required=True, help="image, folder (recursive), 'glob' or .txt list")
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
    parser.add_argument(
        "--num-workers", type=int, default=2, help="decoding processes with --overlap (0: in-process)"
    )
    parser.add_argument(
        "--writers",
        type=int,
        default=None,
        help="PNG writing threads (and decoding ones without overlap); default: 2 with overlap, else one "
        "per core (they run between forward passes, when every core is free)",
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
        help="write outputs while the next batch runs (default: on a GPU, or with 2+ spare CPU cores)",
    )
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="infer at a fixed size")
    parser.add_argument("--sliding-window", action="store_true", help="infer on overlapping crops")
    parser.add_argument(
        "--crop", type=int, nargs=2, metavar=("H", "W"), default=(512, 512), help="window size"
    )
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="default: half the crop")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="horizontal-flip TTA")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA factors")
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
    try:
        return _main(args)
    except PredictInterrupted as stop:
        _discard(created)
        summary = stop.summary
        print(
            f"interrupted: {summary.done + summary.skipped} of {summary.total} images have their outputs in "
            f"{args.output}; run the same command with --skip-existing to finish",
            file=sys.stderr,
        )
        return 130
    except (PredictError, InferenceError) as err:
        _discard(created)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        _discard(created)
        raise


def _discard(created: Sequence[Path]) -> None:
    """Remove the output folders this run created while they hold nothing but :data:`OUTPUT_MARKER`."""
    if not created:
        return
    with contextlib.suppress(OSError):  # no folder (not created yet), or already gone
        if [p.name for p in created[0].iterdir()] == [OUTPUT_MARKER]:
            (created[0] / OUTPUT_MARKER).unlink()
    remove_empty_dirs(created)


def _main(args: argparse.Namespace) -> int:
    for name in ("batch_size", "writers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PredictError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        raise PredictError("--num-workers must be 0 or more")
    if args.resize is not None and args.sliding_window:
        raise PredictError("choose either --resize or --sliding-window, not both")
    if args.resize is not None and min(args.resize) < 1:
        raise PredictError(f"--resize needs positive H W, got {args.resize}")
    if args.sliding_window and min(args.crop + list(args.stride or [1])) < 1:
        raise PredictError("--crop and --stride need positive H W")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = args.output.expanduser()
    items, ignored = collect_inputs(args.input, exclude=output)
    checkpoint = Path(args.checkpoint).expanduser()
    # fail before starting workers; load_predictor would say the same
    require_file(checkpoint, what="model file", fix="pass a training .ckpt or a file from scripts/export.py")
    device = resolve_device(args.device)
    check_output_dir(output)

    def load() -> Predictor:
        return load_predictor(
            checkpoint,
            device=device,
            precision=args.precision,
            channels_last=args.channels_last,
            fuse=args.fuse,
            onednn=onednn_convolutions(),
        )

    options: dict[str, Any] = {
        "output": output,
        "kinds": args.outputs,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "writers": args.writers,
        "overlap": args.overlap
        if args.overlap is not None
        else spare_cores(device, args.threads or torch.get_num_threads()),
        "resize": tuple(args.resize) if args.resize else None,
        "crop": tuple(args.crop) if args.sliding_window else None,
        "stride": tuple(args.stride) if (args.sliding_window and args.stride) else None,
        "scales": args.scales,
        "flip": args.tta == "flip",
        "alpha": args.alpha,
        "confidence_bits": args.confidence_bits,
        "skip_existing": args.skip_existing,
        "progress": not args.quiet,
        "pin_memory": device.type == "cuda",
    }
    if args.benchmark:
        report = benchmark_predict(
            load, items, repeats=args.benchmark, rewrite=args.benchmark_rewrite, **options
        )
        for i, ((pred_ips, fwd_ips), (pred_pf, fwd_pf)) in enumerate(
            zip(report["runs"], report["faults"]), 1
        ):
            print(
                f"benchmark run {i}: predict {pred_ips:.2f} images/s, bare forward {fwd_ips:.2f} images/s; "
                f"page faults per image {pred_pf:.0f} / {fwd_pf:.0f}"
            )
        print(
            f"benchmark: predict {report['predict_ips']:.2f} images/s, bare forward "
            f"{report['forward_ips']:.2f} images/s at batch {args.batch_size} (same process, medians of "
            f"{args.benchmark}) -> {100 * report['share']:.1f}%"
        )
        order = ("decode", "normalise", "arg-max", "encode", "write", "other outputs")
        stages = report["stages"]
        parts = [f"{name} {stages[name]:.2f}" for name in order if name in stages]
        print(
            f"benchmark: per image, CPU ms by stage (all threads) {', '.join(parts)}, total "
            f"{sum(stages.values()):.2f}; forward {report['forward_wall']:.2f} ms wall"
        )
        spin = os.environ.get("GOMP_SPINCOUNT") or os.environ.get("OMP_WAIT_POLICY") or "libgomp default"
        threads, overlap = torch.get_num_threads(), options["overlap"]

        files = "replacing existing files" if args.benchmark_rewrite else "new files"
        malloc = "keeps freed memory" if keeps_freed_memory() else "default"
        print(
            f"benchmark: OpenMP spin-wait {spin}, {threads} threads, overlap {overlap}, malloc {malloc}, "
            f"{files}"
        )
        return 1 if report["failed"] else 0
    # The model loads inside run_predict once the decoding workers run, so both happen at once.
    summary = run_predict(load, items, **options)
    summary.ignored = ignored
    print(summary.line())
    return 1 if summary.failed else 0


def benchmark_predict(
    predictor: Predictor | Callable[[], Predictor],
    items: Sequence[InputItem],
    *,
    repeats: int = 3,
    rewrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Predict throughput against the bare forward pass, in one process.

    Alternates ``repeats`` full runs of :func:`run_predict` (no skipping) with :func:`benchmark_forward` at
    the same batch size and strategy, and returns the medians (``predict_ips``, ``forward_ips``, ``share``
    = median of the per-repeat ratios), the per-repeat ``runs`` and the ``failed`` count of the first run.
    Each run counts the model's first-batch warm-up; the bare forward does not (it warms up first), so
    ``share`` is conservative. The first run writes into ``output``; the others write new files, as a first
    run does, into a temporary folder inside it that is removed afterwards (untimed), or with ``rewrite``
    replace the first run's files (slower on some file systems: on ext4 each replaced file is freed).
    """
    if repeats < 1:
        raise PredictError(f"--benchmark needs at least 1 repeat, got {repeats}")
    global _stage_times
    runs: list[tuple[float, float]] = []
    faults: list[tuple[float, float]] = []
    stages = StageTimes()
    done = 0
    failed = 0
    output = Path(options.pop("output"))
    for i in range(repeats):
        fresh = None if (i == 0 or rewrite) else Path(tempfile.mkdtemp(prefix=".benchmark-", dir=output))
        run_options = {**options, "output": fresh or output, "skip_existing": False, "progress": False}
        start = _page_faults()
        _stage_times = stages
        try:
            summary = run_predict(predictor, items, **run_options)
        finally:
            _stage_times = None
            if fresh is not None:
                shutil.rmtree(fresh)
        done += summary.done
        failed = summary.failed if i == 0 else failed
        if summary.predictor is None or not summary.done:
            raise PredictError("--benchmark: no image could be predicted")
        predictor = summary.predictor
        print(summary.line())
        middle = _page_faults()
        forward_ips = benchmark_forward(predictor, items, **options)
        runs.append((summary.images_per_second, forward_ips))
        # the bare forward's batches and its one warm-up batch
        forward_images = (_forward_batches(items, options["batch_size"]) + 1) * options["batch_size"]
        faults.append(((middle - start) / len(items), (_page_faults() - middle) / forward_images))
    return {
        "predict_ips": statistics.median(p for p, _ in runs),
        "forward_ips": statistics.median(f for _, f in runs),
        "share": statistics.median(p / f for p, f in runs),
        "runs": runs,
        "faults": faults,
        # milliseconds per predicted image, over all runs: CPU time per stage, forward passes' wall time
        "stages": {name: 1e3 * t / max(done, 1) for name, t in stages.cpu.items()},
        "forward_wall": 1e3 * stages.forward_wall / max(done, 1),
        "failed": failed,
    }


def _page_faults() -> int:
    """This process's page faults so far (minor + major; 0 where ``resource`` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _forward_batches(items: Sequence[InputItem], batch_size: int) -> int:
    """Batches the bare forward times: as many images as the predict run (at least two batches)."""
    return max(2, -(-len(items) // batch_size))


def benchmark_forward(predictor: Predictor, items: Sequence[InputItem], **options: Any) -> float:
    """Bare forward images/s with the run's batch size, inference strategy and first image's size.

    Runs as many images as the predict run will (at least two batches), after one warm-up batch.
    """
    size = options["resize"] or probe_size(items[0].path)
    if size is None:
        raise PredictError(f"cannot read the size of {items[0].path} for --benchmark")
    batch = options["batch_size"]
    batches = _forward_batches(items, batch)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return predict_logits(
            predictor, x, crop=options["crop"], stride=options["stride"], scales=options["scales"],
            flip=options["flip"],
        )  # fmt: skip

    return forward_throughput(
        forward, batch_size=batch, size=tuple(size), batches=batches, device=predictor.device
    )
