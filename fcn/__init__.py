"""FCN-32s/16s/8s and a distilled light student for street-scene semantic segmentation."""

__version__ = "0.1.0"
