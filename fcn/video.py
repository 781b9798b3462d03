"""Video in, segmented video out: predict's path for video files (OpenCV's FFmpeg reader and writer).

A video ``REL/drive.mp4`` (any container and codec the installed OpenCV reads, recognised by
:data:`VIDEO_EXTENSIONS`) becomes ``OUT/color/REL/drive.mp4`` and ``OUT/overlay/REL/drive.mp4`` (MPEG-4
Part 2, ``mp4v``: the encoder every opencv-python build has) at the input's size and frame rate (divided
by ``every``), and one PNG per frame for ``label`` / ``confidence``: ``OUT/label/REL/drive/000123.png``
(the frame's index in the input). :func:`predict_video` batches the frames through the same
:class:`~fcn.predictor.Predictor` and :func:`~fcn.predictor.predict_logits` as images; the next batch
decodes in a pool thread and the videos encode in their own thread, beside the model or between forward
passes as predict's ``overlap`` says (:mod:`fcn.pipeline`).

Every output is written under a hidden temporary name in its final folder and renamed when the whole
video is done, so an interrupted run leaves no partial video under the final name, and ``--skip-existing``
treats a video as done when all its outputs exist. A video that ends before the frame count its container
declares (truncated, corrupt) raises :class:`VideoError` saying how many frames were read; its partial
outputs are removed.

``smooth`` (``--smooth K``): each frame's labels are the arg-max of the softmax averaged over a sliding
window of the last ``K`` frames (equal weights, causal: frame ``t`` sees ``t-K+1 .. t``; the window
restarts with each video). :func:`flicker` measures what it removes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fcn.data.io import colorize, encode_png, overlay, temp_name, write_bytes_atomic
from fcn.predictor import Predictor, label_arrays, labels_and_confidence, predict_logits

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
VIDEO_KINDS = ("color", "overlay")  # written as videos; the other kinds as one PNG per frame
VIDEO_SUFFIX = ".mp4"
FOURCC = "mp4v"
FALLBACK_FPS = 30.0  # when a container does not say


class VideoError(OSError):
    """A video that cannot be read or written whole; the message names it (a ``failed:`` line)."""


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video (by its extension, :data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says: ``frames`` (-1 when it does not say), ``fps``, ``size`` ``(H, W)``."""

    frames: int
    fps: float
    size: tuple[int, int]


def _info(cap: cv2.VideoCapture) -> VideoInfo:
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = cap.get(cv2.CAP_PROP_FPS)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    frames = int(count) if math.isfinite(count) and count > 0 else -1
    return VideoInfo(frames=frames, fps=fps if math.isfinite(fps) and fps > 0 else FALLBACK_FPS, size=size)


def probe_video(path: str | Path) -> VideoInfo | None:
    """The container's frame count, frame rate and size (nothing decoded); None when it cannot be opened."""
    cap = cv2.VideoCapture(str(path))
    try:
        return _info(cap) if cap.isOpened() else None
    finally:
        cap.release()


def frame_range(info: VideoInfo, *, every: int = 1, start: float = 0.0, end: float | None = None) -> range:
    """The input frame indices predict keeps: from ``start`` to ``end`` seconds, one in ``every``; up to the
    declared frame count (a range up to ``end``, or open-ended, when the container does not say)."""
    first = round(start * info.fps)
    stop = round(end * info.fps) if end is not None else None
    if info.frames >= 0:
        stop = info.frames if stop is None else min(stop, info.frames)
    return range(first, stop if stop is not None else 1 << 62, every)


def video_output_paths(rel: Path, output: Path, kinds: Sequence[str]) -> dict[str, Path]:
    """``{kind: path}``: ``output/kind/rel.mp4`` for :data:`VIDEO_KINDS`, the folder ``output/kind/rel``
    of per-frame PNGs for the others."""
    return {
        k: output / k / (rel.with_name(rel.name + VIDEO_SUFFIX) if k in VIDEO_KINDS else rel) for k in kinds
    }


def flicker(labels: Iterable[np.ndarray]) -> float:
    """Temporal flicker of a label sequence: the fraction of pixels whose label changes between consecutive
    frames, averaged over the frame pairs (0: still; 0 for fewer than two frames)."""
    pairs = itertools.pairwise(np.asarray(frame) for frame in labels)
    changed = [float(np.count_nonzero(b != a)) / b.size for a, b in pairs]
    return sum(changed) / len(changed) if changed else 0.0


class SoftmaxWindow:
    """The softmax summed over the last ``k`` frames pushed (``k = 1``: the frame's own); divided by
    ``len(window)`` it is their mean (the arg-max needs no division)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"the smoothing window must be at least 1 frame, got {k}")
        self.k = k
        self.frames: deque[torch.Tensor] = deque()
        self.total: torch.Tensor | None = None  # the sum of ``frames``, kept up to date

    def __len__(self) -> int:
        return len(self.frames)

    def push(self, probs: torch.Tensor) -> torch.Tensor:
        """Add one frame's probabilities ``(C, H, W)``; return the window's sum (a running sum)."""
        self.frames.append(probs)
        self.total = probs.clone() if self.total is None else self.total.add_(probs)
        if len(self.frames) > self.k:
            self.total.sub_(self.frames.popleft())
        return self.total


class _Reader:
    """Decodes the kept frames of one video, a batch at a time (one batch in flight: the capture is
    sequential). With a ``table`` (:meth:`Predictor.normalize_table`) each frame is also normalised into a
    float32 batch buffer, as images are (:mod:`fcn.pipeline`)."""

    def __init__(
        self,
        path: Path,
        cap: cv2.VideoCapture,
        keep: range,
        *,
        batch_size: int,
        resize: tuple[int, int] | None,
        table: np.ndarray | None,
        stage: Callable[[str], AbstractContextManager[None]],
    ) -> None:
        self.path, self.cap, self.keep, self.batch_size = path, cap, keep, batch_size
        self.resize, self.table, self.stage = resize, table, stage
        self.position = 0  # frames decoded (or skipped) so far
        self.ended = False  # the stream ended (or failed) before the range did
        self.next_kept = iter(keep)
        self.target = next(self.next_kept, None)

    def read(self) -> dict[str, Any] | None:
        """``{"indices", "frames" (RGB uint8), "input" (the model input rows), "normalized"}``; None at the
        end."""
        indices: list[int] = []
        frames: list[np.ndarray] = []
        while len(indices) < self.batch_size and self.target is not None and not self.ended:
            with self.stage("decode"):
                while self.position < self.target and self.cap.grab():  # skipped: not converted
                    self.position += 1
                ok, bgr = self.cap.read() if self.position == self.target else (False, None)
            if not ok or bgr is None:
                self.ended = True
                break
            self.position += 1
            indices.append(self.target)
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            self.target = next(self.next_kept, None)
        if not frames:
            return None
        images = frames
        if self.resize is not None:
            size = (self.resize[1], self.resize[0])
            images = [cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames]
        batch = {"indices": indices, "frames": frames, "normalized": self.table is not None}
        if self.table is None:
            return {**batch, "input": np.stack(images)}
        buffer = np.empty((len(images), *images[0].shape), np.float32)  # a new one: the last is in use
        with self.stage("normalise"):
            for k, image in enumerate(images):
                cv2.LUT(image, self.table, dst=buffer[k])
        return {**batch, "input": buffer}

    def missing(self, declared: int) -> bool:
        """Whether the stream ended before the ``declared`` frame count (-1: unknown, never missing)."""
        return declared >= 0 and self.ended and self.target is not None and self.target < declared


class _Outputs:
    """One video's outputs under hidden temporary names in their final folders: :meth:`commit` renames
    them all into place, :meth:`discard` removes them."""

    def __init__(self, paths: dict[str, Path], *, fps: float, size: tuple[int, int]) -> None:
        self.paths = paths
        self.temps: dict[str, Path] = {}
        self.writers: dict[str, cv2.VideoWriter] = {}
        try:
            for kind, final in paths.items():
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_name(final).with_suffix(final.suffix if kind in VIDEO_KINDS else ".tmp")
                self.temps[kind] = tmp
                if kind in VIDEO_KINDS:  # FFmpeg picks the container from the name: keep .mp4
                    fourcc = cv2.VideoWriter_fourcc(*FOURCC)
                    writer = cv2.VideoWriter(str(tmp), fourcc, fps, (size[1], size[0]))
                    self.writers[kind] = writer
                    if not writer.isOpened():
                        raise VideoError(
                            f"cannot write video {tmp} ({FOURCC} at {fps:g} fps, {size[1]}x{size[0]})"
                        )
                else:
                    tmp.mkdir()
        except BaseException:
            self.discard()
            raise

    def write_frames(
        self, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray], palette: Any, alpha: float
    ) -> None:
        """Append frames to the colour / overlay videos (one thread: the encoders are sequential)."""
        for frame, label in zip(frames, labels):
            color = colorize(label, palette)
            if "color" in self.writers:
                self.writers["color"].write(cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
            if "overlay" in self.writers:
                blend = overlay(frame, color, alpha=alpha)
                self.writers["overlay"].write(cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))

    def commit(self) -> None:
        for writer in self.writers.values():
            writer.release()
        for kind, final in self.paths.items():
            old = None
            if kind not in VIDEO_KINDS and final.exists():  # a folder cannot replace a folder: swap
                old = temp_name(final)
                os.replace(final, old)
            os.replace(self.temps[kind], final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.temps.clear()

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.release()
        for tmp in self.temps.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self.temps.clear()


def _write_png(path: Path, array: np.ndarray, stage: Callable[[str], AbstractContextManager[None]]) -> None:
    with stage("encode"):
        data = encode_png(array)
    with stage("write"):
        write_bytes_atomic(path, data)


def predict_video(
    predictor: Predictor,
    path: Path,
    paths: dict[str, Path],
    options: Any,
    pool: ThreadPoolExecutor,
    overlap: bool,
    progress: Callable[[int], None],
    stage: Callable[[str], AbstractContextManager[None]],
) -> int:
    """Predict the kept frames of the video ``path`` and write ``paths`` (:func:`video_output_paths`);
    returns the number of frames predicted. ``options`` is a :class:`fcn.pipeline.PredictOptions`;
    ``progress(n)`` is told of every ``n`` frames done; ``pool``, ``overlap`` and ``stage`` (timing) are
    :func:`~fcn.pipeline.run_predict`'s.

    Raises :class:`VideoError` for a video that cannot be opened, ends before its declared frame count or
    has no frame in the kept range, and ``OSError`` for outputs that cannot be written; nothing is left
    under the final names then, nor after Ctrl-C.
    """
    o = options
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(
            f"{path}: cannot open the video (truncated, corrupt or a codec this OpenCV lacks): read 0 frames"
        )
    try:
        info = _info(cap)
        keep = frame_range(info, every=o.every, start=o.start, end=o.end)
        if info.frames >= 0 and len(keep) == 0:
            raise VideoError(
                f"{path}: no frame between --start {o.start:g} s and --end {o.end} s "
                f"(the video has {info.frames} frames at {info.fps:g} fps, {info.frames / info.fps:.2f} s)"
            )
        table = predictor.normalize_table() if predictor.device.type == "cpu" else None
        reader = _Reader(path, cap, keep, batch_size=o.batch_size, resize=o.resize, table=table, stage=stage)
        outputs = _Outputs(paths, fps=info.fps / o.every, size=info.size)
        encoder = ThreadPoolExecutor(max_workers=1)  # the video encoders take frames in order
        try:
            done = _loop(predictor, reader, outputs, o, pool, encoder, overlap, progress)
            if reader.missing(info.frames) or done == 0:
                declared = f"{info.frames} frames" if info.frames >= 0 else "an unknown number of frames"
                raise VideoError(
                    f"{path}: truncated or unreadable: read {reader.position} of the {declared} its "
                    "container declares; no outputs written"
                )
            outputs.commit()
            return done
        except BaseException:
            encoder.shutdown(wait=True, cancel_futures=True)
            outputs.discard()
            raise
        finally:
            encoder.shutdown(wait=True)
    finally:
        cap.release()


def _loop(
    predictor: Predictor,
    reader: _Reader,
    outputs: _Outputs,
    o: Any,
    pool: ThreadPoolExecutor,
    encoder: ThreadPoolExecutor,
    overlap: bool,
    progress: Callable[[int], None],
) -> int:
    window = SoftmaxWindow(o.smooth) if o.smooth > 1 else None
    want_conf = "confidence" in o.kinds
    videos = any(k in VIDEO_KINDS for k in o.kinds)
    pngs = [k for k in ("label", "confidence") if k in o.kinds]
    pending: deque[tuple[int, list[Future]]] = deque()
    done = 0

    def harvest(keep: int) -> None:
        nonlocal done
        while len(pending) > keep:
            n, futures = pending[0]
            wait(futures)
            for fut in futures:
                fut.result()  # raises the writer's error
            pending.popleft()
            done += n
            progress(n)

    ahead = pool.submit(reader.read)
    try:
        while True:
            batch = ahead.result()
            if batch is None:
                break
            if overlap:  # the next batch decodes beside this one's forward pass
                ahead = pool.submit(reader.read)
            x = torch.from_numpy(batch["input"])
            x = predictor.normalized_input(x) if batch["normalized"] else predictor.normalize(x)
            logits = predict_logits(predictor, x, **o.strategy())
            height, width = batch["frames"][0].shape[:2]
            if tuple(logits.shape[-2:]) != (height, width):  # --resize: back to the frame's size
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            if window is not None:  # per frame: the arg-max (and max) of the window's summed softmax
                ids, top_probs = [], []
                for probs in logits.softmax(1):
                    total = window.push(probs)  # updated in place by the next push: read it now
                    ids.append(total.argmax(0))
                    if want_conf:
                        top_probs.append(total.amax(0) / len(window))
                labels_t, conf_t = torch.stack(ids), (torch.stack(top_probs) if want_conf else None)
            else:
                labels_t, conf_t = labels_and_confidence(logits, confidence=want_conf)
            classes, bits = predictor.num_classes, o.confidence_bits
            labels, conf = label_arrays(labels_t, conf_t, num_classes=classes, bits=bits)
            futures: list[Future] = []
            if videos:
                palette = predictor.meta.palette
                futures.append(
                    encoder.submit(outputs.write_frames, batch["frames"], labels, palette, o.alpha)
                )
            for kind in pngs:
                for index, array in zip(batch["indices"], conf if kind == "confidence" else labels):
                    path = outputs.temps[kind] / f"{index:06d}.png"
                    futures.append(pool.submit(_write_png, path, array, reader.stage))
            pending.append((len(labels), futures))
            if not overlap:  # the next batch decodes beside this one's writes, then the model has every core
                ahead = pool.submit(reader.read)
            harvest(keep=2 if overlap else 0)
        harvest(keep=0)
    except BaseException:  # Ctrl-C or a failed write: let this video's threads stop before its files go
        for _, futures in pending:
            for fut in futures:
                fut.cancel()
        wait([ahead, *(fut for _, futures in pending for fut in futures)])
        raise
    return done
