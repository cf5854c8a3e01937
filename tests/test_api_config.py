"""EvalConfig, the API the CLI runs on, arguments left untouched, public entry points, import hygiene."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import robench
from robench.api import evaluate
from robench.attacks.registry import BUILTIN_ATTACKS, AttackRegistry
from robench.config import EvalConfig, resolve
from robench.data.config import DataConfig
from robench.evaluation.config import EngineConfig
from robench.models.config import ModelConfig
from robench.tasks.pixel_index import pixel_index as pixel_index_task
from robench.suites.config import as_suite
from robench.data.sources import DataOptions
from robench.errors import UsageError
from robench.models.preprocessing import PRESETS
from robench.tasks.classification import resume_key
from robench.tasks.run import eval_task, open_run_directory, run_evaluation

from cli_helpers import invoke, one_error_line

PACKAGE = Path(robench.__file__).resolve().parent
SUITE = {"name": "tiny-fgsm", "attacks": [{"attack": "fgsm", "norm": "linf", "eps": ["8/255", "0.2"]}]}


@pytest.fixture()
def digits_model():
    """The bundled digits CNN as a plain module (fresh each test: a test may change its mode)."""
    return robench.load_model("example:digits").model


def strip_timing(value):
    """A results document without what differs between two identical runs (clocks, speed, paths)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items()
                if k not in {"seconds", "finished_at", "speed", "peak_memory_bytes"}}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


# --- EvalConfig: validated once, with the CLI's messages -------------------------------------------

BATCH_SIZE_RANGE = "--batch-size must be an integer (a positive integer or auto, at most 1048576)"


@pytest.mark.parametrize("field, value, message", [
    pytest.param("batch_size", "0", f"{BATCH_SIZE_RANGE}, got '0'", id="batch-size-0"),
    pytest.param("batch_size", "²", f"{BATCH_SIZE_RANGE}, got '²'", id="batch-size-superscript"),
    pytest.param("save_every", float("nan"), "--save-every must be between 0 and 604800, got nan", id="nan"),
    pytest.param("workers", 999, "--workers must be between 0 and 256, got 999", id="workers"),
    pytest.param("compile", "maybe", "--compile must be one of off, on, auto, got 'maybe'", id="compile"),
    pytest.param("precision", "fp8", "--precision must be one of", id="precision"),
    pytest.param("distance", "l1", "--distance must be one of euclidean, cosine, got 'l1'", id="distance"),
    pytest.param("ranks", "1,x", "--ranks takes comma-separated integers, got '1,x'", id="ranks-text"),
    pytest.param("ranks", "0,5", "--ranks values must be >= 1, got '0,5'", id="ranks-zero"),
    pytest.param("image_size", "256by128", "--image-size takes HxW, e.g. 256x128, got '256by128'", id="size"),
    pytest.param("max_image_pixels", 0, "--max-image-pixels must be a positive integer, got 0", id="pixels"),
])
def test_config_rejects_bad_values_with_the_cli_message(field, value, message):
    with pytest.raises(UsageError) as caught:
        EvalConfig.of(model="example:digits", **{field: value})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_config_names_unknown_and_mistyped_fields():
    with pytest.raises(UsageError, match=r"unknown option 'sed'; did you mean 'seed'"):
        EvalConfig.of(model="example:digits", sed=1)
    with pytest.raises(UsageError, match=r"^seed: .*integer.*got 'x'$"):
        EvalConfig.of(model="example:digits", seed="x")
    with pytest.raises(UsageError, match="model is required"):
        EvalConfig()


def test_config_parses_cli_text_and_is_frozen():
    config = EvalConfig.of(model="example:digits", batch_size="64", ranks="1,20", image_size="256x128")
    assert (config.engine.batch_size, config.reid.ranks, config.reid.image_size) == (64, (1, 20), (256, 128))
    assert EvalConfig.of(model="m", batch_size="auto").reid_batch_size() == 64
    with pytest.raises(ValidationError):
        config.engine.seed = 3
    with pytest.raises(ValidationError):
        config.engine = EngineConfig()


def test_config_is_nested_parts_built_from_flat_options():
    config = EvalConfig.of(model="example:digits", data="example:digits", data_root="/d", trust_suite=True,
                           reid_pattern="x", limit=3, device="cpu", out="o")
    assert (config.model.source, config.data.source, config.data.root, config.data.limit) == \
        ("example:digits", "example:digits", "/d", 3)
    assert (config.suite.source, config.suite.trust_code, config.reid.pattern) == ("pgd-linf", True, "x")
    assert (config.engine.device, str(config.output.out)) == ("cpu", "o")
    engine = EngineConfig(batch_size=8, seed=2)
    whole = EvalConfig.of(model="m", engine=engine, data=DataConfig(source="example:digits", limit=4))
    assert whole.engine is engine and whole.data.limit == 4
    assert whole == EvalConfig(model=ModelConfig(source="m"), engine=engine,
                               data=DataConfig(source="example:digits", limit=4))
    with pytest.raises(UsageError, match=r"give either engine or its options \(seed\), not both"):
        EvalConfig.of(model="m", engine=engine, seed=1)
    with pytest.raises(UsageError, match="^model is required$"):
        EvalConfig.of(limit=3)
    with pytest.raises(UsageError, match="unknown option 'source'"):  # two parts have one: only through an alias
        EvalConfig.of(model="m", source="x")


def test_config_reports_the_first_problem_in_command_line_order():
    # The CLI has always checked --batch-size before --precision: the same error comes first.
    with pytest.raises(UsageError, match="--batch-size"):
        EvalConfig.of(model="example:digits", precision="fp8", batch_size="0")


def test_each_call_gets_a_fresh_data_options():
    config = EvalConfig.of(model="example:digits", limit=7, crop=4)
    first = config.data.options()
    first.limit = 1
    assert config.data.options().limit == 7 and config.data.options().crop == 4


def test_explicit_normalization_wins_over_the_suite_suggestion():
    suite = as_suite({**SUITE, "normalize": "mnist"})
    suggested = suite.suite.normalize
    assert EvalConfig.of(model="m").model.normalization(suggested) == PRESETS.get("mnist")
    assert EvalConfig.of(model="m", normalize="cifar10").model.normalization(suggested) == PRESETS.get("cifar10")
    explicit = EvalConfig.of(model="m", mean="0.5", std="0.25").model.normalization(suggested)
    assert (explicit.mean, explicit.std) == ((0.5,), (0.25,))
    with pytest.raises(UsageError, match="give either --normalize or --mean/--std, not both"):
        EvalConfig.of(model="m", normalize="mnist", mean="0.5", std="0.2")


def test_resume_key_changes_with_what_changes_the_results(tmp_path):
    asked = {"model": "example:digits", "suite": "fgsm", "limit": 20}
    config = EvalConfig.of(**asked)
    resolved = resolve(config)
    same = resume_key(config, resolved)
    assert resume_key(EvalConfig.of(model="example:digits", suite="fgsm", limit=20), resolved) == same
    for change in ({"seed": 1}, {"limit": 21}, {"precision": "bf16"}, {"batch_size": 7}):
        other = EvalConfig.of(**{**asked, **change})
        assert resume_key(other, resolved) != same, change


def test_the_task_follows_the_data_and_the_run_directory_checks_resume_options(tmp_path):
    task = eval_task(EvalConfig.of(model="example:digits", suite="fgsm"))
    directory = open_run_directory(task, out=tmp_path / "a")
    assert task.name == "classification" and directory.key and directory.resume_state is None
    assert eval_task(EvalConfig.of(model="example:reid-digits", suite="reid-clean")).name == "reid"
    with pytest.raises(UsageError, match="give either --resume DIR or --out DIR"):
        open_run_directory(task, out=tmp_path / "a", resume=tmp_path / "b")
    with pytest.raises(UsageError, match="holds no interrupted run to resume"):
        open_run_directory(task, resume=tmp_path / "a")
    with pytest.raises(UsageError, match="is for re-identification: pass --data market1501:ROOT"):
        eval_task(EvalConfig.of(model="example:digits", suite="reid-pgd", data="example:digits"))
    assert not (tmp_path / "c").exists()


# --- the API behind the CLI --------------------------------------------------------------------------

def test_cli_and_api_write_the_same_results(tmp_path):
    args = ("eval", "example:digits", "--suite", "fgsm", "--limit", "24", "--batch-size", "16", "--seed", "3")
    result = invoke(*args, "--out", tmp_path / "cli", "--quiet")
    assert result.exit_code == 0, result.stderr
    run_dir, api_result = run_evaluation(EvalConfig.of(model="example:digits", suite="fgsm", limit=24,
                                                    batch_size=16, seed=3, out=tmp_path / "api"))
    cli_doc = json.loads((tmp_path / "cli" / "results.json").read_text())
    api_doc = json.loads((run_dir / "results.json").read_text())
    assert strip_timing(cli_doc) == strip_timing(api_doc) == strip_timing(api_result.doc)
    assert api_doc["progress"] == {"evaluated": 24, "total": 24}
    assert (tmp_path / "cli" / "samples.csv").read_text() == (run_dir / "samples.csv").read_text()
    assert not (run_dir / "progress.pt").exists()


def test_cli_reports_config_errors_as_one_line_exit_2():
    result = invoke("eval", "example:digits", "--distance", "manhattan")
    assert result.exit_code == 2
    assert one_error_line(result) == "robench: error: --distance must be one of euclidean, cosine, got 'manhattan'"


def test_evaluate_changes_none_of_its_arguments(digits_model, test_tensors):
    x, y = test_tensors
    x, y = x[:60], y[:60]
    options = DataOptions(limit=50, split="test")
    options_before = dataclasses.replace(options)
    suite = copy.deepcopy(SUITE)
    weights = {k: v.clone() for k, v in digits_model.state_dict().items()}
    flags = [p.requires_grad for p in digits_model.parameters()]
    digits_model.train()  # handed over in train mode: evaluated in eval mode, handed back in train mode
    x_before = x.clone()
    try:
        result = evaluate(digits_model, (x, y), suite, data_options=options, limit=20, batch_size=8)
        assert digits_model.training
    finally:
        digits_model.eval()
    assert result.doc["clean"]["n"] == 20  # the limit applied to this run ...
    assert options == options_before  # ... and not to the caller's options
    assert suite == SUITE
    assert torch.equal(x, x_before)
    assert [p.requires_grad for p in digits_model.parameters()] == flags
    assert all(torch.equal(v, weights[k]) for k, v in digits_model.state_dict().items())
    # The options given still count where no limit overrides them.
    again = evaluate(digits_model, (x, y), suite, data_options=options, batch_size=8)
    assert again.doc["clean"]["n"] == 50 and options == options_before


def test_evaluate_validates_its_options(digits_model, test_tensors):
    with pytest.raises(UsageError, match="--precision must be one of"):
        evaluate(digits_model, test_tensors, SUITE, precision="fp7")
    with pytest.raises(UsageError, match="model must be a checkpoint path, an nn.Module or a LoadedModel"):
        evaluate(42, test_tensors, SUITE)


# --- public entry points -----------------------------------------------------------------------------

def test_public_names():
    for name in ("EvalConfig", "Result", "evaluate", "run_evaluation"):
        assert name in robench.__all__ and callable(getattr(robench, name))


def test_the_pixel_index_through_evaluate_takes_a_module(digits_model, digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    for i, (img, label) in enumerate(zip(x_te[:30], y_te[:30])):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / str(label) / f"{i:02d}.png")
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    result = robench.evaluate(digits_model, tmp_path, task="pixel-index", pixels=[1, 4], batch_size=16)
    doc = result.doc
    assert result.task == "pixel-index" and result.samples is None and "read=30" in repr(result)
    assert doc["task"] == "pixel-index" and doc["images"]["read"] == 30
    assert [r["pixels"] for r in doc["experiments"][0]["results"]] == [1, 4]
    assert all(torch.equal(v, before[k]) for k, v in digits_model.state_dict().items())
    with pytest.raises(UsageError, match="takes no suite"):
        robench.evaluate(digits_model, tmp_path, "fgsm", task="pixel-index", pixels=[1])
    with pytest.raises(UsageError, match="task must be one of"):
        robench.evaluate(digits_model, tmp_path, task="segmentation")


# --- import hygiene ----------------------------------------------------------------------------------

def test_attack_registry_is_complete_without_the_package_init():
    # The package's __init__ is replaced by an empty module: nothing it imports can register anything.
    code = (
        "import sys, types\n"
        f"stub = types.ModuleType('robench'); stub.__path__ = [{str(PACKAGE)!r}]; sys.modules['robench'] = stub\n"
        "from robench.attacks.registry import ATTACKS\n"
        "print(','.join(ATTACKS.names()))\n"
        "print(','.join(f'{n}={ATTACKS.get(n).__name__}' for n in ATTACKS.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "apgd,apgd-ce,apgd-dlr,apgd-t,autoattack,bim,dmr,fab,fab-t,fgsm,fmn,mifgsm,pgd,pixels,square"
    assert out[1] == ("apgd=APGD,apgd-ce=APGDCE,apgd-dlr=APGDDLR,apgd-t=APGDTargeted,autoattack=AutoAttack,bim=BIM,"
                      "dmr=GeneratorAttack,fab=FAB,fab-t=FABTargeted,fgsm=FGSM,fmn=FMN,mifgsm=MIFGSM,pgd=PGD,"
                      "pixels=PixelChange,square=Square")


def test_registry_refuses_a_second_class_under_a_built_in_name():
    from robench.attacks import PGD

    registry = AttackRegistry(BUILTIN_ATTACKS)
    assert "PGD" in registry and "apgd-x" not in registry

    class Impostor(PGD):
        name = "impostor"

    class NotAnAttack:
        pass

    for taken in ("pgd", "PGD", "ta.PGD"):
        with pytest.raises(UsageError, match=f"{taken!r} is taken by robench"):
            registry.add(taken, Impostor)
    with pytest.raises(UsageError, match="'pgd' is taken by robench"):
        robench.register_attack(Impostor, name="pgd")
    with pytest.raises(UsageError, match="is not an attack"):
        registry.add("notanattack", NotAnAttack)
    registry.add("impostor", Impostor)
    registry.add("impostor", Impostor)  # the same class again changes nothing
    assert registry.get("impostor") is Impostor and "impostor" in registry.names()
    assert registry.get("pgd") is PGD and registry.get("fgsm").__name__ == "FGSM"

    class Second(PGD):
        name = "impostor"

    with pytest.raises(UsageError, match="'impostor' is already registered"):
        registry.add("impostor", Second)
    assert registry.get("impostor") is Impostor


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements run when the module is imported: not those in functions or TYPE_CHECKING blocks."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}".rstrip(".")
                # `from P import m` loads the submodule P.m when there is one, else P itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert {"robench", "robench.api", "robench._version", "robench.attacks.registry"} <= set(graph)
    assert "robench._version" in graph["robench"]  # the graph sees the package's own imports
    assert "robench.api" not in graph["robench"]  # public names load lazily: no cycle through the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_version_output_is_the_package_version():
    from importlib.metadata import version

    result = invoke("version")
    assert result.exit_code == 0 and result.stdout.strip() == robench.__version__ == version("robench")


@pytest.mark.parametrize("call", [
    lambda: robench.evaluate("example:digits", task="certify", sigma=0.25, out="runs/x"),
    lambda: pixel_index_task("example:digits", "images", resume="runs/x"),
    lambda: robench.evaluate("example:digits", normalization="imagenet", normalize="cifar10"),
    lambda: robench.evaluate("example:digits", task="certify", sigma=0.25, normalization="imagenet",
                             normalize="cifar10"),
    lambda: pixel_index_task("example:digits", "images", normalization="imagenet", normalize="cifar10"),
], ids=["certify-out", "pixel-index-resume", "evaluate-both", "certify-both", "pixel-index-both"])
def test_the_python_entries_refuse_what_only_the_command_line_takes(call):
    """The Python entries return the Result and write nothing (no out, no resume), and take normalization or
    normalize, not both: refused with one line before anything is loaded."""
    with pytest.raises(UsageError, match="writes nothing: save it with result.save|either normalization or normalize"):
        call()
