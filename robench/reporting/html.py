"""One self-contained HTML report of result files: ``robench report RUN... --out report.html``.

The page needs nothing but itself: the stylesheet is inline, curves are inline SVG, saved
adversarial grids are ``data:`` URIs, and a Content-Security-Policy forbids any fetch. It
shows, per run, what was evaluated and how (model, suite, data, environment, the command),
the headline numbers and the sanity flags; then ``robench compare``'s paper-layout tables and
``robench plot``'s curves for each kind of run; then the saved adversarial examples.

Every number comes from the documents as ``compare`` reads them and carries machine-readable
``data-*`` attributes with the full-precision value (see ``html_tables``).
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from robench import __version__
from robench.errors import UsageError
from robench.reporting.html_figures import curve_svg, png_data_uri
from robench.reporting.html_style import STYLE
from robench.reporting.html_tables import KIND_TABLES, build_view, metric_attributes, table_html
from robench.results.file_names import entry_label, unique_stems
from robench.results.metric_table import metric_info
from robench.results.reading import (KNOWN_SCHEMAS, ResultFile, comparability_problems, load_json,
                                     read_result, results_frame, validate_document)
from robench.results.atomic import write_file_atomically

SUFFIXES = (".html", ".htm")
KIND_ORDER = ("classification", "reid", "pixel", "certify")
KIND_TITLES = {"classification": "Classification", "reid": "Re-identification", "pixel": "Pixel-index",
               "certify": "Certification"}
CURVES = {"classification": ("eps", "Accuracy vs eps, per model and attack (eps 0: clean accuracy)"),
          "pixel": ("pixels", "Misclassified images vs changed pixels, per model and setting")}
# Nothing outside the page may load: no network, no file, no script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
Warn = Callable[[str], None]


def _ignore(message: str) -> None:
    pass


# ------------------------------------------------------------------ reading
def read_runs(runs: Sequence[str | Path | ResultFile], labels: Sequence[str] | None = None) -> list[ResultFile]:
    """Run directories or results.json files, validated; same-named runs told apart by their directory.

    Partial runs (interrupted, ``complete: false``) are read too and marked as such in the report.
    """
    if not runs:
        raise UsageError("give at least one run directory or results.json file")
    if labels and len(labels) != len(runs):
        raise UsageError(f"--label was given {len(labels)} time(s) for {len(runs)} run(s)")
    read = [r if isinstance(r, ResultFile) else _read_run(Path(r), labels[i] if labels else None)
            for i, r in enumerate(runs)]
    names = [r.label for r in read]
    return [r if names.count(r.label) == 1 else ResultFile(r.path, r.doc, f"{r.label} ({r.path.parent.name})")
            for r in read]


def _read_run(path: Path, label: str | None) -> ResultFile:
    if path.is_dir() and not (path / "results.json").exists():
        raise UsageError(f"no results.json in {path}: not a robench run directory, or a run that never wrote one")
    try:
        return read_result(path, label)
    except UsageError:
        partial = _read_partial(path / "results.json" if path.is_dir() else path, label)
        if partial is None:
            raise
        return partial


def _read_partial(file: Path, label: str | None) -> ResultFile | None:
    """An interrupted run's document, validated as a finished one would be; None if it is not one."""
    try:
        doc = load_json(file)
    except UsageError:
        return None
    if not isinstance(doc, dict) or doc.get("complete") is not False or doc.get("schema") not in KNOWN_SCHEMAS:
        return None
    validate_document({**doc, "complete": True}, str(file))
    return ResultFile(file, doc, label or doc.get("model", {}).get("name") or file.parent.name)


# ------------------------------------------------------------------ API
def build_report(runs: Sequence[str | Path | ResultFile], title: str = "robench report",
                 labels: Sequence[str] | None = None, warn: Warn = _ignore) -> str:
    """The HTML page for ``runs`` (run directories, results.json files or read results).

    ``warn`` hears of each file left out of the page (an image that is not a readable PNG).
    """
    results = read_runs(runs, labels)
    by_kind = {k: [r for r in results if r.kind == k] for k in KIND_ORDER}
    by_kind = {k: v for k, v in by_kind.items() if v}
    sections = [_overview(results)]
    sections += [_kind_section(kind, group, f"k{i}") for i, (kind, group) in enumerate(by_kind.items())]
    sections.append(_runs_section(results, warn))
    return _page(title, results, sections, list(by_kind))


def write_report(runs: Sequence[str | Path | ResultFile], out: str | Path = "report.html",
                 title: str = "robench report", labels: Sequence[str] | None = None, warn: Warn = _ignore) -> Path:
    """Build the report and write it to ``out`` (an existing file there is replaced: it is derived data)."""
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--out must end in .html or .htm, got {out.name}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name the HTML file to write")
    page = build_report(runs, title=title, labels=labels, warn=warn)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder of {out}: {exc.strerror or exc}") from None
    write_file_atomically(out, page.encode("utf-8"))
    return out


# ------------------------------------------------------------------ page
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, results: list[ResultFile], sections: list[str], kinds: list[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = ['<a href="#overview">Overview</a>'] + [f'<a href="#kind-{k}">{KIND_TITLES[k]}</a>' for k in kinds]
    toc.append('<a href="#runs">Runs in detail</a>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="robench {_esc(__version__)}">',
        f"<title>{_esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body><main>",
        f"<header><h1>{_esc(title)}</h1>",
        f'<p class="meta">{len(results)} run{"s" if len(results) != 1 else ""} · generated {stamp} '
        f"by robench {_esc(__version__)}</p>",
        f'<nav class="toc">{"".join(toc)}</nav></header>',
        *sections,
        "<footer>Numbers are those of <code>robench compare</code> (same layouts and rounding); every value "
        "carries its full-precision value in a <code>data-value</code> attribute.</footer>",
        "</main></body></html>",
        "",
    ])


def _warnings(title: str, items: Iterable[str]) -> str:
    items = list(items)
    if not items:
        return ""
    lis = "".join(f"<li>{_esc(i)}</li>" for i in items)
    return f'<div class="warnings" role="alert"><strong>{_esc(title)}</strong><ul>{lis}</ul></div>'


# ------------------------------------------------------------------ overview
def _overview(results: list[ResultFile]) -> str:
    head = "".join(f'<th scope="col">{h}</th>' for h in ("run", "data", "n", "clean", "robustness", "status"))
    rows = "".join(_overview_row(r, i) for i, r in enumerate(results))
    flagged = [f"{r.label}: {flag}" for r in results for flag in _flags(r.doc)]
    partial = [f"{r.label}: {_status_text(r.doc)}" for r in results if not _complete(r.doc)]
    return "".join([
        '<section id="overview"><h2>Overview</h2>',
        _warnings("Sanity flags", flagged),
        _warnings("Partial runs (interrupted: numbers cover what finished only)", partial),
        f'<div class="scroll"><table class="overview"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        "</div></section>",
    ])


def _overview_row(r: ResultFile, i: int) -> str:
    what = f"{r.kind} · {r.doc.get('model', {}).get('name', '')} · {_suite_name(r)}"
    run = f'<a href="#run-{i}">{_esc(r.label)}</a><div class="sub">{_esc(what)}</div>'
    clean = "<br>".join(_metric_span(r, *m) for m in _clean_metrics(r)) or "-"
    robust = "<br>".join(_metric_span(r, *m) for m in _robust_metrics(r)) or "-"
    return (f'<tr><td class="run">{run}</td><td class="mono">{_esc(_data_name(r))}</td>'
            f'<td class="num">{_esc(_count(r))}</td><td class="num">{clean}</td><td class="num">{robust}</td>'
            f"<td>{_status_badges(r)}</td></tr>")


def _suite_name(r: ResultFile) -> str:
    if r.kind == "pixel":
        s = r.doc.get("settings", {})
        return f"{len(r.doc.get('experiments', []))} pixel setting(s), {s.get('trials', '?')} trial(s)"
    return str(r.doc.get("suite", {}).get("name", ""))


def _data_name(r: ResultFile) -> str:
    data = r.doc.get("data", {})
    return str(data.get("spec") or data.get("folder") or "")


def _count(r: ResultFile) -> str:
    doc = r.doc
    if r.kind == "reid":
        return f"{doc['data'].get('queries', '?')} queries, {doc['data'].get('gallery', '?')} gallery"
    if r.kind == "pixel":
        images = doc.get("images", {})
        return f"{images.get('evaluated', '?')} of {images.get('read', '?')} images"
    return str(doc.get("clean", {}).get("n", "?"))


# A metric shown in the overview: (caption, entry, metric, value, eps, pixels).
Metric = tuple[str, str, str, Any, Any, Any]


def _clean_metrics(r: ResultFile) -> list[Metric]:
    clean = r.doc.get("clean", {})
    if r.kind == "reid":
        return [("Rank-1", "clean", "rank1", clean.get("rank1"), 0.0, None),
                ("mAP", "clean", "mAP", clean.get("mAP"), 0.0, None)]
    return [("", "clean", "accuracy", clean.get("accuracy"), 0.0 if r.kind == "classification" else None, None)]


def _robust_metrics(r: ResultFile) -> list[Metric]:
    doc = r.doc
    if r.kind == "classification":
        if doc.get("robust_accuracy") is None:
            return []
        return [("worst case", "worst-case", "robust_accuracy", doc["robust_accuracy"], None, None)]
    if r.kind == "reid":
        attacked = [a for a in doc.get("attacks", []) if a.get("rank1") is not None]
        if not attacked:
            return []
        worst = min(attacked, key=lambda a: (a["rank1"], a.get("mAP") or 0.0))
        return [(f"{worst['label']} Rank-1", worst["label"], "rank1", worst["rank1"], worst.get("eps"), None),
                ("mAP", worst["label"], "mAP", worst.get("mAP"), worst.get("eps"), None)]
    experiments = doc.get("experiments") or []
    if not experiments or not experiments[0].get("results"):
        return []
    first, last = experiments[0], experiments[0]["results"][-1]
    return [(f"Pi {first['setting']}, {last['pixels']} px", f"{first['experiment']}:{first['setting']}", "pi",
             last.get("pi"), None, last["pixels"])]


def _shown(metric: str, value: Any) -> str:
    info = metric_info(metric)
    text = info.show(value)
    return f"{text}%" if info.percent and value is not None else text


def _metric_span(r: ResultFile, caption: str, entry: str, metric: str, value: Any, eps: Any, pixels: Any) -> str:
    attrs = metric_attributes(r.label, entry, metric, value, eps=eps, pixels=pixels)
    label = f'<span class="muted">{_esc(caption)}</span> ' if caption else ""
    return f'{label}<span class="metric"{attrs}>{_esc(_shown(metric, value))}</span>'


def _complete(doc: dict[str, Any]) -> bool:
    return doc.get("complete") is True


def _status_text(doc: dict[str, Any]) -> str:
    if _complete(doc):
        return "complete"
    progress = doc.get("progress") or {}
    if "evaluated" in progress and "total" in progress:
        unit = progress.get("unit") if isinstance(progress.get("unit"), str) else "samples"
        return f"partial: {progress['evaluated']} of {progress['total']} {unit}"
    return "partial"


def _flags(doc: dict[str, Any]) -> list[str]:
    sanity = doc.get("sanity")
    return list(sanity.get("flags") or []) if isinstance(sanity, dict) else []


def _status_badges(r: ResultFile) -> str:
    status = _status_text(r.doc)
    badges = [f'<span class="badge {"ok" if _complete(r.doc) else "warn"}">{_esc(status)}</span>']
    flags = _flags(r.doc)
    if flags:
        badges.append(f'<span class="badge warn">{len(flags)} sanity flag{"s" if len(flags) > 1 else ""}</span>')
    return "".join(badges)


# ------------------------------------------------------------------ per kind: tables and curves
def _kind_section(kind: str, group: list[ResultFile], prefix: str) -> str:
    rows = results_frame(group)
    parts = [f'<section id="kind-{kind}"><h2>{KIND_TITLES[kind]}: tables and curves</h2>']
    parts.append(_warnings("Not comparable (shown side by side: read with care)", comparability_problems(group)))
    for n, (layout, metric) in enumerate(KIND_TABLES[kind]):
        view = build_view(rows, layout, metric)
        if view is not None:
            parts.append(table_html(view, f"{prefix}-table-{n}"))
    if kind in CURVES:
        axis, caption = CURVES[kind]
        svg = curve_svg(group, axis, f"{prefix}-fig")
        if svg:
            parts.append(f'<figure class="curve">{svg}<figcaption>{_esc(caption)}</figcaption></figure>')
    parts.append("</section>")
    return "".join(parts)


# ------------------------------------------------------------------ per run: provenance, flags, examples
def _runs_section(results: list[ResultFile], warn: Warn) -> str:
    return '<section id="runs"><h2>Runs in detail</h2>' + "".join(
        _run_card(r, i, warn) for i, r in enumerate(results)) + "</section>"


def _run_card(r: ResultFile, i: int, warn: Warn) -> str:
    doc = r.doc
    head = (f'<h3 id="run-{i}"><span class="label">{_esc(r.label)}</span>'
            f'<span class="badge kind">{_esc(r.kind)}</span>{_status_badges(r)}</h3>')
    return "".join([
        f'<article class="card">{head}',
        _sanity_block(r),
        f'<dl class="facts">{"".join(_facts(r))}</dl>',
        "<h4>Command</h4>", _command_block(r),
        "<h4>Environment</h4>", f'<dl class="facts">{"".join(_env_facts(doc.get("env") or {}))}</dl>',
        _parts_tables(r),
        _grids(r, i, warn),
        "</article>",
    ])


def _sanity_block(r: ResultFile) -> str:
    flags = _flags(r.doc)
    if flags:
        names = (r.doc.get("sanity") or {}).get("flag_names") or [""] * len(flags)
        items = [f"{name}: {flag}" if name else flag for name, flag in zip(names, flags)]
        return _warnings("Sanity flags", items)
    if r.kind == "pixel":
        return '<p class="muted">Pixel-index runs have no sanity checks.</p>'
    return '<p class="okline">No sanity flag raised.</p>'


def _fact(name: str, value: Any, mono: bool = False) -> str:
    if value is None or value == "":
        return ""
    text = f'<span class="mono">{_esc(value)}</span>' if mono else _esc(value)
    return f"<dt>{_esc(name)}</dt><dd>{text}</dd>"


def _short(digest: Any) -> str | None:
    return f"{digest[:16]}…" if isinstance(digest, str) and len(digest) > 16 else digest


def _facts(r: ResultFile) -> list[str]:
    doc = r.doc
    model, suite, data = doc.get("model") or {}, doc.get("suite") or {}, doc.get("data") or {}
    norm = model.get("normalization")
    facts = [_fact("results", str(r.path), mono=True),
             _fact("model", model.get("name")), _fact("architecture", model.get("arch"), mono=True),
             _fact("checkpoint", model.get("source"), mono=True), _fact("sha256", _short(model.get("sha256")), True),
             _fact("normalization", json.dumps(norm) if norm is not None else "none")]
    if r.kind == "pixel":
        facts += [_fact("settings", json.dumps(doc.get("settings") or {}), mono=True),
                  _fact("images", _image_counts(doc.get("images") or {}))]
    else:
        facts += [_fact("suite", suite.get("name")), _fact("suite file", suite.get("source"), mono=True),
                  _fact("suite sha256", _short(suite.get("sha256")), mono=True),
                  _fact("overrides", json.dumps(suite["overrides"]) if suite.get("overrides") else None, True)]
    facts += [_fact("data", data.get("spec") or data.get("folder"), mono=True),
              _fact("samples", _count(r)), _fact("data fingerprint", _short(data.get("fingerprint")), mono=True),
              _fact("skipped files", len(data["skipped"]) if data.get("skipped") else None),
              _fact("status", _status_text(doc))]
    if r.kind == "reid":
        facts.append(_fact("protocol", ", ".join(f"{k} {v}" for k, v in (doc.get("protocol") or {}).items())))
    return facts


def _image_counts(images: dict[str, Any]) -> str:
    return (f"{images.get('read', '?')} read, {images.get('evaluated', '?')} evaluated, "
            f"{images.get('excluded_misclassified', '?')} misclassified before any change, "
            f"{len(images.get('skipped') or [])} skipped")


def _env_facts(env: dict[str, Any]) -> list[str]:
    versions = " · ".join(f"{k} {env[k]}" for k in ("robench", "torch", "torchvision", "python", "numpy") if k in env)
    device = env.get("device")
    if device and env.get("device_name"):
        device = f"{device} ({env['device_name']})"
    seconds = env.get("seconds")
    return [_fact("software", versions or None), _fact("device", device), _fact("precision", env.get("precision")),
            _fact("seed", env.get("seed")), _fact("batch size", env.get("batch_size")),
            _fact("processes", env.get("processes")),
            _fact("time", f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else None),
            _fact("finished", env.get("finished_at"))]


def recorded_command(r: ResultFile) -> str | None:
    """The command line that made the run: ``env.command`` if the document has one, else config.json's."""
    command = (r.doc.get("env") or {}).get("command")
    if isinstance(command, str) and command:
        return command
    config = r.path.parent / "config.json"
    try:
        value = load_json(config, "config.json") if config.exists() else None
    except UsageError:  # an unreadable config.json only costs the report its command line
        return None
    value = value.get("command") if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def _command_block(r: ResultFile) -> str:
    command = recorded_command(r)
    if command is None:
        return '<p class="muted">Not recorded (no config.json with the command beside this results.json).</p>'
    return f'<pre class="command"><code>{_esc(command)}</code></pre>'


def _parts_tables(r: ResultFile) -> str:
    """AutoAttack's log: for each composite entry, the points each member broke first."""
    out = []
    for a in r.doc.get("attacks") or []:
        parts = a.get("parts") or []
        if not parts:
            continue
        rows = "".join(_part_row(r, a, p) for p in parts)
        out.append(f'<table><caption>{_esc(a["label"])} (eps {_esc(_eps_text(a))}): members in order</caption>'
                   '<thead><tr><th scope="col">member</th><th scope="col">broken first</th>'
                   f'<th scope="col">robust accuracy after</th></tr></thead><tbody>{rows}</tbody></table>')
    return ("<h4>Composite attacks</h4>" + "".join(out)) if out else ""


def _part_row(r: ResultFile, a: dict[str, Any], part: dict[str, Any]) -> str:
    member, after = str(part.get("attack", "")), part.get("accuracy_after")
    attrs = metric_attributes(r.label, a["label"], "accuracy_after", after, eps=a.get("eps"), part=member)
    return (f'<tr><th scope="row">{_esc(member)}</th><td class="num">{_esc(part.get("broken", ""))}</td>'
            f'<td class="num"><span class="metric"{attrs}>{_esc(_shown("accuracy", after))}</span></td></tr>')


def _eps_text(a: dict[str, Any]) -> str:
    text = (a.get("params") or {}).get("eps_expr")
    eps = a.get("eps")
    return text or ("-" if eps is None or (isinstance(eps, float) and math.isnan(eps)) else f"{eps:.4g}")


def _entry_order(doc: dict[str, Any], files: Iterable[Path]) -> list[Path]:
    """The grids in the suite's entry order (as the files were named), then any others by name."""
    texts = [_entry_file_text(a) for a in doc.get("attacks") or []]
    stems = unique_stems([entry_label(str(a.get("label", "")), t) for a, t in zip(doc.get("attacks") or [], texts)])
    rank = {stem: k for k, stem in enumerate(stems)}
    return sorted(files, key=lambda f: (rank.get(f.stem, len(rank)), f.name))


def _entry_file_text(a: dict[str, Any]) -> str:
    params = a.get("params") or {}
    if a.get("eps") is not None:
        return str(params.get("eps_expr") or "")
    return str(params.get("pixels") or "")


def _grids(r: ResultFile, i: int, warn: Warn) -> str:
    """The run's saved adversarial grids (``adversarial/*.png``), if any were saved."""
    folder = r.path.parent / "adversarial"
    if not folder.is_dir():
        return ""
    figures: list[str] = []
    skipped: list[str] = []
    for png in _entry_order(r.doc, folder.glob("*.png")):
        try:
            uri = png_data_uri(png)
        except UsageError as exc:  # one unreadable image costs the page that image, not the report
            warn(f"{exc}: left out of the report")
            skipped.append(png.name)
            continue
        # Folded, one line each: a suite's grids are tall; the image carries its own title.
        figures.append(f'<details class="grid"{" open" if not figures else ""}><summary>{_esc(png.stem)}</summary>'
                       f'<img src="{uri}" alt="{_esc(png.stem)}"></details>')
    if not figures and not skipped:
        return ""
    note = _warnings("Not embedded (not a regular PNG file, or too large)", skipped)
    # The files in adversarial/ hold the full-size figures.
    return f'<h4 id="run-{i}-examples">Adversarial examples</h4>{note}<div class="grids">{"".join(figures)}</div>'
