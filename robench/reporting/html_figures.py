"""Figures for the HTML report, made self-contained: curves as inline SVG, images as data: URIs.

The curves are those of ``robench plot`` (the same function draws them), saved as SVG and
cleaned for inlining: no XML prolog or DOCTYPE, no metadata block (it names web addresses),
and every ``id`` prefixed so that several figures in one page never share an id.
"""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path

from robench.errors import UsageError
from robench.files import read_bounded
from robench.reporting.plots import plot_results
from robench.results.reading import ResultFile

# A saved grid is a few hundred kilobytes; anything far larger is not one robench wrote.
MAX_IMAGE_BYTES = 8 * 2 ** 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_PROLOG = re.compile(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>", re.IGNORECASE)
_METADATA = re.compile(r"<metadata>.*?</metadata>", re.DOTALL)
_ID = re.compile(r'\bid="([^"]+)"')
_REFERENCE = re.compile(r'(url\(#|href="#)([^)"]+)')
_ROOT_SIZE = re.compile(r'(<svg\b[^>]*?)\s(?:width|height)="[^"]*"')


def curve_svg(results: list[ResultFile], x: str, prefix: str) -> str | None:
    """``robench plot``'s figure of ``results`` as inline SVG; None when there is nothing to draw."""
    with tempfile.TemporaryDirectory(prefix="robench-report-") as tmp:
        out = Path(tmp) / "figure.svg"
        try:
            plot_results(results, x, None, out)
        except UsageError:  # e.g. a suite with no eps (clean only): no curve, not an error
            return None
        return inline_svg(out.read_text(encoding="utf-8"), prefix)


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG document as an element for an HTML page: sized by CSS, ids made unique by ``prefix``."""
    svg = _METADATA.sub("", _PROLOG.sub("", svg)).strip()
    ids = set(_ID.findall(svg))
    svg = _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = _REFERENCE.sub(lambda m: m.group(1) + (f"{prefix}-{m.group(2)}" if m.group(2) in ids else m.group(2)),
                         svg)
    # Without fixed width/height the viewBox keeps the aspect ratio and CSS sets the width.
    while _ROOT_SIZE.match(svg):
        svg = _ROOT_SIZE.sub(r"\1", svg, count=1)
    return svg.replace("<svg ", '<svg class="plot" role="img" ', 1)


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI; ``UsageError`` (why) for a file that is not a PNG or too large to embed.

    A device, a pipe or a huge file in a run directory is refused before it is read.
    """
    data = read_bounded(path, "image", MAX_IMAGE_BYTES)
    if not data.startswith(PNG_SIGNATURE):
        raise UsageError(f"image {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
