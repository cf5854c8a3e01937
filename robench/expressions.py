"""Safe arithmetic for eps and step-size expressions such as ``8/255``.

Expressions are parsed with :mod:`ast` and only numbers, + - * / ** and
parentheses (plus names the caller allows, e.g. ``eps``) are evaluated;
anything else (calls, attributes, subscripts) is rejected, never executed.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Collection

from robench.errors import UsageError

# pow may give a complex number (e.g. (-8)**0.5): refused after the operation.
_BINOPS: dict[type[ast.operator], Callable[[float, float], float | complex]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_LEN = 200


def eval_expr(text: str | int | float, names: dict[str, float] | None = None) -> float:
    """Evaluate a numeric expression; raise ``UsageError`` on anything else."""
    if isinstance(text, bool):
        raise UsageError(f"expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _eval_string(str(text), names or {})
    if not math.isfinite(value):
        raise UsageError(f"{text!r} is not a finite number")
    return value


def check_expr(text: str | int | float, names: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse anything but plain arithmetic over ``names``, without evaluating.

    Used where the names' values are not known yet (a step size before its eps
    and steps are): evaluating at stand-in values could divide by zero where the
    real values would not, or pass where they give a negative step.
    """
    if isinstance(text, bool):
        raise UsageError(f"expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        eval_expr(text)
        return
    _check_nodes(_parse(str(text)), str(text), names)


def _parse(text: str) -> ast.Expression:
    if len(text) > _MAX_LEN:
        raise UsageError(f"expression too long ({len(text)} characters)")
    try:
        return ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise UsageError(f"{text!r} is not an arithmetic expression") from None


def _check_nodes(tree: ast.AST, text: str, names: set[str] | frozenset[str]) -> None:
    if not all(_allowed(node, names) for node in ast.walk(tree)):
        raise UsageError(_not_arithmetic(text, names))


def _allowed(node: ast.AST, names: set[str] | frozenset[str]) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float)
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINOPS
    if isinstance(node, ast.UnaryOp):
        return type(node.op) in _UNARY
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, (ast.Expression, ast.Load, *_BINOPS, *_UNARY))


def _not_arithmetic(text: str, names: Collection[str]) -> str:
    allowed = ", ".join(sorted(names)) if names else "none"
    return f"{text!r} is not plain arithmetic (numbers and + - * / ** only; names allowed: {allowed})"


def _eval_string(text: str, names: dict[str, float]) -> float:
    tree = _parse(text)

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        # int or float, not bool (a subclass of int): what _allowed lets through
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise UsageError(f"exponent too large in {text!r}")
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise UsageError(f"division by zero in {text!r}") from None
            except OverflowError:
                raise UsageError(f"{text!r} is too large to be a number") from None
            if isinstance(value, complex):  # e.g. (-8)**0.5
                raise UsageError(f"{text!r} is not a real number")
            return value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Name) and node.id in names:
            return float(names[node.id])
        raise UsageError(_not_arithmetic(text, names))

    return walk(tree)
