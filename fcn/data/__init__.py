"""Data: datasets (CamVid, Cityscapes, folders), albumentations presets, the data module, demo data."""

from fcn.data.errors import DataError

__all__ = ["DataError"]
