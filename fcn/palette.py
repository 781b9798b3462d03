"""The defaults for data sets and checkpoints that carry none: the colour table and the normalisation."""

from __future__ import annotations

# ImageNet's channel statistics (RGB, images in [0, 1]): what the VGG16 backbone was trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct deterministic RGB colours (the PASCAL VOC bit-interleaving scheme, black skipped): bit
    ``3 * i + channel`` of the label becomes bit ``7 - i`` of that channel."""
    return [
        tuple(sum(((label >> (3 * bit + ch)) & 1) << (7 - bit) for bit in range(8)) for ch in range(3))
        for label in range(1, num_classes + 1)
    ]
