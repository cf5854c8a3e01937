"""Datasets: npz arrays, image folders, torchvision datasets, the bundled example."""

from robench.data.sources import DATASETS, DataOptions, ImageDataset, load_data

__all__ = ["DATASETS", "DataOptions", "ImageDataset", "load_data"]
