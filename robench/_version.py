"""The installed version, read from the package metadata (pyproject.toml is the source of truth).

A module of its own so that any module can import it without importing the
``robench`` package, which imports the API modules.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("robench")
except PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0.0.0+unknown"
