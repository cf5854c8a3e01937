"""Safe arithmetic for eps and step-size expressions such as ``8/255``.

Expressions are parsed with :mod:`ast` and only numbers, + - * / ** and
parentheses (plus names the caller allows, e.g. ``eps``) are evaluated;
anything else (calls, attributes, subscripts) is rejected, never executed.
"""

from __future__ import annotations

import ast
import math
import operator

from robench.errors import UsageError

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
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


def _eval_string(text: str, names: dict[str, float]) -> float:
    if len(text) > _MAX_LEN:
        raise UsageError(f"expression too long ({len(text)} characters)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise UsageError(f"{text!r} is not an arithmetic expression") from None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise UsageError(f"exponent too large in {text!r}")
            try:
                return _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise UsageError(f"division by zero in {text!r}") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Name) and node.id in names:
            return float(names[node.id])
        allowed = ", ".join(sorted(names)) if names else "none"
        raise UsageError(
            f"{text!r} is not plain arithmetic (numbers and + - * / ** only; names allowed: {allowed})"
        )

    return walk(tree)
