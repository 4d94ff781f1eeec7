"""lspretrain: layer-specialized Vision Transformer pretraining."""
__version__ = "0.1.0"
