"""The published JSON Schemas of robench's documents (robench/results/schemas).

Real documents of every kind validate (finished and interrupted runs, gate --json); a wrong field
fails with its path in the message; the files are themselves valid draft 2020-12 schemas with a
description on every field; and the schema refuses the hand-broken documents robench's reader refuses.
Every document the rest of the suite writes is validated too, as it is written (tests/conftest.py sets
ROBENCH_CHECK_SCHEMA=1).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator
from PIL import Image
from torch import nn

import robench
from robench.api import EvaluationInterrupted
from robench.errors import UsageError
from robench.evaluation import engine
from robench.examples import example_data_path
from robench.results import schema as schemas
from robench.results.reading import validate_document as reader_validate
from robench.results.schema import InvalidDocument, schema_for, validate_document
from robench.results.writers import write_run
from cli_helpers import evaluate_with_state, invoke, stop_after

SUITE = {"name": "schema-check", "attacks": [{"attack": "fgsm", "eps": [0.05, 0.1]},
                                             {"attack": "pgd", "eps": 0.1, "steps": 10}]}
REID_SUITE = {"name": "schema-reid", "task": "reid", "attacks": [{"attack": "fgsm", "eps": 0.03, "objective": "away"}]}


def digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(example_data_path("digits")) as data:
        return data["x"][:count], data["y"][:count]


def market_folder(root: Path) -> Path:
    """Four persons seen by two cameras: one query image per (person, camera), the rest in the gallery."""
    x, y = digits(200)
    seen: dict[tuple[int, int], int] = {}
    for i in [i for i, label in enumerate(y) if label < 4][:40]:
        pid, cam = int(y[i]) + 1, 1 + i % 2
        seen[pid, cam] = seen.get((pid, cam), 0) + 1
        split = root / ("query" if seen[pid, cam] == 1 else "bounding_box_test")
        split.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i][..., 0]).convert("RGB").save(split / f"{pid:04d}_c{cam}s1_{i:06d}_00.png")
    return root


def labelled_folder(root: Path) -> Path:
    x, y = digits(12)
    for i, (image, label) in enumerate(zip(x, y)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(root / str(label) / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """One real document of each kind, made in this process (a few seconds together)."""
    base = tmp_path_factory.mktemp("schema")
    classification = robench.evaluate("example:digits", "example:digits", SUITE, limit=24, batch_size=12,
                                      device="cpu")
    pixel = robench.evaluate("example:digits", labelled_folder(base / "digits"), task="pixel-index",
                             pixels=[1, 2], delta=[10], area=[(4, 4)], trials=2, on_attack="fgsm", eps=0.1,
                             device="cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # an untrained embedding: the ranks are what they are, the shape is under test
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(32, 16))
    reid = robench.evaluate(net, f"market1501:{market_folder(base / 'market')}", REID_SUITE, device="cpu",
                            rerank=True, ranks=[1, 5])
    # Interrupted after its first segment (progress is committed a segment at a time), here 2 batches of 4.
    with pytest.MonkeyPatch.context() as patch, pytest.raises(EvaluationInterrupted) as stopped:
        patch.setattr(engine, "SEGMENT_BATCHES", 2)
        evaluate_with_state("example:digits", "example:digits", "fgsm", limit=24, batch_size=4, device="cpu",
                            on_batch=stop_after(1))
    return {"classification": classification.doc, "pixel": pixel.doc, "reid": reid.doc,
            "partial": stopped.value.result.doc, "saved": classification.save(base / "run")}


# ------------------------------------------------------------------ the files
def schema_files() -> list[Path]:
    return sorted(schemas.SCHEMA_DIR.glob("*.schema.json"))


def test_every_schema_file_is_a_valid_versioned_schema():
    names = {path.name for path in schema_files()}
    assert names == {*schemas.SCHEMA_FILES.values(), *schemas.SHARED_FILES}
    for path in schema_files():
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        # The id names the version, as the file name does: results-1.schema.json is .../results-1.json.
        assert schema["$id"] == "https://robench.dev/schemas/" + path.name.replace(".schema.json", ".json")
        assert schema["title"] and schema["description"]


def undescribed_fields(schema: dict, where: str = "") -> list[str]:
    """Fields without a description (a $ref brings its own) in the schemas that define objects, through
    properties, items and definitions; constraints on fields defined elsewhere (allOf, if/then) are skipped."""
    missing = []
    defines = schema.get("type") == "object"
    for key, fields in [(k, schema.get(k, {}) if defines else {}) for k in ("properties", "patternProperties")]:
        for name, field in fields.items():
            if isinstance(field, dict) and "description" not in field and "$ref" not in field:
                missing.append(f"{where}.{key}.{name}")
    children = [*schema.get("properties", {}).values(), *schema.get("patternProperties", {}).values(),
                *schema.get("$defs", {}).values(), *schema.get("anyOf", [])]  # allOf, if/then: constraints
    if isinstance(schema.get("items"), dict):
        children.append(schema["items"])
    for child in children:
        if isinstance(child, dict):
            missing += undescribed_fields(child, where + "/" + str(child.get("title", "")))
    return missing


@pytest.mark.parametrize("path", schema_files(), ids=lambda p: p.name)
def test_every_field_has_a_description(path):
    assert undescribed_fields(json.loads(path.read_text())) == []


def test_the_schema_module_reads_without_torch():
    code = ("import sys; from robench.results.schema import schema_for; "
            "schema_for({'schema': 'robench.results/1'}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ real documents
@pytest.mark.parametrize("kind", ["classification", "pixel", "reid", "partial"])
def test_real_documents_validate(docs, kind):
    validate_document(docs[kind])


def test_schema_for_chooses_by_the_schema_field(docs):
    assert schema_for(docs["classification"])["$id"].endswith("/results-1.json")
    assert schema_for(docs["reid"])["$id"].endswith("/results-1.json")
    assert schema_for(docs["pixel"])["$id"].endswith("/pixel-index-1.json")
    assert schema_for({"format": "robench-training-1"})["$id"].endswith("/training-1.json")
    with pytest.raises(InvalidDocument, match=r"^schema: \"robench.results/9\" is not a robench document"):
        schema_for({"schema": "robench.results/9"})


def test_the_real_documents_exercise_the_optional_blocks(docs):
    """What the fixtures are for: partial runs, re-ranking, every Pixel-index experiment."""
    partial = docs["partial"]
    assert partial["complete"] is False and partial["progress"] == {"evaluated": 8, "total": 24}
    assert partial["data"]["fingerprint"] == ""  # the whole set was not read: no fingerprint yet
    assert docs["reid"]["attacks"][0]["reranked"] and "rank5" in docs["reid"]["clean"]
    assert [e["experiment"] for e in docs["pixel"]["experiments"]] == ["range", "delta", "area", "attack"]


def test_gate_json_validates(docs, tmp_path):
    run = docs["saved"]
    passed = json.loads(invoke("gate", run, "--baseline", run, "--json").stdout)
    validate_document(passed)
    assert passed["schema"] == schemas.GATE_SCHEMA and passed["passed"] is True
    # A sanity flag in the current run adds a row of its own shape.
    flagged = json.loads((run / "results.json").read_text())
    flagged["sanity"].update(flags=["the outputs vary"], flag_names=["randomness"])
    (tmp_path / "flagged.json").write_text(json.dumps(flagged))
    failed = invoke("gate", tmp_path / "flagged.json", "--baseline", run, "--json")
    assert failed.exit_code == 1
    out = json.loads(failed.stdout)
    validate_document(out)
    assert out["rows"][-1]["verdict"] == "sanity flag"


# ------------------------------------------------------------------ broken documents
def broken(doc: dict, change) -> dict:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


BROKEN = {
    "accuracy as a string": ("classification", lambda d: d["attacks"][0].update(accuracy="0.5"),
                             "attacks[0].accuracy: '0.5' is not of type 'number'"),
    "a negative accuracy": ("classification", lambda d: d["attacks"][1].update(accuracy=-0.1),
                            "attacks[1].accuracy: -0.1 is less than the minimum of 0"),
    "a misspelled field": ("classification", lambda d: d.update(atacks=d.pop("attacks")),
                           "atacks: unexpected field"),
    "a misspelled block field": ("classification", lambda d: d["env"].update(sede=d["env"].pop("seed")),
                                 "env.sede: unexpected field"),
    "a negative n": ("classification", lambda d: d["clean"].update(n=-3),
                     "clean.n: -3 is less than the minimum of 0"),
    "a count as a float": ("classification", lambda d: d["clean"].update(n=24.0),
                           "clean.n: 24.0 is not of type 'integer'"),
    "a missing field": ("classification", lambda d: d["attacks"][0].pop("label"), "attacks[0].label: field required"),
    "NaN": ("classification", lambda d: d.update(robust_accuracy=float("nan")),
            "robust_accuracy: NaN is not a JSON number"),
    "a control character": ("classification", lambda d: d["model"].update(name="digits\x1b[2J"),
                            "model.name: must not contain control characters"),
    "a finished run without accuracy": ("classification", lambda d: d["clean"].update(accuracy=None),
                                        "clean.accuracy: None is not of type 'number'"),
    "an unknown task": ("classification", lambda d: d.update(task="segmentation"),
                        "task: 'segmentation' is not one of"),
    "a malformed rank": ("reid", lambda d: d["clean"].update(rankX=0.5), "clean.rankX: unexpected field"),
    "a rank above 1": ("reid", lambda d: d["attacks"][0]["reranked"].update(rank1=1.5),
                       "attacks[0].reranked.rank1: 1.5 is greater than the maximum of 1"),
    "a misspelled ReID field": ("reid", lambda d: d["attacks"][0].update(mAPP=0.1),
                                "attacks[0].mAPP: unexpected field"),
    "zero pixels": ("pixel", lambda d: d["experiments"][0]["results"][0].update(pixels=0),
                    "experiments[0].results[0].pixels: 0 is less than the minimum of 1"),
    "an unknown experiment": ("pixel", lambda d: d["experiments"][1].update(experiment="ranges"),
                              "experiments[1].experiment: 'ranges' is not one of"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_wrong_field_fails_with_its_path(docs, case):
    kind, change, message = BROKEN[case]
    with pytest.raises(InvalidDocument) as error:
        validate_document(broken(docs[kind], change))
    assert str(error.value).startswith(message), str(error.value)
    assert error.value.path == message.split(":")[0]


# Hand-broken documents both the schema and the reader refuse, each naming the same field.
BOTH_REFUSE = {
    "accuracy as a string": ("classification", lambda d: d["attacks"][0].update(accuracy="0.5"), "attacks[0].accuracy"),
    "accuracy above 1": ("classification", lambda d: d["clean"].update(accuracy=1.5), "clean.accuracy"),
    "a negative n": ("classification", lambda d: d["attacks"][0].update(n=-1), "attacks[0].n"),
    "n as a float": ("classification", lambda d: d["attacks"][0].update(n=24.0), "attacks[0].n"),
    "n as a boolean": ("classification", lambda d: d["clean"].update(n=True), "clean.n"),
    "no label": ("classification", lambda d: d["attacks"][0].pop("label"), "attacks[0].label"),
    "no clean block": ("classification", lambda d: d.pop("clean"), "clean"),
    "NaN": ("classification", lambda d: d["attacks"][0].update(accuracy=float("nan")), "attacks[0].accuracy"),
    "a control character": ("classification", lambda d: d["suite"].update(name="a\nb"), "suite.name"),
    "a bad flag name": ("classification", lambda d: d["sanity"].update(flags=["x"], flag_names=["no such!"]),
                        "sanity.flag_names[0]"),
    "an unknown task": ("classification", lambda d: d.update(task="detection"), "task"),
    "a malformed rank": ("reid", lambda d: d["clean"].update(rankX=0.5), "clean.rankX"),
    "no mAP": ("reid", lambda d: d["attacks"][0].pop("mAP"), "attacks[0].mAP"),
    "zero pixels": ("pixel", lambda d: d["experiments"][0]["results"][0].update(pixels=0),
                    "experiments[0].results[0].pixels"),
    "a negative total": ("pixel", lambda d: d["experiments"][0]["results"][1].update(total=-1),
                         "experiments[0].results[1].total"),
    "a wrong pixel task": ("pixel", lambda d: d.update(task="classification"), "task"),
}


@pytest.mark.parametrize("case", BOTH_REFUSE)
def test_the_reader_and_the_schema_refuse_the_same_documents(docs, case):
    kind, change, path = BOTH_REFUSE[case]
    doc = broken(docs[kind], change)
    with pytest.raises(InvalidDocument) as by_schema:
        validate_document(doc)
    with pytest.raises(UsageError) as by_reader:
        reader_validate(doc, "doc.json")
    assert by_schema.value.path == path, str(by_schema.value)
    assert str(by_reader.value).startswith(f"doc.json: {path}:"), str(by_reader.value)


def test_the_reader_accepts_what_the_schema_accepts(docs):
    """Both sides of the contract on the finished documents: valid for the schema and for the reader."""
    for kind in ("classification", "pixel", "reid"):
        validate_document(docs[kind])
        reader_validate(docs[kind], kind)


# ------------------------------------------------------------------ the check on writing
def test_the_writer_checks_documents_when_asked(docs, tmp_path, monkeypatch):
    doc = broken(docs["classification"], lambda d: d["model"].update(nmae="typo"))
    monkeypatch.setenv(schemas.CHECK_VARIABLE, "1")
    with pytest.raises(InvalidDocument, match=r"^model\.nmae: unexpected field"):
        write_run(tmp_path / "checked", doc, None, {})
    assert not (tmp_path / "checked" / "results.json").exists()
    monkeypatch.delenv(schemas.CHECK_VARIABLE)
    (tmp_path / "unchecked").mkdir()
    write_run(tmp_path / "unchecked", doc, None, {})  # users' runs pay nothing for the check
    assert (tmp_path / "unchecked" / "results.json").exists()


def test_a_missing_jsonschema_names_what_to_install(docs, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema now raises ImportError
    schemas._validator.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"needs the jsonschema package: pip install 'jsonschema>=4.18'"):
            validate_document(docs["pixel"])
    finally:
        monkeypatch.undo()
        schemas._validator.cache_clear()
