"""Read result documents of every kind back into one long table.

Classification (``robench.results/1``, task classification), re-identification
(same schema, task reid), Pixel-index (``robench.pixel-index/1``) and certification
(``robench.certify/1``) documents become rows keyed by (model, attack entry, its settings, eps or pixel count,
metric), which ``compare`` pivots and ``gate`` matches run against run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from robench.errors import UsageError
from robench.files import read_bounded_text
from robench.results.schema import CERTIFY_SCHEMA, CHECK_SCHEMA, PIXEL_SCHEMA, SCHEMA
from robench.results import minimum_norm
from robench.results.metric_table import RANK_KEY
from robench.results.tidy import TIDY_COLUMNS, document_kind, tidy_rows

KNOWN_SCHEMAS = (SCHEMA, PIXEL_SCHEMA, CERTIFY_SCHEMA)
# Settings two certifications must share to be compared: the smoothing (the radii only choose what is reported).
CERTIFY_SETTINGS = ("sigma", "n0", "n", "alpha")
# The tidy rows of results.csv, plus the file each row was read from.
ROW_COLUMNS = [*TIDY_COLUMNS, "source"]
# Far above any real document (the largest are ReID runs listing skipped files), far below what hurts.
MAX_RESULT_BYTES = 64 * 2 ** 20


@dataclass
class ResultFile:
    path: Path
    doc: dict[str, Any]
    label: str

    @property
    def kind(self) -> str:
        return document_kind(self.doc)

    @property
    def fingerprint(self) -> str | None:
        return self.doc.get("env", {}).get("dataset_fingerprint") or self.doc.get("data", {}).get("fingerprint")

    @property
    def settings_hash(self) -> str | None:
        """What must agree for two runs to be comparable, beyond the data: the suite or the pixel settings."""
        if self.kind == "pixel":
            s = self.doc.get("settings", {})
            return json.dumps({k: s.get(k) for k in ("pixels", "trials", "seed", "shared_positions", "channels")},
                              sort_keys=True)
        if self.kind == "certify":
            s = self.doc.get("settings", {})
            return json.dumps({k: s.get(k) for k in CERTIFY_SETTINGS}, sort_keys=True)
        return self.doc.get("suite", {}).get("sha256")


def read_result(path: str | Path, label: str | None = None) -> ResultFile:
    """A ``results.json`` file or a run directory holding one, validated before anything reads it."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise UsageError(f"result file not found: {path}")
    doc = load_json(p)
    if isinstance(doc, dict) and doc.get("schema") == CHECK_SCHEMA:
        raise UsageError(f"{p} holds an attack check ({CHECK_SCHEMA}); compare, plot, gate and report read the "
                         "results of robench eval and robench pixel-index")
    if not isinstance(doc, dict) or doc.get("schema") not in KNOWN_SCHEMAS:
        schema = _show(doc.get("schema")) if isinstance(doc, dict) else "?"
        raise UsageError(f"{p} is not a robench result (schema {schema}; expected one of {', '.join(KNOWN_SCHEMAS)})")
    validate_document(doc, str(p))
    return ResultFile(p, doc, label or doc.get("model", {}).get("name") or p.parent.name)


def skip_unfinished_dirs(paths: list[str], warn) -> list[str]:
    """Run directories without a results.json (a run that failed before writing, an old empty
    folder) are left out with a warning, so globs like ``runs/digits/*/2026*`` keep working.

    Explicit files, and directories that do hold results, pass through; nothing left is an error.
    """
    # exists(), not is_file(): a results.json that is a device or a pipe is refused when read, not skipped.
    kept = [p for p in paths if not (Path(p).is_dir() and not (Path(p) / "results.json").exists())]
    skipped = len(paths) - len(kept)
    if skipped and not kept:
        raise UsageError(f"no results.json in {paths[0]}" + (f" nor in the {skipped - 1} other director(ies)"
                                                              if skipped > 1 else ""))
    if skipped:
        warn(f"skipped {skipped} run director{'y' if skipped == 1 else 'ies'} without results.json: "
             + ", ".join(p for p in paths if p not in kept))
    return kept


def load_json(p: Path, what: str = "results.json") -> Any:
    """A bounded JSON file (a regular file, at most MAX_RESULT_BYTES), duplicate keys refused."""
    text = read_bounded_text(p, what, MAX_RESULT_BYTES)
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as exc:
        raise UsageError(f"{p}: duplicate key {exc.args[0]!r} in a JSON object: the document is ambiguous "
                         "(robench never writes one)") from None
    # ValueError covers malformed JSON and integers too long to parse; RecursionError, absurd nesting.
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{p} is not a readable {what}: {exc}") from None


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Parsers disagree on which of two equal keys wins, so a document with both means two things."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def result_rows(result: ResultFile, keep_null: bool = False) -> list[dict[str, Any]]:
    """The document's tidy rows labelled with the result's label; null values only with ``keep_null``."""
    return [{**row, "source": str(result.path)} for row in tidy_rows(result.doc, result.label, keep_null)]


def results_frame(results: list[ResultFile], keep_null: bool = False) -> pd.DataFrame:
    rows = [row for r in results for row in result_rows(r, keep_null)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def comparability_problems(results: list[ResultFile]) -> list[str]:
    """Why these runs should not share a table: different data, settings or AP conventions."""
    problems = []
    kinds = {r.kind for r in results}
    if len(kinds) > 1:
        problems.append(f"results of different kinds: {', '.join(sorted(kinds))}")
    for attr, what in (("fingerprint", "dataset fingerprint"), ("settings_hash", "suite settings")):
        values = {getattr(r, attr) for r in results}
        if len(values) > 1:
            groups: dict[str | None, list[str]] = {}
            for r in results:
                groups.setdefault(getattr(r, attr), []).append(r.label)
            problems.append(f"different {what}: " + "; ".join(", ".join(v) for v in groups.values()))
    aps = {r.doc.get("clean", {}).get("ap_convention") for r in results if r.kind == "reid"}
    if len(aps) > 1:
        problems.append(f"different AP conventions: {', '.join(sorted(map(str, aps)))}")
    return problems


# ------------------------------------------------------------------ validation
# Every field the readers use is checked before they run: a hostile or damaged document gives one line
# naming the file and the field, never a traceback or a silently wrong verdict. Fields robench does not
# read are left alone, so documents written by newer versions (with more fields) still read.
_MISSING = object()
_COUNT_MAX = 2 ** 53  # larger integers are not exact as floats, and no run has that many samples
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FLAG_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _show(value: Any) -> str:
    """A value as JSON would spell it (NaN, Infinity, "false"), cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is _MISSING:
        return "nothing (the field is missing)"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Checker:
    """Field checks for one document; a failure names the file and the field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise UsageError(f"{self.source}: {path}: {message}")

    def get(self, obj: dict, key: str, path: str, required: bool = True) -> Any:
        if key in obj:
            return obj[key]
        if required:
            self.fail(_join(path, key), "field required")
        return _MISSING

    def object(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, got {_show(value)}")
        return value

    def array(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_show(value)}")
        return value

    def number(self, value: Any, path: str, high: float | None = None, nullable: bool = False) -> None:
        """Finite, >= 0 and, with ``high``, at most ``high``; JSON's NaN/Infinity literals are refused."""
        if value is _MISSING or (value is None and nullable):
            return
        if not _finite_at_least_zero(value) or (high is not None and value > high):
            where = f"in [0, {high:g}]" if high is not None else ">= 0"
            self.fail(path, f"must be a finite number {where}{' or null' if nullable else ''}, got {_show(value)}")

    def fraction(self, value: Any, path: str, nullable: bool = False) -> None:
        self.number(value, path, high=1.0, nullable=nullable)

    def count(self, value: Any, path: str, at_most: tuple[str, Any] | None = None, nullable: bool = False) -> None:
        """A non-negative integer; ``at_most`` = (field name, its value) for counts bounded by another."""
        if value is _MISSING or (value is None and nullable):
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _COUNT_MAX:
            self.fail(path, f"must be a non-negative integer, got {_show(value)}")
        if at_most is not None and isinstance(at_most[1], int) and value > at_most[1]:
            self.fail(path, f"must be at most {at_most[0]} ({at_most[1]}), got {value}")

    def text(self, value: Any, path: str, nullable: bool = False) -> None:
        """Strings that end up in terminals, tables and XML: control characters are refused."""
        if value is _MISSING or (value is None and nullable):
            return
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_show(value)}")
        if _CONTROL.search(value):
            self.fail(path, f"must not contain control characters, got {_show(value)}")


def _finite_at_least_zero(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an integer too large for a float
        return False


def validate_document(doc: dict[str, Any], source: str) -> None:
    """Raise ``UsageError`` (file, field path, what is wrong) unless ``doc`` is a finished robench result."""
    check = _Checker(source)
    _check_complete(doc, source)
    _check_metadata(check, doc)
    if doc["schema"] == "robench.pixel-index/1":
        task = check.get(doc, "task", "", required=False)
        if task is not _MISSING and task != "pixel-index":
            check.fail("task", f"must be \"pixel-index\" in a robench.pixel-index/1 document, got {_show(task)}")
        _check_pixel(check, doc)
    elif doc["schema"] == CERTIFY_SCHEMA:
        if check.get(doc, "task", "") != "certify":
            check.fail("task", f"must be \"certify\" in a robench.certify/1 document, got {_show(doc['task'])}")
        _check_certify(check, doc)
    else:
        task = check.get(doc, "task", "")
        if task not in ("classification", "reid"):
            check.fail("task", f"must be \"classification\" or \"reid\", got {_show(task)}")
        (_check_classification if task == "classification" else _check_reid)(check, doc)
    _check_sanity(check, doc)


def _check_complete(doc: dict[str, Any], source: str) -> None:
    complete = doc.get("complete", _MISSING)
    if complete is False:
        raise UsageError(f"{source} is a partial result (the run did not finish)")
    # Only JSON true counts: 1, "true" or a missing field could mean anything.
    if complete is not True:
        raise UsageError(f"{source}: complete must be true (got {_show(complete)}): the run did not finish")


def _check_metadata(check: _Checker, doc: dict[str, Any]) -> None:
    """The blocks the readers look into for labels and comparability; each is optional."""
    for block, fields in (("model", ("name",)), ("suite", ("name", "sha256")), ("data", ("fingerprint",)),
                          ("env", ("dataset_fingerprint",)), ("settings", ())):
        value = check.get(doc, block, "", required=False)
        if value is _MISSING:
            continue
        check.object(value, block)
        for key in fields:
            check.text(check.get(value, key, block, required=False), _join(block, key), nullable=True)


def _check_clean_counts(check: _Checker, clean: dict, path: str, required: bool = True) -> None:
    n = check.get(clean, "n", path, required)
    check.count(n, _join(path, "n"))
    check.count(check.get(clean, "correct", path, required=False), _join(path, "correct"), at_most=("n", n))


def _check_params(check: _Checker, entry: dict, path: str) -> None:
    params = check.get(entry, "params", path, required=False)
    if params is _MISSING:
        return
    path = _join(path, "params")
    check.object(params, path)
    pixels = check.get(params, "pixels", path, required=False)
    if pixels is not None:
        check.count(pixels, _join(path, "pixels"))
    check.text(check.get(params, "eps_expr", path, required=False), _join(path, "eps_expr"), nullable=True)


def _check_entry_identity(check: _Checker, entry: dict, path: str) -> None:
    """What names and matches an attack entry: attack, label, eps, params."""
    check.text(check.get(entry, "attack", path), _join(path, "attack"))
    check.text(check.get(entry, "label", path), _join(path, "label"))
    check.text(check.get(entry, "norm", path, required=False), _join(path, "norm"), nullable=True)
    check.number(check.get(entry, "eps", path), _join(path, "eps"), nullable=True)
    _check_params(check, entry, path)


def _check_classification(check: _Checker, doc: dict[str, Any]) -> None:
    clean = check.object(check.get(doc, "clean", ""), "clean")
    check.fraction(check.get(clean, "accuracy", "clean"), "clean.accuracy")
    _check_clean_counts(check, clean, "clean")
    for i, entry in enumerate(check.array(check.get(doc, "attacks", ""), "attacks")):
        path = _join("attacks", i)
        check.object(entry, path)
        _check_entry_identity(check, entry, path)
        check.fraction(check.get(entry, "accuracy", path), _join(path, "accuracy"))
        # null when no sample was attacked (every clean prediction was already wrong)
        check.fraction(check.get(entry, "success_rate", path), _join(path, "success_rate"), nullable=True)
        n = check.get(entry, "n", path)
        check.count(n, _join(path, "n"))
        check.count(check.get(entry, "attacked", path, required=False), _join(path, "attacked"), at_most=("n", n))
    # null for a suite without attacks
    for key in ("robust_accuracy", "mean_attack_accuracy"):
        check.fraction(check.get(doc, key, "", required=False), key, nullable=True)
    _check_classification_counts(check, doc)
    minimum_norm.check_blocks(check, doc)


def _check_reid_metrics(check: _Checker, metrics: Any, path: str) -> None:
    check.object(metrics, path)
    for key, value in metrics.items():
        if key.startswith("rank"):  # every rank key is read as a CMC value
            if not RANK_KEY.match(key):
                check.fail(_join(path, key), "a CMC key must be rank followed by a number, e.g. rank1")
            check.fraction(value, _join(path, key))
    _check_cmc_order(check, metrics, path)
    check.fraction(check.get(metrics, "mAP", path), _join(path, "mAP"))
    # mINP is null when it was not computed
    check.fraction(check.get(metrics, "mINP", path, required=False), _join(path, "mINP"), nullable=True)
    queries = check.get(metrics, "queries", path)
    check.count(queries, _join(path, "queries"))
    check.count(check.get(metrics, "valid_queries", path, required=False), _join(path, "valid_queries"),
                at_most=("queries", queries))
    check.text(check.get(metrics, "ap_convention", path, required=False), _join(path, "ap_convention"),
               nullable=True)


def _check_reid(check: _Checker, doc: dict[str, Any]) -> None:
    _check_reid_metrics(check, check.get(doc, "clean", ""), "clean")
    reranked = check.get(doc, "clean_reranked", "", required=False)
    if reranked not in (None, _MISSING):
        _check_reid_metrics(check, reranked, "clean_reranked")
    for i, entry in enumerate(check.array(check.get(doc, "attacks", ""), "attacks")):
        path = _join("attacks", i)
        check.object(entry, path)
        _check_entry_identity(check, entry, path)
        _check_reid_metrics(check, entry, path)
        reranked = check.get(entry, "reranked", path, required=False)
        if reranked not in (None, _MISSING):
            _check_reid_metrics(check, reranked, _join(path, "reranked"))


def _check_pixel(check: _Checker, doc: dict[str, Any]) -> None:
    clean = check.get(doc, "clean", "", required=False)
    if clean is not _MISSING:
        check.object(clean, "clean")
        # null when the folder had no labels (the clean prediction is the reference)
        check.fraction(check.get(clean, "accuracy", "clean", required=False), "clean.accuracy", nullable=True)
        _check_clean_counts(check, clean, "clean", required=False)
        if clean.get("accuracy") is not None and clean.get("n") and clean.get("correct") is not None:
            _clean_correct(check, clean, clean["n"])
    for i, exp in enumerate(check.array(check.get(doc, "experiments", ""), "experiments")):
        path = _join("experiments", i)
        check.object(exp, path)
        check.text(check.get(exp, "experiment", path), _join(path, "experiment"))
        check.text(check.get(exp, "setting", path), _join(path, "setting"))
        for j, row in enumerate(check.array(check.get(exp, "results", path), _join(path, "results"))):
            _check_pixel_row(check, row, _join(_join(path, "results"), j))


def _check_certify(check: _Checker, doc: dict[str, Any]) -> None:
    """The accuracies the readers use, each correct / n over the same samples; the certified accuracy
    never rises with the radius (a radius of at least r is one of at least any smaller r)."""
    n = _check_answers(check, doc, "clean", None)
    if n == 0:
        check.fail("clean.n", "is 0: a finished certification has samples")
    _check_answers(check, doc, "smoothed", n)
    last: tuple[float, int] | None = None
    for i, row in enumerate(check.array(check.get(doc, "certified_accuracy", ""), "certified_accuracy")):
        path = _join("certified_accuracy", i)
        check.object(row, path)
        radius, correct = check.get(row, "radius", path), check.get(row, "correct", path)
        check.number(radius, _join(path, "radius"))
        check.count(correct, _join(path, "correct"), at_most=("clean.n", n))
        _check_share(check, row, path, correct, n)
        if last is not None and radius >= last[0] and correct > last[1]:
            check.fail(_join(path, "correct"), f"must be at most {last[1]} (the count at radius {last[0]:g}): "
                       f"certified accuracy never rises with the radius, got {correct}")
        last = (radius, correct)


def _check_answers(check: _Checker, doc: dict[str, Any], block: str, n: int | None) -> int:
    """A block of counts over the samples (``clean``, ``smoothed``): its n (equal to ``n`` when given), its
    correct count and its accuracy, correct / n."""
    answers = check.object(check.get(doc, block, ""), block)
    count = check.get(answers, "n", block)
    check.count(count, _join(block, "n"))
    if n is not None and count != n:
        check.fail(_join(block, "n"), f"must equal clean.n ({n}): both count the same samples, got {count}")
    correct = check.get(answers, "correct", block)
    check.count(correct, _join(block, "correct"), at_most=("n", count))
    _check_share(check, answers, block, correct, count)
    return count


def _check_share(check: _Checker, obj: dict, path: str, correct: int, n: int) -> None:
    accuracy = check.get(obj, "accuracy", path)
    check.fraction(accuracy, _join(path, "accuracy"), nullable=n == 0)
    if n and not _close(accuracy, correct / n):
        check.fail(_join(path, "accuracy"), f"must be correct / n = {correct}/{n} = {correct / n:.6g}, "
                   f"got {_show(accuracy)}")


def _check_pixel_row(check: _Checker, row: Any, path: str) -> None:
    check.object(row, path)
    pixels = check.get(row, "pixels", path)
    check.count(pixels, _join(path, "pixels"))
    if pixels == 0:
        check.fail(_join(path, "pixels"), "must be at least 1, got 0")
    total = check.get(row, "total", path)
    check.count(total, _join(path, "total"))
    misclassified = check.get(row, "misclassified", path)
    check.number(misclassified, _join(path, "misclassified"))
    if misclassified > total:  # a mean over trials of counts out of total
        check.fail(_join(path, "misclassified"), f"must be at most total ({total}), got {misclassified}")
    # null in the attack experiment when no adversarial example was made; pi is absent there
    check.fraction(check.get(row, "recognition_rate", path, required=False), _join(path, "recognition_rate"),
                   nullable=True)
    check.number(check.get(row, "pi", path, required=False), _join(path, "pi"), nullable=True)
    for factor in ("w", "p", "r", "a"):
        check.fraction(check.get(row, factor, path, required=False), _join(path, factor), nullable=True)
    _check_pixel_row_terms(check, row, path)


# ------------------------------------------------------------------ consistency
# Values each in range can still contradict each other: every attack at accuracy 1.0 under a clean
# accuracy of 0.98 is impossible, and a gate must not pass it. The writers derive every number from
# per-sample counts, so these identities hold in each document robench writes, partial ones included.
# Floats are compared with a relative tolerance far above rounding (JSON keeps a float exactly) and
# far below one sample out of any real n.
_REL_TOL = 1e-9


def _close(value: float, expected: float) -> bool:
    return math.isclose(value, expected, rel_tol=_REL_TOL, abs_tol=1e-12)


def _samples(check: _Checker, value: float, n: int, path: str) -> int:
    """How many of ``n`` samples the fraction ``value`` counts; refused unless a whole number."""
    count = round(value * n)
    if not _close(value, count / n):
        check.fail(path, f"{_show(value)} is not a whole number of samples out of n = {n}")
    return count


def _check_classification_counts(check: _Checker, doc: dict[str, Any]) -> None:
    """Clean, per-entry and summary numbers agree as the writer derives them (robench.api)."""
    clean, n = doc["clean"], doc["clean"]["n"]
    if n == 0:
        check.fail("clean.n", f"is 0, yet clean.accuracy is {_show(clean['accuracy'])}: an accuracy needs samples")
    correct = _clean_correct(check, clean, n)
    robust = [_entry_robust(check, entry, _join("attacks", i), clean, correct)
              for i, entry in enumerate(doc["attacks"])]
    _check_summaries(check, doc, n, correct, robust)


def _clean_correct(check: _Checker, clean: dict, n: int) -> int:
    correct = clean.get("correct")
    if correct is None:  # optional: the accuracy then says how many
        return _samples(check, clean["accuracy"], n, "clean.accuracy")
    if not _close(clean["accuracy"], correct / n):
        check.fail("clean.accuracy", f"must be correct / n = {correct}/{n} = {correct / n:.6g}, "
                   f"got {_show(clean['accuracy'])}")
    return correct


def _entry_robust(check: _Checker, entry: dict, path: str, clean: dict, correct: int) -> int:
    """The entry's count of robust samples, after checking it against the clean counts.

    Only clean-correct samples are attacked; a misclassified one is never robust. So robust <= correct,
    attacked == correct, and the fooled ones are the attacked ones that are not robust.
    """
    n = clean["n"]
    if entry["n"] != n:
        check.fail(_join(path, "n"), f"must equal clean.n ({n}): an entry counts every sample, got {entry['n']}")
    robust = _samples(check, entry["accuracy"], n, _join(path, "accuracy"))
    if robust > correct:
        check.fail(_join(path, "accuracy"), f"{_show(entry['accuracy'])} is above clean.accuracy "
                   f"{_show(clean['accuracy'])}: only samples classified correctly can stay robust")
    attacked = entry.get("attacked", correct)
    if attacked != correct:
        check.fail(_join(path, "attacked"), f"must equal clean.correct ({correct}): the attack runs on the "
                   f"correctly classified samples, got {attacked}")
    rate = entry.get("success_rate")
    if rate is None:  # not measured: the gate treats it as not comparable
        return robust
    if attacked == 0:
        check.fail(_join(path, "success_rate"), f"must be null when no sample was attacked, got {_show(rate)}")
    expected = (attacked - robust) / attacked
    if not _close(rate, expected):
        check.fail(_join(path, "success_rate"), f"must be 1 - robust / attacked = 1 - {robust}/{attacked} = "
                   f"{expected:.6g}, got {_show(rate)}")
    return robust


def _check_summaries(check: _Checker, doc: dict[str, Any], n: int, correct: int, robust: list[int]) -> None:
    """``robust_accuracy`` (robust under every entry, per sample) and ``mean_attack_accuracy``."""
    worst, mean = doc.get("robust_accuracy"), doc.get("mean_attack_accuracy")
    if not robust:  # robench writes null here; nothing to agree with
        return
    if worst is not None:
        count = _samples(check, worst, n, "robust_accuracy")
        # At most the weakest entry's count; at least what is left if every entry broke other samples.
        low, high = max(0, correct - sum(correct - r for r in robust)), min(robust)
        if not low <= count <= high:
            check.fail("robust_accuracy", f"must lie between {low}/{n} and the lowest entry accuracy {high}/{n} "
                       f"(a sample is robust overall only if robust under every entry), got {_show(worst)}")
    if mean is not None:
        expected = sum(a["accuracy"] for a in doc["attacks"]) / len(robust)
        if not _close(mean, expected):
            check.fail("mean_attack_accuracy", f"must be the mean of the entries' accuracies ({expected:.6g}), "
                       f"got {_show(mean)}")


def _check_cmc_order(check: _Checker, metrics: dict, path: str) -> None:
    """A match within the first k results is within the first k + 1: CMC never falls as k grows."""
    ranks = sorted((int(m.group(1)), key) for key in metrics if (m := RANK_KEY.match(key)))
    for (_, lower), (_, higher) in zip(ranks, ranks[1:]):
        if metrics[higher] < metrics[lower]:
            check.fail(_join(path, higher), f"must be at least {lower} ({_show(metrics[lower])}): CMC never falls "
                       f"as the rank grows, got {_show(metrics[higher])}")


def _check_pixel_row_terms(check: _Checker, row: dict, path: str) -> None:
    """recognition_rate = 1 - misclassified / total, w = misclassified / total, Pi = w / (p r a)."""
    total, share = row["total"], None if row["total"] == 0 else row["misclassified"] / row["total"]
    rate = row.get("recognition_rate")
    if rate is not None and (share is None or not _close(rate, 1.0 - share)):
        check.fail(_join(path, "recognition_rate"), f"must be 1 - misclassified / total = "
                   f"{'undefined (total is 0)' if share is None else f'{1.0 - share:.6g}'}, got {_show(rate)}")
    w = row.get("w")
    if w is not None and (share is None or not _close(w, share)):
        check.fail(_join(path, "w"), f"must be misclassified / total ({total}), got {_show(w)}")
    p, r, a, pi = row.get("p"), row.get("r"), row.get("a"), row.get("pi")
    if w is not None and p is not None and r is not None and a is not None and pi is not None and p * r * a > 0:
        expected = w / (p * r * a)
        if not _close(pi, expected):
            check.fail(_join(path, "pi"), f"must be w / (p r a) = {expected:.6g}, got {_show(pi)}")


def _check_sanity(check: _Checker, doc: dict[str, Any]) -> None:
    """``sanity.flags`` (messages) and ``sanity.flag_names`` (short names, one per message) fail the gate."""
    sanity = check.get(doc, "sanity", "", required=False)
    if sanity is _MISSING:
        return
    check.object(sanity, "sanity")
    flags = check.get(sanity, "flags", "sanity", required=False)
    if flags is _MISSING:
        flags = []
    for i, message in enumerate(check.array(flags, "sanity.flags")):
        check.text(message, _join("sanity.flags", i))
    names = check.get(sanity, "flag_names", "sanity", required=False)
    if names is _MISSING:
        return
    check.array(names, "sanity.flag_names")
    if len(names) != len(flags):
        check.fail("sanity.flag_names", f"must name each of the {len(flags)} flag(s) in sanity.flags, "
                   f"got {len(names)} name(s)")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _FLAG_NAME.match(name):
            check.fail(_join("sanity.flag_names", i), f"must be a short name of letters, digits and _, "
                       f"got {_show(name)}")
