"""Training: Lightning module, optimizers, schedules, callbacks, checkpoints.

Import submodules directly (e.g. `from lrkv.training.run import train`); this package does not import
Lightning at import time. Loading checkpoints and run folders is lrkv.io's job.
"""
