"""``robench attacks``: every attack a suite can name, with its traits and parameters."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from robench.cli.common import handle_errors, stdout_console


def attack_rows() -> list[dict]:
    from robench.attacks import ATTACKS  # on use: --help must not load torch

    rows = []
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        params = {field: _default(info) for field, info in cls.Params.model_fields.items()}
        if params.get("step_size", "") is None:  # gradient attacks: the default is an expression of theirs
            params["step_size"] = getattr(cls, "default_step_size", None)
        rows.append({"name": name, "family": cls.family_label(), "norms": list(cls.norms),
                     "eps": cls.eps_budget, "minimum_norm": cls.minimum_norm, "params": params,
                     "module": f"{cls.__module__}.{cls.__qualname__}"})
    return rows


def _default(info) -> object:
    if info.is_required():
        return "(required)"
    return info.default_factory() if info.default_factory is not None else info.default


@handle_errors
def attacks_command(
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="Import MODULE first (it registers attacks)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the attacks suites can name (ta.<Name> adds any torchattacks attack)."""
    from robench.attacks.registry import load_plugins

    load_plugins(plugin or [])
    rows = attack_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=1, default=str))
        return
    table = Table(title="attacks (and ta.<Name> for torchattacks)")
    for col in ("name", "family", "norms", "eps", "parameters (defaults)"):
        table.add_column(col)
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        # A minimum-norm attack's eps are where its one run's curve is read, not budgets it is run at.
        eps = f"{row['eps']}, min-norm" if row["minimum_norm"] else row["eps"]
        table.add_row(row["name"], row["family"], ", ".join(row["norms"]), eps, params)
    stdout_console().print(table)
