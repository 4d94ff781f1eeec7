"""Training engine: typed config, process groups, strategies, checkpoints, the trainer loop.

Import the pieces from their modules (``lspretrain.engine.trainer`` ...); this package
imports nothing heavy on its own."""
