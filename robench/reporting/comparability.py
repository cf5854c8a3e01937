"""Why two runs cannot be compared value by value, named setting by setting.

Two runs are comparable when they share the kind of run, the data (its fingerprint), the
suite (its hash; for Pixel-index runs the pixel settings) and, for ReID, the AP convention.
When one differs, the message says which and shows both sides: ``suite settings differ
(suite sha f7591de3ab43 vs 5dc1a5837fc7); eps of pgd differs (0.05, 0.1, 0.2 vs 0.1)``.
"""

from __future__ import annotations

import json
from typing import Any

from robench.results.reading import CERTIFY_SETTINGS, ResultFile
from robench.results.tidy import SETTINGS_EXCLUDED

# Settings a pixel run must share with its baseline (the same keys ResultFile.settings_hash reads).
PIXEL_SETTINGS = ("pixels", "trials", "seed", "shared_positions", "channels")
# Entry fields that identify it or are shown on their own, not compared as parameters.
_ENTRY_IDENTITY = {"eps", "eps_expr", "label"}
# Parameters that scale with eps (step_size: eps/10): compared only between entries of the same eps.
_EPS_DERIVED = {"step_size", "random_start", "alpha"}
_SHOWN = 3  # differing parameters named per entry label before "and N more"


def run_differences(baseline: ResultFile, current: ResultFile) -> list[str]:
    """One item per difference that makes the runs incomparable, baseline first; empty when comparable."""
    if baseline.kind != current.kind:
        return [f"kind of run differs ({baseline.kind} vs {current.kind})"]
    problems = []
    if baseline.settings_hash != current.settings_hash:
        problems += _settings_differences(baseline, current)
    if baseline.fingerprint != current.fingerprint:
        problems.append(_data_difference(baseline.doc, current.doc))
    aps = [r.doc.get("clean", {}).get("ap_convention") for r in (baseline, current)]
    if baseline.kind == "reid" and aps[0] != aps[1]:
        problems.append(f"AP convention differs ({aps[0]} vs {aps[1]})")
    return problems


def _short(value: Any) -> str:
    """A hash cut to 12 characters, anything else as JSON would spell it."""
    if isinstance(value, str):
        return value[:12] if len(value) == 64 else value
    return json.dumps(value, sort_keys=True, default=str)


def _data_difference(base: dict[str, Any], cur: dict[str, Any]) -> str:
    """The data spec when it differs, else the number of samples, else the two fingerprints."""
    specs = [_data_spec(d) for d in (base, cur)]
    sizes = [_data_size(d) for d in (base, cur)]
    if specs[0] != specs[1]:
        return f"data differs ({specs[0]} vs {specs[1]})"
    if sizes[0] != sizes[1]:
        return f"data differs ({specs[0]}: {sizes[0]} vs {sizes[1]} samples)"
    prints = [_short(d.get("data", {}).get("fingerprint") or d.get("env", {}).get("dataset_fingerprint"))
              for d in (base, cur)]
    return f"data differs ({specs[0]}, same size, dataset fingerprint {prints[0]} vs {prints[1]})"


def _data_spec(doc: dict[str, Any]) -> str:
    data = doc.get("data") or {}
    return str(data.get("spec") or data.get("folder") or data.get("root") or "?")


def _data_size(doc: dict[str, Any]) -> Any:
    data = doc.get("data") or {}
    for key in ("n", "image_files", "queries"):
        if data.get(key) is not None:
            return data[key]
    return (doc.get("clean") or {}).get("n", "?")


def _settings_differences(baseline: ResultFile, current: ResultFile) -> list[str]:
    if baseline.kind == "pixel":
        base, cur = baseline.doc.get("settings", {}), current.doc.get("settings", {})
        return [f"{key} differs ({_short(base.get(key))} vs {_short(cur.get(key))})"
                for key in PIXEL_SETTINGS if base.get(key) != cur.get(key)]
    if baseline.kind == "certify":
        base, cur = baseline.doc.get("settings", {}), current.doc.get("settings", {})
        return [f"{key} differs ({_short(base.get(key))} vs {_short(cur.get(key))})"
                for key in CERTIFY_SETTINGS if base.get(key) != cur.get(key)]
    base, cur = baseline.doc.get("suite", {}), current.doc.get("suite", {})
    if base.get("name") != cur.get("name"):
        head = f"suite differs ({base.get('name')} vs {cur.get('name')})"
    else:
        head = f"suite settings differ (suite sha {_short(base.get('sha256'))} vs {_short(cur.get('sha256'))})"
    return [head, *_entry_differences(baseline.doc.get("attacks", []), current.doc.get("attacks", []))]


def _by_label(attacks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in attacks:
        groups.setdefault(a.get("label", "?"), []).append(a)
    return groups


def _entry_differences(base_attacks: list[dict[str, Any]], cur_attacks: list[dict[str, Any]]) -> list[str]:
    """Per attack label: present in one run only, a different eps list, or different parameters."""
    base, cur = _by_label(base_attacks), _by_label(cur_attacks)
    out = [f"{label} only in the baseline" for label in base if label not in cur]
    out += [f"{label} only in the current run" for label in cur if label not in base]
    for label in (label for label in base if label in cur):
        eps = [_eps_list(base[label]), _eps_list(cur[label])]
        if eps[0] != eps[1]:
            out.append(f"eps of {label} differs ({eps[0]} vs {eps[1]})")
        out += _parameter_differences(label, base[label], cur[label])
    return out


def _eps_list(entries: list[dict[str, Any]]) -> str:
    """The eps values as the suite wrote them (8/255), in the run's order."""
    shown = []
    for a in entries:
        text = (a.get("params") or {}).get("eps_expr")
        shown.append(text if isinstance(text, str) and text else ("none" if a.get("eps") is None
                                                                   else f"{a['eps']:g}"))
    return ", ".join(dict.fromkeys(shown))


def _parameters(entries: list[dict[str, Any]], skip_eps_derived: bool) -> dict[str, list[str]]:
    """Each parameter's values over an attack's entries, eps and timings left out."""
    values: dict[str, list[str]] = {}
    for a in entries:
        params = {"attack": a.get("attack"), "norm": a.get("norm"), **(a.get("params") or {})}
        for key, value in params.items():
            if key in SETTINGS_EXCLUDED or key in _ENTRY_IDENTITY or (skip_eps_derived and key in _EPS_DERIVED):
                continue
            values.setdefault(key, [])
            if _short(value) not in values[key]:
                values[key].append(_short(value))
    return values


def _same_eps(base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> tuple[list, list]:
    """The entries at the eps values both runs have: their step sizes are comparable number for number."""
    shared = {a.get("eps") for a in base} & {a.get("eps") for a in cur}
    return [a for a in base if a.get("eps") in shared], [a for a in cur if a.get("eps") in shared]


def _parameter_differences(label: str, base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> list[str]:
    shared_base, shared_cur = _same_eps(base, cur)
    if shared_base:
        b, c = _parameters(shared_base, False), _parameters(shared_cur, False)
    else:  # no eps in common: step sizes written as eps/10 differ because eps does, which is already said
        b, c = _parameters(base, True), _parameters(cur, True)
    keys = [k for k in dict.fromkeys([*b, *c]) if b.get(k) != c.get(k)]
    shown = [f"{key} of {label} differs ({', '.join(b.get(key, ['unset']))} vs {', '.join(c.get(key, ['unset']))})"
             for key in keys[:_SHOWN]]
    if len(keys) > _SHOWN:
        shown.append(f"{len(keys) - _SHOWN} more parameter(s) of {label} differ ({', '.join(keys[_SHOWN:])})")
    return shown
