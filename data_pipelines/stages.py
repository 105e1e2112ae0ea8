"""The FFCV pipeline stages the data sets' pipelines are written with, importable from one place.

FFCV's decoders and transforms and ours (transforms.py, jpeg_region.py); importing this module
loads FFCV, numba and torch, so the data set modules import it inside their pipeline functions.
"""

from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from .jpeg_region import crop_decoders
from .transforms import (EventFramesToFloat, NormalizeToFloat, RandomHorizontalFlipInPlace,
                         RandomTranslateInPlace)

__all__ = ["EventFramesToFloat", "IntDecoder", "NDArrayDecoder", "NormalizeImage", "NormalizeToFloat",
           "RandomHorizontalFlipInPlace", "RandomTranslateInPlace", "SimpleRGBImageDecoder", "Squeeze",
           "ToDevice", "ToTensor", "ToTorchImage", "crop_decoders", "label"]


def label(device) -> list:
    """The `label` field's pipeline: int64 `[B]` on `device`.

    Squeeze(1), not Squeeze(): a last batch of one sample must stay [1], not become [].
    """
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
