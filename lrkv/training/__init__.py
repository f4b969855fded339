"""Training: Lightning module, optimizers, schedules, callbacks, checkpoints.

Import submodules directly (e.g. `from lrkv.training.checkpoint import load_pretrained`); this package
does not import Lightning at import time.
"""
