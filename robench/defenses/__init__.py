"""Defences from the papers robench mirrors: drop-in modules, transforms and losses for training.

Each lives in its own module and is documented with its paper's defaults and equations.
"""
