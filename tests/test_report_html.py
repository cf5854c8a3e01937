"""``robench report``: one self-contained HTML page whose every number is its document's.

Real runs of every kind (a classification run with saved adversarial grids, an interrupted run of a
model that trips sanity flags, a Pixel-index run, a ReID run, the pinned AutoAttack document) go
into one report; the page is parsed back with the standard library and checked against the files.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from robench.api import EvaluationInterrupted
from robench.models import load_model
from robench.reporting.html import build_report, write_report
from robench.results.metric_table import metric_info
from cli_helpers import invoke, one_error_line, evaluate_with_state

GOLDEN_AUTOATTACK = Path(__file__).with_name("golden") / "autoattack.json"
HOSTILE = '<script>alert("x")</script> & \'q\' </td>'
REID_SUITE = "name: tiny-reid\ntask: reid\nattacks:\n  - attack: fgsm\n    label: fgsm-away\n    eps: [8/255]\n" \
             "    objective: away\n"


class Softmaxed(nn.Module):
    """Returns probabilities, and arrives in train mode: two sanity flags."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(dim=1)


class Page(HTMLParser):
    """What the tests read back: metric elements, tables (caption and cell texts), start tags, texts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.metrics: list[dict] = []  # attributes of each data-metric element, plus its text
        self.tables: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.warning_text = ""
        self._open_metric: list[dict] = []
        self._cell: list[str] | None = None
        self._in_caption = False
        self._warning_depth = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "data-metric" in attrs:
            self._open_metric.append({**attrs, "tag": tag, "text": ""})
        if tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables and self.tables[-1]["rows"]:
            self._cell = []
            self.tables[-1]["rows"][-1].append(self._cell)
        elif tag == "caption":
            self._in_caption = True
        if tag == "div" and "warnings" in attrs.get("class", "") or self._warning_depth and tag == "div":
            self._warning_depth += 1

    def handle_endtag(self, tag):
        if self._open_metric and self._open_metric[-1]["tag"] == tag:
            self.metrics.append(self._open_metric.pop())
        if tag in ("td", "th"):
            self._cell = None
        if tag == "caption":
            self._in_caption = False
        if tag == "div" and self._warning_depth:
            self._warning_depth -= 1

    def handle_data(self, data):
        for m in self._open_metric:
            m["text"] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._in_caption and self.tables:
            self.tables[-1]["caption"] += data
        if self._warning_depth:
            self.warning_text += data

    def table(self, caption_part: str, after: int = 0) -> list[list[str]]:
        found = [t for t in self.tables if caption_part in t["caption"]]
        return [["".join(c).strip() for c in row] for row in found[after]["rows"]]


# ------------------------------------------------------------------ runs of every kind
@pytest.fixture(scope="module")
def runs(tmp_path_factory, test_tensors, digits_split):
    root = tmp_path_factory.mktemp("report-runs")
    out = {}
    fgsm = invoke("eval", "example:digits", "--suite", "fgsm", "--limit", 100, "--save-adversarial", 4,
                  "-o", root / "fgsm", "--quiet")
    assert fgsm.exit_code == 0, fgsm.stderr
    out["fgsm"] = root / "fgsm"

    # An interrupted run of a flagged model, with a suite and an entry named to break markup.
    suite = {"name": HOSTILE, "attacks": [{"attack": "fgsm", "eps": [0.1, 0.2], "label": HOSTILE}]}
    calls = []

    def stop_after_first(n):
        calls.append(n)
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(EvaluationInterrupted) as info:
        # The bundled model: no training needed (the session's trained model takes a while on a busy CPU).
        evaluate_with_state(Softmaxed(load_model("example:digits").model).train(), test_tensors, suite, device="cpu",
                         batch_size=8, on_batch=stop_after_first)
    out["flagged"] = info.value.result.save(root / "flagged")

    _, x_te, _, y_te = digits_split
    folder = root / "digits"
    for i, (img, label) in enumerate(zip(x_te[:80], y_te[:80])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(folder / str(label) / f"{i:03d}.png")
    pixels = invoke("pixel-index", "example:digits", folder, "--pixels", "1,4", "--delta", "40", "--trials", 2,
                    "--out", root / "pixels", "--quiet")
    assert pixels.exit_code == 0, pixels.stderr
    out["pixels"] = root / "pixels"

    (root / "tiny-reid.yaml").write_text(REID_SUITE)
    reid = invoke("eval", "example:reid-digits", "--suite", root / "tiny-reid.yaml", "--rerank", "-o", root / "reid",
                  "--quiet")
    assert reid.exit_code == 0, reid.stderr
    out["reid"] = root / "reid"
    out["golden"] = GOLDEN_AUTOATTACK
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    result = invoke("report", *runs.values(), "--out", path, "--title", f"robustness {HOSTILE}")
    assert result.exit_code == 0, result.stderr
    assert f"report written to {path}" in result.stderr and result.stdout == ""
    text = path.read_text(encoding="utf-8")
    return path, text, Page(text)


def documents(runs) -> dict[str, dict]:
    """Run label (as the report names it) -> results.json; the two example-digits runs get their folder."""
    docs = {}
    for name, path in runs.items():
        file = path / "results.json" if path.is_dir() else path
        doc = json.loads(file.read_text())
        label = doc["model"]["name"]
        docs[f"{label} ({file.parent.name})" if label == "example-digits" else label] = doc
    return docs


def document_value(doc: dict, m: dict):
    """The value a metric element names, looked up in its results.json."""
    entry, metric = m["data-entry"], m["data-metric"]
    eps = float(m["data-eps"]) if "data-eps" in m else None
    if doc.get("schema") == "robench.pixel-index/1":
        if entry == "clean":
            return doc["clean"][metric]
        exp = next(e for e in doc["experiments"] if f"{e['experiment']}:{e['setting']}" == entry)
        return next(r for r in exp["results"] if r["pixels"] == int(m["data-pixels"]))[metric]
    if doc["task"] == "reid":
        if entry in ("clean", "clean+rerank"):
            return doc["clean" if entry == "clean" else "clean_reranked"][metric]
        base = entry.removesuffix("+rerank")
        a = next(a for a in doc["attacks"] if a["label"] == base and a["eps"] == eps)
        return (a["reranked"] if entry.endswith("+rerank") else a)[metric]
    if entry == "clean":
        return doc["clean"][metric]
    if entry in ("worst-case", "mean"):
        return doc[metric]
    a = next(a for a in doc["attacks"] if a["label"] == entry and a["eps"] == eps)
    if "data-part" in m:
        return next(p for p in a["parts"] if p["attack"] == m["data-part"])["accuracy_after"]
    return a[metric]


# ------------------------------------------------------------------ the numbers
def test_every_number_is_the_documents_value_rounded_as_compare_does(runs, report):
    _, _, page = report
    docs = documents(runs)
    assert set(docs) == {m["data-run"] for m in page.metrics}
    derived = [m for m in page.metrics if m.get("data-derived")]
    exact = [m for m in page.metrics if not m.get("data-derived")]
    assert exact and derived  # how many: test_every_entry_of_every_run_is_in_a_table
    for m in exact:
        expected = document_value(docs[m["data-run"]], m)
        assert float(m["data-value"]) == expected, m  # full precision, exactly
        shown = metric_info("accuracy" if "data-part" in m else m["data-metric"]).show(expected)
        assert m["text"].strip().removesuffix("%") == shown, m
    for m in derived:  # the alignment layout's Mean: the mean of the run's attack accuracies
        doc = docs[m["data-run"]]
        assert float(m["data-value"]) == pytest.approx(doc["mean_attack_accuracy"], rel=1e-12)
        assert m["text"] == metric_info("mean_attack_accuracy").show(doc["mean_attack_accuracy"])


def test_every_entry_of_every_run_is_in_a_table(runs, report):
    _, _, page = report
    docs = documents(runs)
    shown = {(m["data-run"], m["data-entry"], m.get("data-eps"), m.get("data-pixels"), m["data-metric"])
             for m in page.metrics}
    for run, doc in docs.items():
        if doc.get("schema") == "robench.pixel-index/1":
            for e in doc["experiments"]:
                for r in e["results"]:
                    for metric in ("pi", "misclassified", "recognition_rate"):
                        assert (run, f"{e['experiment']}:{e['setting']}", None, str(r["pixels"]), metric) in shown
            continue
        metrics = ("rank1", "rank5", "rank10", "mAP") if doc["task"] == "reid" else ("accuracy", "success_rate")
        for a in doc["attacks"]:
            for metric in metrics:
                assert (run, a["label"], repr(a["eps"]), None, metric) in shown, (run, a["label"], metric)


def test_tables_match_robench_compare(runs):
    # compare reads finished runs only; the report of the same runs prints the same table.
    page = Page(build_report([runs["fgsm"], runs["golden"]]))
    table = invoke("compare", runs["fgsm"], runs["golden"], "--format", "markdown")
    assert table.exit_code == 0, table.stderr
    assert page.table("accuracy (%)") == markdown_rows(table.stdout)
    pixel = invoke("compare", runs["pixels"], "--format", "markdown", "--metric", "misclassified")
    # Alone: in a report with other example-digits runs, its label carries the run's folder.
    assert Page(build_report([runs["pixels"]])).table("misclassified images") == markdown_rows(pixel.stdout)
    alignment = invoke("compare", runs["fgsm"], runs["golden"], "--format", "markdown", "--layout", "alignment")
    assert page.table("accuracy (%)", after=1) == markdown_rows(alignment.stdout)


def markdown_rows(text: str) -> list[list[str]]:
    """compare's markdown table as cell texts, best-value marks removed."""
    return [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")]


# ------------------------------------------------------------------ self-contained, well formed, escaped
def test_nothing_outside_the_page_is_referenced(runs, report):
    _, text, page = report
    lowered = text.lower()
    for pattern in ('src="http', "href=\"http", "<script", "<link", "@import", "url(http", "src=\"file", "<iframe"):
        assert pattern not in lowered, pattern
    ids = [attrs["id"] for _, attrs in page.tags if "id" in attrs]
    assert len(ids) == len(set(ids))  # figures' ids were made unique
    for tag, attrs in page.tags:
        for name in ("src", "href", "xlink:href"):
            if name in attrs:
                value = attrs[name]
                assert value.startswith("#") or value.startswith("data:image/png;base64,"), (tag, name, value)
                if value.startswith("#"):
                    assert value[1:] in ids, value
    assert ("meta", {"http-equiv": "Content-Security-Policy",
                     "content": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"}) in page.tags


def test_curves_are_inline_svg_that_parses(report):
    _, text, _ = report
    svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.DOTALL)
    assert len(svgs) == 2  # accuracy vs eps (classification), misclassification vs pixels
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox")
        assert len(list(root.iter())) > 100  # axes, ticks, curves, legend
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text


def test_hostile_names_are_escaped(runs, report):
    _, text, page = report
    assert HOSTILE not in text and "<script>" not in text
    entries = {m["data-entry"] for m in page.metrics}
    assert HOSTILE in entries  # the attribute reads back exactly
    assert any(row[0] == f"{HOSTILE} ε = 0.1" for row in page.table("accuracy (%)")[1:])
    title = re.search(r"<title>(.*?)</title>", text, flags=re.DOTALL).group(1)
    assert "<" not in title and "&lt;script&gt;" in title
    labelled = build_report([runs["pixels"]], title="t", labels=[HOSTILE])
    assert HOSTILE not in labelled and HOSTILE in {m["data-run"] for m in Page(labelled).metrics}


def test_flags_partial_runs_commands_and_examples_are_shown(runs, report):
    _, text, page = report
    flagged = json.loads((runs["flagged"] / "results.json").read_text())
    assert flagged["complete"] is False and set(flagged["sanity"]["flag_names"]) >= {"train_mode",
                                                                                      "probability_outputs"}
    for flag in flagged["sanity"]["flags"]:
        assert flag in page.warning_text
    evaluated = flagged["progress"]["evaluated"]
    assert f"partial: {evaluated} of 540 samples" in page.warning_text
    # The command that made each run (config.json), and none invented for a bare results.json.
    for name in ("fgsm", "pixels", "reid", "flagged"):
        command = json.loads((runs[name] / "config.json").read_text())["command"]
        assert command and html_escaped(command) in text
    assert text.count("Not recorded (no config.json") == 1  # the golden document
    # The saved grids, byte for byte, in entry order; their summaries are the file stems.
    pngs = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    files = [runs["fgsm"] / "adversarial" / f"fgsm_{n}_255.png" for n in (2, 4, 8)]
    assert [base64.b64decode(uri.split(",", 1)[1]) for uri in pngs] == [f.read_bytes() for f in files]
    assert [attrs["alt"] for tag, attrs in page.tags if tag == "img"] == [f.stem for f in files]
    # Each grid folds under a one-line summary (its stem, shown once); only the first is open.
    folded = [attrs for tag, attrs in page.tags if tag == "details" and attrs.get("class") == "grid"]
    assert len(folded) == 3 and ["open" in attrs for attrs in folded] == [True, False, False]
    for f in files:
        assert text.count(f"<summary>{f.stem}</summary>") == 1 and text.count(f">{f.stem}<") == 1


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# ------------------------------------------------------------------ command line
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path):
    missing = invoke("report", tmp_path / "nowhere", "--out", tmp_path / "r.html")
    assert missing.exit_code == 2 and "not found" in one_error_line(missing)
    (tmp_path / "empty").mkdir()
    empty = invoke("report", runs["fgsm"], tmp_path / "empty", "--out", tmp_path / "r.html")
    assert empty.exit_code == 2 and "no results.json in" in one_error_line(empty)
    wrong = invoke("report", runs["fgsm"], "--out", runs["fgsm"] / "results.json")
    assert wrong.exit_code == 2 and ".html" in one_error_line(wrong)
    assert json.loads((runs["fgsm"] / "results.json").read_text())["complete"] is True  # left alone
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"schema": "robench.results/1", "complete": true}')
    broken = invoke("report", tmp_path / "broken", "--out", tmp_path / "r.html")
    assert broken.exit_code == 2 and "task" in one_error_line(broken)
    assert not (tmp_path / "r.html").exists()


def test_an_existing_report_is_replaced(runs, tmp_path):
    out = tmp_path / "sub" / "report.html"
    out.parent.mkdir()
    out.write_text("an older report")
    written = write_report([runs["pixels"]], out, title="pixels only")
    assert written == out and "an older report" not in out.read_text()
    assert "<title>pixels only</title>" in out.read_text()


# ------------------------------------------------------------------ rendered by a browser
def test_a_headless_browser_renders_the_page(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine")
    path, _, _ = report
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1280,2000", path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    gray = pixels.mean(axis=2)
    assert gray.std() > 20  # text, tables and rules, not a blank page
    # The warning colour of the sanity-flag box is on the first screen.
    assert (np.abs(pixels.astype(int) - [255, 244, 224]).sum(axis=2) < 6).sum() > 5000
