"""Predict's inputs and outputs by name: images and videos in (:func:`collect_inputs`), their output paths
out (:func:`output_paths`), in a folder marked as predict's output (:data:`OUTPUT_MARKER`)."""

from __future__ import annotations

import glob
import itertools
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fcn.data.io import IMAGE_EXTENSIONS, probe_size
from fcn.video import VIDEO_EXTENSIONS, VIDEO_KINDS, VIDEO_SUFFIX, frame_range, is_video, probe_video

LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
# An empty hidden file marking a folder as predict's output: later runs never take its PNGs as input
OUTPUT_MARKER = ".fcn-predict-output"


@dataclass(frozen=True)
class InputItem:
    """One input image or video and its output path stem relative to the output folder of each kind."""

    path: Path
    rel: Path


def _is_image_name(path: Path) -> bool:
    """Whether predict takes ``path`` found in a folder or glob: an image or a video, by its extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_video(path)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def _is_output_dir(folder: Path) -> bool:
    """Whether ``folder`` holds the outputs of a predict run (:data:`OUTPUT_MARKER`)."""
    return (folder / OUTPUT_MARKER).is_file()


def _make_items(paths: Sequence[Path], base: Path) -> list[InputItem]:
    """Relative output stems; inputs that share a stem in one folder (a.png, a.jpg) keep their extension."""
    rels = [p.relative_to(base) if p.is_relative_to(base) else Path(p.name) for p in paths]
    stems = Counter(r.with_suffix("") for r in rels)
    clash = [stems[r.with_suffix("")] > 1 for r in rels]
    return [
        InputItem(p, r.with_name(r.name.replace(".", "_")) if c else r.with_suffix(""))
        for p, r, c in zip(paths, rels, clash)
    ]


def collect_inputs(spec: str | Path, *, exclude: Path | None = None) -> tuple[list[InputItem], int]:
    """Expand ``spec`` into images and videos; also returns the count of other files ignored.

    ``spec``: an image or video, a folder (recursive, by extension; hidden entries, ``exclude`` and earlier
    runs' outputs skipped), a glob (``**`` recursive; earlier outputs skipped) or a ``.txt`` / ``.lst`` /
    ``.list`` file of paths (relative to its folder, ``#`` comments; any extension). Raises
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
            subdirs = [root_path / d for d in sorted(dirs) if not d.startswith(".")]
            dirs[:] = [d.name for d in subdirs if not _inside(d, exclude) and not _is_output_dir(d)]
            names = [root_path / name for name in sorted(files) if not name.startswith(".")]
            found += [p for p in names if _is_image_name(p)]
            ignored += len(names) - sum(map(_is_image_name, names))
        items = _make_items(found, path)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise FileNotFoundError(f"cannot read the list of paths {path} ({err})") from err
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        # relative to the list's folder; an absolute entry stays itself (``/`` keeps it); duplicates once
        paths = [Path(os.path.abspath(path.parent / Path(e).expanduser())) for e in entries]
        paths = list(dict.fromkeys(paths))
        base = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else path.parent
        items = _make_items(paths, base)
    elif path.is_file():
        items = [InputItem(path=path, rel=Path(path.stem))]
    elif glob.has_magic(text):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
        literal = itertools.takewhile(lambda part: not glob.has_magic(part), Path(text).expanduser().parts)
        base = Path(*literal)
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
        videos = " ".join(sorted(VIDEO_EXTENSIONS))
        raise FileNotFoundError(f"no images found in {text} (looked for {exts} and videos {videos})")
    return items, ignored


def output_paths(item: InputItem, output: Path, kinds: Sequence[str]) -> dict[str, Path]:
    """``{kind: output/kind/rel.png}`` (``rel.npy`` for ``probs``); for a video ``output/kind/rel.mp4`` for
    :data:`VIDEO_KINDS` and the folder ``output/kind/rel`` of per-frame PNGs for the other kinds."""
    rel, video = item.rel, is_video(item.path)
    file = rel.with_name(rel.name + (VIDEO_SUFFIX if video else ".png"))
    paths = {k: output / k / (rel if video and k not in VIDEO_KINDS else file) for k in kinds}
    if "probs" in paths and not video:
        paths["probs"] = output / "probs" / rel.with_name(rel.name + ".npy")
    return paths


def input_weights(
    paths: Sequence[Path], *, every: int = 1, start: float = 0.0, end: float | None = None
) -> list[int]:
    """The pixels predict runs through per input, from headers: ``H * W`` of an image, times the kept frames
    (:func:`fcn.video.frame_range`) of a video; the mean of the others where the header does not tell.
    The weights :func:`fcn.distributed.split_balanced` deals to the ranks."""

    def weight(path: Path) -> int | None:
        if is_video(path):
            info = probe_video(path)
            if info is None or info.frames < 0:
                return None
            return len(frame_range(info, every=every, start=start, end=end)) * info.size[0] * info.size[1]
        size = probe_size(path)
        return None if size is None else size[0] * size[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(weight, paths))
    known = [w for w in found if w is not None]
    fallback = max(1, sum(known) // len(known)) if known else 1
    return [fallback if w is None else w for w in found]
