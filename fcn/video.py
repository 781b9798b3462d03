"""Video in, segmented video out: predict's path for video files (OpenCV's FFmpeg reader and writer).

``REL/drive.mp4`` (:data:`VIDEO_EXTENSIONS`) becomes ``OUT/color/REL/drive.mp4`` and
``OUT/overlay/REL/drive.mp4`` (``mp4v``, at the input's size and frame rate / ``every``) and one PNG per
kept frame for ``label`` / ``confidence`` (``OUT/label/REL/drive/000123.png``, the input frame's index).
Outputs are written under hidden temporary names and renamed when the whole video is done; a video that
ends before its declared frame count raises :class:`VideoError` and leaves nothing. ``smooth`` K: labels
from the softmax averaged over the last K frames (causal; :func:`flicker` measures what it removes).
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
from fcn.predictor import Predictor, label_arrays, labels_and_confidence

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
VIDEO_KINDS = ("color", "overlay")  # written as videos; the other kinds as one PNG per frame
VIDEO_SUFFIX = ".mp4"
FOURCC = "mp4v"
FALLBACK_FPS = 30.0  # when a container does not say
Stage = Callable[[str], AbstractContextManager[None]]  # times a stage (fcn.benchmark.StageTimes)


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
    count, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
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
    """The input frame indices predict keeps: ``start`` to ``end`` seconds, one in ``every``, up to the
    declared frame count (open-ended when neither ``end`` nor the container says)."""
    stop = round(end * info.fps) if end is not None else 1 << 62
    if info.frames >= 0:
        stop = min(stop, info.frames)
    return range(round(start * info.fps), stop, every)


def flicker(labels: Iterable[np.ndarray]) -> float:
    """The fraction of pixels whose label changes between consecutive frames, averaged over the frame pairs
    (0: still, or fewer than two frames)."""
    pairs = itertools.pairwise(np.asarray(frame) for frame in labels)
    changed = [float(np.count_nonzero(b != a)) / b.size for a, b in pairs]
    return sum(changed) / len(changed) if changed else 0.0


class SoftmaxWindow:
    """The softmax summed over the last ``k`` frames pushed; divided by ``len(window)``: their mean."""

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
    """Decodes the kept frames of one video a batch at a time (sequential: one batch in flight); with a
    ``table`` (:meth:`Predictor.normalize_table`) normalised into a float32 buffer, as images are."""

    def __init__(
        self, cap: cv2.VideoCapture, keep: range, options: Any, table: np.ndarray | None, stage: Stage
    ) -> None:
        self.cap, self.batch_size, self.resize = cap, options.batch_size, options.resize
        self.table, self.stage = table, stage
        self.position = 0  # frames decoded (or skipped) so far
        self.ended = False  # the stream ended (or failed) before the kept range did
        self.next_kept = iter(keep)
        self.target = next(self.next_kept, None)

    def read(self) -> dict[str, Any] | None:
        """The next ``{"indices", "frames" (RGB uint8), "input" (the model's)}``; None at the end."""
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
        size = self.resize[::-1] if self.resize else None  # (W, H)
        images = [cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames] if size else frames
        if self.table is None:
            return {"indices": indices, "frames": frames, "input": np.stack(images)}
        buffer = np.empty((len(images), *images[0].shape), np.float32)  # a new one: the last is in use
        with self.stage("normalise"):
            for k, image in enumerate(images):
                cv2.LUT(image, self.table, dst=buffer[k])
        return {"indices": indices, "frames": frames, "input": buffer}


class _Outputs:
    """One video's outputs under hidden temporary names in their final folders: :meth:`commit` renames
    them all into place, :meth:`discard` removes them."""

    def __init__(
        self, paths: dict[str, Path], *, fps: float, size: tuple[int, int], palette: Any, alpha: float
    ) -> None:
        self.paths, self.palette, self.alpha = paths, palette, alpha
        self.encoder = ThreadPoolExecutor(max_workers=1)
        self.temps: dict[str, Path] = {}
        self.writers: dict[str, cv2.VideoWriter] = {}
        fourcc = cv2.VideoWriter_fourcc(*FOURCC)
        try:
            for kind, final in paths.items():
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_name(final).with_suffix(final.suffix if kind in VIDEO_KINDS else ".tmp")
                self.temps[kind] = tmp
                if kind in VIDEO_KINDS:  # FFmpeg picks the container from the name: keep .mp4
                    writer = self.writers[kind] = cv2.VideoWriter(str(tmp), fourcc, fps, (size[1], size[0]))
                    if not writer.isOpened():
                        raise VideoError(
                            f"cannot write video {tmp} ({FOURCC} at {fps:g} fps, {size[1]}x{size[0]})"
                        )
                else:
                    tmp.mkdir()
        except BaseException:
            self.discard()
            raise

    def write_frames(self, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
        """Append frames to the colour / overlay videos (in :attr:`encoder`: they take frames in order)."""
        for frame, label in zip(frames, labels):
            color = colorize(label, self.palette)
            if "color" in self.writers:
                self.writers["color"].write(cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
            if "overlay" in self.writers:
                blend = overlay(frame, color, alpha=self.alpha)
                self.writers["overlay"].write(cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))

    def commit(self) -> None:
        self.encoder.shutdown(wait=True)
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
        self.encoder.shutdown(wait=True, cancel_futures=True)
        for writer in self.writers.values():
            writer.release()
        for tmp in self.temps.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self.temps.clear()


def _write_png(path: Path, array: np.ndarray, stage: Stage) -> None:
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
    stage: Stage,
) -> int:
    """Predict the kept frames of the video ``path``, write ``paths`` (:func:`fcn.inputs.output_paths`) and
    return the number of frames predicted; ``options`` (:class:`fcn.pipeline.PredictOptions`), ``pool``,
    ``overlap`` and ``stage`` are :func:`~fcn.pipeline.run_predict`'s, ``progress(n)`` hears of frames done.

    Raises :class:`VideoError` for a video that cannot be opened, ends before its declared frame count or
    has no frame in the kept range, ``OSError`` for outputs that cannot be written; either way (and after
    Ctrl-C) nothing is left under the final names.
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
        reader = _Reader(cap, keep, o, table, stage)
        palette = predictor.meta.palette
        outputs = _Outputs(paths, fps=info.fps / o.every, size=info.size, palette=palette, alpha=o.alpha)
        window = SoftmaxWindow(o.smooth) if o.smooth > 1 else None
        want_conf, videos = "confidence" in o.kinds, any(k in VIDEO_KINDS for k in o.kinds)
        pngs = [k for k in ("label", "confidence") if k in o.kinds]
        pending: deque[tuple[int, list[Future]]] = deque()  # the writes of each batch, oldest first
        done = 0

        def harvest(keep: int) -> None:
            nonlocal done
            while len(pending) > keep:
                n, futures = pending[0]
                for fut in futures:
                    fut.result()  # raises the writer's error
                pending.popleft()
                done += n
                progress(n)

        ahead = pool.submit(reader.read)
        try:
            while (batch := ahead.result()) is not None:
                if overlap:  # the next batch decodes beside this one's forward pass
                    ahead = pool.submit(reader.read)
                x, frames = predictor.normalize(torch.from_numpy(batch["input"])), batch["frames"]
                logits = predictor.logits(x, **o.strategy())
                height, width = frames[0].shape[:2]
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
                bits = o.confidence_bits
                labels, conf = label_arrays(labels_t, conf_t, num_classes=predictor.num_classes, bits=bits)
                futures = [outputs.encoder.submit(outputs.write_frames, frames, labels)] if videos else []
                for kind in pngs:
                    for index, array in zip(batch["indices"], conf if kind == "confidence" else labels):
                        png = outputs.temps[kind] / f"{index:06d}.png"
                        futures.append(pool.submit(_write_png, png, array, stage))
                pending.append((len(labels), futures))
                if not overlap:  # the next batch decodes beside this one's writes, not the model's
                    ahead = pool.submit(reader.read)
                harvest(keep=2 if overlap else 0)
            harvest(keep=0)
            if (reader.ended and info.frames >= 0) or done == 0:  # short of its declared frame count
                declared = f"{info.frames} frames" if info.frames >= 0 else "an unknown number of frames"
                raise VideoError(
                    f"{path}: truncated or unreadable: read {reader.position} of the {declared} its "
                    "container declares; no outputs written"
                )
            outputs.commit()
            return done
        except BaseException:  # Ctrl-C or a failed write: this video's threads stop before its files go
            for _, futures in pending:
                for fut in futures:
                    fut.cancel()
            wait([ahead, *(fut for _, futures in pending for fut in futures)])
            outputs.discard()
            raise
    finally:
        cap.release()
