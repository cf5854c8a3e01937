"""Training the papers' defences: recipes, the training loop and its checkpoints (``robench train``)."""
