"""Evaluation: the loop over segments, run state, entries, sanity checks, speed-ups, precision, sharding."""
