"""Pseudo-labelled frames: a labelled data set plus images labelled by a model (offline semi-supervision).

``scripts/predict.py --outputs label,confidence`` (one checkpoint or an ensemble, with TTA) writes, for an
image ``NAME.ext``, ``DIR/label/NAME.png`` (train ids) and ``DIR/confidence/NAME.png`` (the top softmax
probability, 8 or 16 bits). :class:`PseudoLabelled` trains on those labels where the confidence reaches a
threshold; the other pixels are void (the ignore index), like the void of real labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fcn.data.base import SegmentationDataset
from fcn.data.errors import DataError
from fcn.data.io import read_mask

PSEUDO_KINDS = ("label", "confidence")  # predict's output folders that PseudoLabelled reads


def pseudo_label_files(images: Sequence[Path], pseudo_dir: str | Path) -> list[tuple[Path, Path]]:
    """``(label, confidence)`` PNGs of each image in predict's output folder ``pseudo_dir``; a missing file is
    one :class:`DataError` that says how to make them."""
    root = Path(pseudo_dir).expanduser()
    files = [tuple(root / kind / f"{image.stem}.png" for kind in PSEUDO_KINDS) for image in images]
    missing = [str(path) for pair in files for path in pair if not path.is_file()]
    if missing:
        raise DataError(
            f"pseudo_labels {root}: {len(missing)} of the {2 * len(files)} label / confidence files are "
            f"missing, e.g. {missing[:3]}; write them with `python scripts/predict.py --checkpoint CKPT "
            f"[CKPT ...] --input TRAIN_IMAGES --output {root} --outputs label,confidence`"
        )
    return files  # type: ignore[return-value]


class PseudoLabelled(SegmentationDataset):
    """``labelled``'s pairs, then ``images`` with the labels a model predicted for them (:func:`pseudo_label_files`
    of ``pseudo_dir``): pixels whose confidence is below ``threshold`` (a probability; 8-bit confidences
    compare with ``round(threshold * 255)``) become ``labelled.ignore_index``. Shares ``labelled``'s classes,
    palette and transform; a pseudo label outside ``0 .. num_classes - 1`` is a :class:`DataError`."""

    def __init__(
        self,
        labelled: SegmentationDataset,
        images: Sequence[Path],
        pseudo_dir: str | Path,
        *,
        threshold: float,
    ) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise DataError(f"pseudo_threshold must be a probability in [0, 1], got {threshold}")
        files = pseudo_label_files(images, pseudo_dir)
        super().__init__(
            [*labelled.samples, *((image, label) for image, (label, _) in zip(images, files, strict=True))],
            classes=labelled.classes,
            palette=labelled.palette,
            lut={i: i for i in range(len(labelled.classes))},  # predict writes train ids
            ignore_index=labelled.ignore_index,
            transform=labelled.transform,
            name=f"{labelled.name} + {len(files)} frames pseudo-labelled in {pseudo_dir}",
        )
        self.labelled = labelled
        self.confidence = [confidence for _, confidence in files]
        self.threshold = float(threshold)

    def mask(self, index: int) -> np.ndarray:
        known = len(self.labelled)
        if index < known:
            return self.labelled.mask(index)
        mask = super().mask(index)
        path = self.confidence[index - known]
        confidence = read_mask(path)
        if confidence.shape != mask.shape:
            raise DataError(
                f"confidence {path} is {confidence.shape[0]}x{confidence.shape[1]} but its label "
                f"{self.samples[index][1]} is {mask.shape[0]}x{mask.shape[1]}; write both with one predict run"
            )
        full = np.iinfo(confidence.dtype).max if confidence.dtype.kind == "u" else 1.0
        mask[confidence < round(self.threshold * full)] = self.ignore_index
        return mask
