"""Reporting: tables, comparisons, plots and the CI gate, all read from result documents."""
