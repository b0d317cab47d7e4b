"""Dense prediction: backbones as multi-scale encoders, and the heads that read them."""

from vpeft.dense.encoder import DenseEncoder, SimpleFeaturePyramid, dense_encoder

__all__ = ["DenseEncoder", "SimpleFeaturePyramid", "dense_encoder"]
