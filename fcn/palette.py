"""The defaults for data sets and checkpoints that carry none: the colour table and the normalisation."""

from __future__ import annotations

# ImageNet's channel statistics (RGB, images in [0, 1]): what the VGG16 backbone was trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct deterministic RGB colours (the PASCAL VOC bit-interleaving scheme, black skipped)."""
    colours = []
    for label in range(1, num_classes + 1):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours
