"""``OutputConfig``: where a run's files go, validated once."""

from __future__ import annotations

from pathlib import Path

from robench.validated import Options


class OutputConfig(Options):
    """``out``: the run directory (an interrupted run there is continued); ``resume``: continue the
    interrupted run in that directory. Neither: a new directory under ``runs/``."""

    out: Path | None = None
    resume: Path | None = None
