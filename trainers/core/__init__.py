"""Pure helpers shared by every trainer: config loading, data, noise and targets, caching, checkpoints, progress,
optimizers and runtime (accelerate). Each trainer composes them in its own readable loop; nothing here owns a loop.

Import from the submodules (``from trainers.core.noise import sample_noise``); this package imports nothing heavy.
"""
