"""Suites: the YAML schema and its loader."""

from robench.suites.loader import LoadedSuite, builtin_suites, load_suite, parse_suite
from robench.suites.schema import AttackSpec, Suite

__all__ = ["AttackSpec", "LoadedSuite", "Suite", "builtin_suites", "load_suite", "parse_suite"]
