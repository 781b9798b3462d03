"""Predict's batch pipeline: file -> decode -> normalise -> model -> arg-max -> encode -> write.

:func:`run_predict` batches images of equal size (each runs at its own resolution) and lets one thread pool
(``writers``) decode, normalise (on the CPU: ``cv2.LUT`` straight into the float32 batch buffer the model
reads) and write every PNG atomically. With spare cores (:func:`spare_cores`) that work runs beside the
forward pass, else between passes. Unreadable files are counted, not raised. Videos (:mod:`fcn.video`)
follow the images through the same predictor, pool and progress bar.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcn import distributed
from fcn.data.errors import DataError
from fcn.data.io import colorize, encode_png, overlay, probe_size, read_image, write_bytes_atomic
from fcn.inputs import InputItem, output_paths
from fcn.predictor import Predictor, class_ids, label_arrays, labels_and_confidence, probabilities_uint8
from fcn.video import VIDEO_KINDS, Stage, VideoError, frame_range, is_video, predict_video, probe_video

if TYPE_CHECKING:
    from fcn.benchmark import StageTimes

OUTPUT_KINDS = ("label", "color", "overlay", "confidence", "probs")
# ``probs``: every class's softmax probability (the TTA mean with --scales / --flip) as uint8
# ``round(255 p)``, one ``(C, H, W)`` ``.npy`` per image: soft labels for distillation (data.teacher_labels)
DEFAULT_OUTPUTS = ("label", "color")


class PredictError(ValueError):
    """A user error of the predict command (bad option combination); printed as one ``error:`` line."""


@dataclass
class PredictOptions:
    """What :func:`run_predict` writes and how: the predict command's flags of the same names, checked here
    (:class:`PredictError` names the flag). ``kinds``: :data:`OUTPUT_KINDS`; ``crop`` / ``stride``: sliding
    window; ``writers``: default 2 with overlap, else one per core; ``overlap``: default
    :func:`spare_cores`; ``every`` / ``start`` / ``end`` / ``smooth``: videos only."""

    output: Path
    kinds: tuple[str, ...] = DEFAULT_OUTPUTS
    batch_size: int = 4
    writers: int | None = None
    overlap: bool | None = None
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    alpha: float = 0.5
    confidence_bits: int = 8
    skip_existing: bool = False
    progress: bool = True
    every: int = 1
    start: float = 0.0
    end: float | None = None
    smooth: int = 1

    def __post_init__(self) -> None:
        self.kinds = kinds = tuple(dict.fromkeys(self.kinds))
        if not kinds or set(kinds) - set(OUTPUT_KINDS):
            raise PredictError(
                f"--outputs takes a comma list of {', '.join(OUTPUT_KINDS)}; got {list(kinds)}"
            )
        counts = (("--batch-size", self.batch_size), ("--writers", self.writers or 1))
        for flag, value in (*counts, ("--every", self.every), ("--smooth", self.smooth)):
            if value < 1:
                raise PredictError(f"{flag} must be at least 1, got {value}")
        if self.resize is not None and self.crop is not None:
            raise PredictError("choose either --resize or --sliding-window, not both")
        if self.resize is not None and min(self.resize) < 1:
            raise PredictError(f"--resize needs positive H W, got {list(self.resize)}")
        if self.crop is not None and min(*self.crop, *(self.stride or (1,))) < 1:
            raise PredictError("--crop and --stride need positive H W")
        if not self.scales or min(self.scales) <= 0:
            raise PredictError(f"--scales must be positive, got {list(self.scales)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PredictError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise PredictError(
                f"--start and --end need 0 <= start < end seconds, got {self.start} and {self.end}"
            )
        if self.confidence_bits not in (8, 16):
            raise PredictError(f"--confidence-bits must be 8 or 16, got {self.confidence_bits}")

    def strategy(self) -> dict[str, Any]:
        """:func:`~fcn.predictor.predict_logits`'s options (the model sees ``resize``-d images already)."""
        return {"crop": self.crop, "stride": self.stride, "scales": self.scales, "flip": self.flip}


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
    overlap: bool | None = None  # whether decoding and writing ran beside the model
    videos: int = 0  # inputs that are videos (done, skipped or failed)
    videos_done: int = 0
    frames: int = 0  # video frames predicted (of the videos done)

    @property
    def images_per_second(self) -> float:
        """Images, and video frames, predicted per second."""
        return (self.done + self.frames - self.videos_done) / self.seconds if self.seconds > 0 else 0.0

    def gathered(self) -> PredictSummary:
        """The whole run's summary under torchrun: counts summed over the ranks, the slowest rank's seconds,
        every rank's failures in rank order (itself for one process)."""
        counts = ("total", "done", "skipped", "failed", "videos", "videos_done", "frames")
        parts = distributed.all_gather({k: getattr(self, k) for k in (*counts, "seconds", "failures")})
        if len(parts) == 1:
            return self
        sums = {k: sum(p[k] for p in parts) for k in counts}
        failures = [f for p in parts for f in p["failures"]]
        return replace(self, **sums, seconds=max(p["seconds"] for p in parts), failures=failures)

    def line(self) -> str:
        extra = f", {self.ignored} non-image files ignored" if self.ignored else ""
        videos = f" ({self.videos_done} videos, {self.frames} frames)" if self.videos else ""
        return (
            f"done {self.done}{videos}, skipped {self.skipped}, failed {self.failed}{extra} in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} {'frames' if self.videos else 'images'}/s)"
        )


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_predict`; ``summary`` counts the images whose outputs were written."""

    def __init__(self, summary: PredictSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


def spare_cores(device: torch.device, threads: int) -> bool:
    """Whether decoding and writing can run beside the model without slowing it: on a GPU, or with two CPU
    cores more than the model's ``threads`` (else they preempt its threads: docs/RESULTS.md section 7)."""
    return device.type != "cpu" or _cores() >= threads + 2


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def size_batches(keys: Sequence[Hashable | None], batch_size: int) -> list[list[int]]:
    """Batches of up to ``batch_size`` indices sharing a key (an image size; ``None``: a batch of its own),
    ordered by their first index."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    batches = [ix[j : j + batch_size] for ix in groups.values() for j in range(0, len(ix), batch_size)]
    return sorted(batches, key=lambda b: b[0])


@dataclass
class _Batches:
    """The batches of ``items`` (grouped by header size), decoded by ``pool``'s threads; :meth:`prefetch`
    queues the next. With a ``table`` (:meth:`Predictor.normalize_table`) each thread normalises its image
    into the batch's float32 ``(N, H, W, 3)`` buffer (one not of its header's size stays uint8); two buffers
    per batch shape take turns, so one is refilled only after its batch's forward pass."""

    items: Sequence[InputItem]
    pool: ThreadPoolExecutor
    options: PredictOptions
    table: np.ndarray | None
    stage: Stage

    def __post_init__(self) -> None:
        self.resize, self.keep_originals = self.options.resize, "overlay" in self.options.kinds
        self.keys = [self.resize] * len(self.items)  # the size every image runs at with --resize
        if not self.resize:
            with ThreadPoolExecutor(max_workers=8) as probe:  # header sizes, None where unknown
                self.keys = list(probe.map(lambda it: probe_size(it.path), self.items))
        self.indices = iter(size_batches(self.keys, self.options.batch_size))
        self.ahead: list[Future] | None = None
        self.ring: dict[tuple[int, ...], deque[np.ndarray]] = {}

    def _read(self, index: int, buffer: np.ndarray | None, slot: int) -> dict[str, Any]:
        """``{"index", "image" (uint8, or a row of ``buffer``), "size", "original"}``, or an ``"error"``."""
        try:
            with self.stage("decode"):
                image = read_image(self.items[index].path)
        except DataError as err:
            return {"index": index, "error": str(err)}
        original = image if self.keep_originals else None  # the image before --resize, for the overlay
        sample: dict[str, Any] = {"index": index, "size": image.shape[:2], "original": original}
        if self.resize is not None:
            image = cv2.resize(image, (self.resize[1], self.resize[0]), interpolation=cv2.INTER_LINEAR)
        if buffer is not None and image.shape == buffer.shape[1:]:
            with self.stage("normalise"):
                cv2.LUT(image, self.table, dst=buffer[slot])
            sample.update(image=torch.from_numpy(buffer[slot]), buffer=buffer)
        else:
            sample["image"] = torch.from_numpy(np.ascontiguousarray(image))
        return sample

    def prefetch(self) -> None:
        if self.ahead is not None or (indices := next(self.indices, None)) is None:
            return
        size = self.keys[indices[0]] if self.table is not None else None  # the batch's (H, W)
        buffer = None
        if size is not None:
            shape = (len(indices), *size, 3)  # type: ignore[misc]
            ring = self.ring.setdefault(shape, deque())
            if len(ring) < 2:  # a new buffer, then the oldest in turn
                ring.appendleft(np.empty(shape, np.float32))
            buffer = ring[0]
            ring.rotate(-1)
        self.ahead = [self.pool.submit(self._read, i, buffer, k) for k, i in enumerate(indices)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self.prefetch()
            futures, self.ahead = self.ahead, None
            if futures is None:
                return
            yield _collate([f.result() for f in futures])


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"groups": [(samples, images)], "errors"}``: images of equal shape stacked (the shared buffer itself
    when every row was normalised into it, else a copy); several shapes (a wrong header): several groups."""
    by_shape: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for s in samples:
        if "error" not in s:
            by_shape.setdefault((*s["image"].shape, s["image"].dtype), []).append(s)
    groups = []
    for group in by_shape.values():
        buffer = group[0].get("buffer")  # float32 rows are the batch's buffer's, in order
        filled = buffer is not None and len(buffer) == len(group)
        images = torch.from_numpy(buffer) if filled else torch.stack([s["image"] for s in group])
        groups.append((group, images))
    return {"groups": groups, "errors": [s["error"] for s in samples if "error" in s]}


def _predict_group(
    predictor: Predictor, group: tuple[list, torch.Tensor], options: PredictOptions, timer: StageTimes | None
) -> list[tuple[int, dict[str, np.ndarray | None]]]:
    """Run one group of :func:`_collate`; per image its index and what :func:`_write_outputs` needs. On CPU
    without a confidence output the arg-max is left to the writer threads (``logits`` ``(C, H, W)``)."""
    samples, images = group
    x = predictor.normalize(images)
    start = time.perf_counter()
    logits = predictor.logits(x, **options.strategy())
    if timer is not None:
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        timer.forward_wall += time.perf_counter() - start
    want_conf, want_probs = "confidence" in options.kinds, "probs" in options.kinds
    defer = logits.device.type == "cpu" and not want_conf
    arrays = {"num_classes": predictor.num_classes, "bits": options.confidence_bits}
    results = []
    for k, sample in enumerate(samples):
        one = logits[k : k + 1]
        if options.resize is not None:  # back to the image's own size: bilinear on the logits, then arg-max
            one = F.interpolate(one, size=sample["size"], mode="bilinear", align_corners=False)
        out = {"label": None, "logits": None, "confidence": None, "image": sample["original"], "probs": None}
        if want_probs:
            out["probs"] = probabilities_uint8(one[0])
        if defer:
            out["logits"] = one[0].numpy()  # (C, H, W), a view of the batch's logits
        else:
            ids, conf = labels_and_confidence(one, confidence=want_conf)
            ids, conf = label_arrays(ids, conf, **arrays)
            out["label"], out["confidence"] = ids[0], None if conf is None else conf[0]
        results.append((sample["index"], out))
    return results


def _write_outputs(
    paths: dict[str, Path], outputs: dict[str, np.ndarray | None], palette: list, alpha: float, stage: Stage
) -> None:
    """Encode and write one image's outputs (in a writer thread)."""
    label = outputs["label"]
    if label is None and {"label", "color", "overlay"} & paths.keys():
        with stage("arg-max"):  # (C, H, W) logits -> ids, here rather than on the model's threads
            label = class_ids(outputs["logits"])  # type: ignore[arg-type]
    with stage("write"):
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
    if "probs" in paths and outputs["probs"] is not None:
        with stage("other outputs"):
            buffer = io.BytesIO()
            np.save(buffer, outputs["probs"])
            write_bytes_atomic(paths["probs"], buffer.getvalue())
    if "confidence" in paths and outputs["confidence"] is not None:
        with stage("other outputs"):
            write_bytes_atomic(paths["confidence"], encode_png(outputs["confidence"]))
    if "overlay" in paths and outputs["image"] is not None:
        with stage("other outputs"):
            blend = overlay(outputs["image"], colorize(label, palette), alpha=alpha)
            write_bytes_atomic(paths["overlay"], encode_png(blend))
    for kind, pal in (("color", palette), ("label", None)):
        if kind in paths:
            with stage("encode"):
                data = encode_png(label, palette=pal)  # uint8: an indexed-colour PNG; beyond: RGB
            with stage("write"):
                write_bytes_atomic(paths[kind], data)


def run_predict(
    predictor: Predictor | Callable[[], Predictor],
    items: Sequence[InputItem],
    options: PredictOptions,
    *,
    timer: StageTimes | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Predict every item and write its outputs under ``options.output``; failures are counted, not raised.

    ``predictor`` may be a function that loads it (not called when ``skip_existing`` finds every output).
    ``summary.seconds`` leaves the model loading out. ``timer`` (``--benchmark``,
    :class:`fcn.benchmark.StageTimes`) gets each stage's CPU time and the forward passes' wall time. Ctrl-C
    raises :class:`PredictInterrupted`.
    """
    o = options
    log = log or (lambda msg: print(msg, file=sys.stderr))
    stage = timer if timer is not None else (lambda _name: nullcontext())
    summary = PredictSummary(total=len(items), videos=sum(is_video(it.path) for it in items))
    t0 = time.perf_counter()
    todo = [it for it in items if not (o.skip_existing and _outputs_exist(it, o))]
    summary.skipped = len(items) - len(todo)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary
    videos = [it for it in todo if is_video(it.path)]
    todo = [it for it in todo if not is_video(it.path)]  # the images
    check_video_kinds(videos, o.kinds)
    frames = [  # the frames the progress bar expects of each video (0: its container does not say)
        len(frame_range(i, every=o.every, start=o.start, end=o.end)) if i and i.frames >= 0 else 0
        for i in map(probe_video, (it.path for it in videos))
    ]
    loading = time.perf_counter()
    if not isinstance(predictor, Predictor):
        predictor = predictor()
    t0 += time.perf_counter() - loading  # the model loading is not counted
    overlap = o.overlap if o.overlap is not None else spare_cores(predictor.device, predictor.cpu_threads())
    summary.overlap = overlap
    writers = o.writers or (2 if overlap else _cores())
    # without spare cores each batch is written (and the next decoded) while the model waits
    max_pending = max(4, 2 * o.batch_size * writers) if overlap else 0
    write = functools.partial(_write_outputs, palette=predictor.meta.palette, alpha=o.alpha, stage=stage)
    pending: deque[tuple[InputItem, Future]] = deque()

    def fail(message: str) -> None:
        summary.failed += 1
        summary.failures.append(message)
        log(f"failed: {message}")

    def harvest(keep: int = 0) -> None:
        """Count the finished writes, waiting for the oldest while more than ``keep`` are pending."""
        while pending and (len(pending) > keep or pending[0][1].done()):
            wait([pending[0][1]])  # Ctrl-C while waiting leaves it queued, to be counted once the pool stops
            item, fut = pending.popleft()
            if fut.cancelled():  # after Ctrl-C
                continue
            try:
                fut.result()
            except (OSError, cv2.error) as err:
                fail(f"{item.path}: cannot write outputs ({err})")
            else:
                summary.done += 1
            bar.update()

    quiet = None if o.progress else True  # None: a bar on a terminal only
    unit = "frame" if videos else "img"
    total = len(items) - len(videos) + sum(frames)
    bar = tqdm(total=total, initial=summary.skipped, desc="predict", unit=unit, disable=quiet)
    with bar, ThreadPoolExecutor(max_workers=writers) as pool:
        table = predictor.normalize_table() if predictor.device.type == "cpu" else None
        batches = _Batches(todo, pool, o, table, stage)
        try:
            for batch in batches:
                if overlap:  # the next batch decodes beside this one's forward pass
                    batches.prefetch()
                for message in batch["errors"]:
                    fail(message)
                    bar.update()
                for group in batch["groups"]:
                    for index, outputs in _predict_group(predictor, group, o, timer):
                        paths = output_paths(todo[index], o.output, o.kinds)
                        pending.append((todo[index], pool.submit(write, paths, outputs)))
                batches.prefetch()  # without overlap: the next batch decodes beside this one's writes
                harvest(keep=max_pending)  # back-pressure: never queue more than a few batches
            harvest()
            for item, expected in zip(videos, frames):
                before = bar.n
                try:
                    paths = output_paths(item, o.output, o.kinds)
                    n = predict_video(predictor, item.path, paths, o, pool, overlap, bar.update, stage)
                except VideoError as err:
                    fail(str(err))
                except (OSError, cv2.error) as err:
                    fail(f"{item.path}: cannot write outputs ({err})")
                else:
                    summary.done += 1
                    summary.videos_done += 1
                    summary.frames += n
                if expected:  # the count the bar expected, whatever was read
                    bar.update(before + expected - bar.n)
        except KeyboardInterrupt:  # Ctrl-C: writes under way finish (each is atomic), queued ones do not
            pool.shutdown(wait=True, cancel_futures=True)
            harvest()
            raise PredictInterrupted(summary) from None
        finally:
            summary.seconds = time.perf_counter() - t0
    return summary


def check_video_kinds(items: Sequence[InputItem], kinds: Sequence[str]) -> None:
    """:class:`PredictError` when ``probs`` (images only) is asked of inputs that hold a video."""
    video = next((it.path for it in items if is_video(it.path)), None)
    if video is not None and "probs" in kinds:
        raise PredictError(f"--outputs probs is for images, not videos such as {video}; drop probs")


def _outputs_exist(item: InputItem, options: PredictOptions) -> bool:
    """Whether all of an item's outputs exist (a video's per-frame PNG folders appear when it is done)."""
    paths = output_paths(item, options.output, options.kinds)
    video = is_video(item.path)
    return all(p.is_dir() if video and k not in VIDEO_KINDS else p.is_file() for k, p in paths.items())
