"""Evaluation of frozen backbones: k-NN and linear probes on CLS features, the dense linear
segmentation probe on patch tokens, PCA feature maps."""
from .dense import DenseEvalConfig, DenseProbe, evaluate_dense
from .features import extract_features
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe
from .pca import feature_maps, pca_grid

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "linear_probe", "feature_maps", "pca_grid",
           "DenseEvalConfig", "DenseProbe", "evaluate_dense"]
