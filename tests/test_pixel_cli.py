"""``robench pixel-index`` end to end on a folder of real images (scikit-learn digits as PNG files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from robench.cli import app
from robench.data.images import read_image8
from robench.models import load_model
from cli_helpers import invoke as invoke_robench


def invoke(*args):
    return invoke_robench("pixel-index", *args)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory, digits_split):
    """200 test digits in class folders, plus files a real folder collects."""
    _, x_te, _, y_te = digits_split
    root = tmp_path_factory.mktemp("digits")
    for i, (img, label) in enumerate(zip(x_te[:200], y_te[:200])):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / str(label) / f"{i:03d}.png")
    three = root / str(y_te[0])
    (three / "zero-byte.png").write_bytes(b"")
    good = (three / "000.png").read_bytes()
    (three / "truncated.png").write_bytes(good[: len(good) // 2])
    (three / "notes.txt").write_text("not an image")
    (three / "fake.jpg").write_text("text with an image suffix")
    return root


def test_end_to_end_json_contract(digits_folder, tmp_path):
    result = invoke("example:digits", digits_folder, "--pixels", "1,4,16", "--delta", "20,127", "--area", "4",
                    "--trials", "4", "--json", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "robench.pixel-index/1"
    images = doc["images"]
    assert images["read"] == 200
    assert images["evaluated"] + images["excluded_misclassified"] == 200
    assert images["excluded_misclassified"] < 10
    reasons = {entry["file"].rsplit("/", 1)[-1]: entry["reason"] for entry in images["skipped"]}
    assert set(reasons) == {"zero-byte.png", "truncated.png", "notes.txt", "fake.jpg"}
    assert "not an image file" in reasons["notes.txt"]
    assert doc["data"]["input_size"] == [8, 8] and doc["data"]["reference"] == "folder labels"
    kinds = [(e["experiment"], e["setting"]) for e in doc["experiments"]]
    assert kinds == [("range", "0-255"), ("delta", "±20"), ("delta", "±127"), ("area", "4x4")]
    for exp in doc["experiments"]:
        for row in exp["results"]:
            assert set(row) >= {"pixels", "misclassified", "total", "w", "p", "r", "a", "pi"}
            assert row["total"] == images["evaluated"]
            assert len(row["misclassified_trials"]) == 4
            assert row["w"] == pytest.approx(row["misclassified"] / row["total"])
            assert row["p"] == pytest.approx(row["pixels"] / 64)
            assert row["pi"] == pytest.approx(row["w"] / (row["p"] * row["r"] * row["a"]))
    full = doc["experiments"][0]["results"]
    assert full[0]["misclassified"] < full[1]["misclassified"] < full[2]["misclassified"]
    assert doc["experiments"][3]["results"][0]["a"] == pytest.approx(16 / 64)
    assert doc["experiments"][1]["results"][0]["r"] == pytest.approx(40 / 255)
    assert (tmp_path / "run" / "results.csv").read_text().startswith(
        "model,kind,suite,entry,attack,norm,settings,eps,eps_text,pixels,metric,value,n,ap_convention\n")


def test_table_output_and_fgsm_experiment(digits_folder, tmp_path):
    result = invoke("example:digits", digits_folder, "--pixels", "2,8", "--on-attack", "fgsm", "--eps", "0.15",
                    "--trials", "3", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "Experiment 1" in result.stdout and "Experiment 4" in result.stdout and "Pi" in result.stdout
    assert "excluded (misclassified before any change)" in result.stdout
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    attack = doc["experiments"][-1]
    assert attack["experiment"] == "attack" and attack["adversarial"] > 20
    rates = [r["recognition_rate"] for r in attack["results"]]
    assert 0 < rates[0] < rates[1], "more changed pixels return more adversarial images to their class"


def test_same_seed_same_numbers_other_seed_differs(digits_folder, tmp_path):
    docs = []
    for i, seed in enumerate((5, 5, 6)):
        result = invoke("example:digits", digits_folder, "--pixels", "8", "--trials", "2", "--seed", seed,
                        "--json", "--quiet", "--out", tmp_path / str(i), "--batch-size", 64 if i else 256)
        docs.append(json.loads(result.stdout)["experiments"][0]["results"][0]["misclassified_trials"])
    assert docs[0] == docs[1] and docs[0] != docs[2]


def test_flat_folder_uses_the_clean_prediction(digits_split, tmp_path):
    _, x_te, _, _ = digits_split
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(x_te[:40]):
        Image.fromarray(img[..., 0]).save(flat / f"{i}.png")
    result = invoke("example:digits", flat, "--pixels", "4", "--json", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["data"]["reference"] == "clean prediction"
    assert doc["images"]["evaluated"] == 40 and doc["images"]["excluded_misclassified"] == 0
    assert doc["clean"]["accuracy"] is None


def test_mixed_image_kinds_are_converted(digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    img = x_te[0][..., 0]
    folder = tmp_path / "mixed" / str(y_te[0])
    folder.mkdir(parents=True)
    Image.fromarray(img).save(folder / "gray.png")
    Image.fromarray((img.astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(np.stack([img] * 3 + [np.full_like(img, 128)], axis=-1), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(img).convert("P").save(folder / "palette.png")
    for name in ("sixteen.png", "rgba.png", "palette.png"):
        arr = read_image8(folder / name, None, None)
        assert np.array_equal(arr[..., 0], img), name
    result = invoke("example:digits", tmp_path / "mixed", "--pixels", "1", "--gray", "--json", "--quiet",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"]["read"] == 4


def test_resize_and_input_size(tmp_path):
    from PIL import ImageDraw

    img = Image.new("RGB", (40, 30), "white")
    ImageDraw.Draw(img).rectangle((5, 5, 20, 20), fill="black")
    img.save(tmp_path / "a.png")
    assert read_image8(tmp_path / "a.png", 16, 16).shape == (16, 16, 3)
    assert read_image8(tmp_path / "a.png", None, None).shape == (30, 40, 3)
    with pytest.raises(ValueError, match="smaller than the crop"):
        read_image8(tmp_path / "a.png", None, 32)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pixels", "0"], "--pixels values must be >= 1"),
        (["--pixels", "four"], "comma-separated integers"),
        (["--delta", "300"], "[0, 255]"),
        (["--area", "9"], "does not fit"),
        (["--area", "0x3"], "--area takes sides"),
        (["--on-attack", "pgd", "--eps", "0.1"], "supports fgsm"),
        (["--on-attack", "fgsm"], "needs --eps"),
        (["--eps", "0.1"], "only used with --on-attack"),
        (["--channels", "green"], "--channels must be one of"),
        (["--input-size", "8", "--crop", "8"], "not both"),
    ],
)
def test_bad_options_exit_2(extra, message, digits_folder, tmp_path):
    result = invoke("example:digits", digits_folder, *extra, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_empty_and_unusable_folders(tmp_path, digits_split):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("example:digits", empty, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "holds no image files" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG garbage")
    result = invoke("example:digits", broken, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "none of the 1 image files could be read" in result.stderr
    result = invoke("example:digits", tmp_path / "missing", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "image folder not found" in result.stderr


def test_no_correctly_classified_image(tmp_path, digits_split):
    _, x_te, _, y_te = digits_split
    model = load_model("example:digits").model.eval()
    zeros = x_te[y_te == 0][:5]
    with torch.no_grad():
        pred = model(torch.from_numpy(zeros).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert (pred == 0).all()
    folder = tmp_path / "imgs" / "zero"
    folder.mkdir(parents=True)
    for i, img in enumerate(zeros):
        Image.fromarray(img[..., 0]).save(folder / f"{i}.png")
    (tmp_path / "map.txt").write_text("zero 7\n")
    result = invoke("example:digits", tmp_path / "imgs", "--class-map", tmp_path / "map.txt", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "no image" in result.stderr and "classified correctly" in result.stderr
    unmapped = invoke("example:digits", tmp_path / "imgs", "--out", tmp_path / "s")
    assert unmapped.exit_code == 2 and "--class-map" in unmapped.stderr


def test_class_folder_mapping(tmp_path):
    from robench.data.images import class_indices
    from robench.errors import UsageError

    assert class_indices(["n01440764", "n15075141", "n01443537"], 1000, None) == [0, 999, 1]
    with pytest.raises(UsageError, match="model has 10 classes"):
        class_indices(["n01440764"], 10, None)
    assert class_indices(["3", "0"], 10, None) == [3, 0]
    (tmp_path / "m.json").write_text('{"cat": 3, "dog": 5}')
    assert class_indices(["dog", "cat"], 10, tmp_path / "m.json") == [5, 3]
    (tmp_path / "names.txt").write_text("airplane\nautomobile\nbird\n")
    assert class_indices(["bird", "airplane"], 10, tmp_path / "names.txt") == [2, 0]
    with pytest.raises(UsageError, match="no class index for folder"):
        class_indices(["ship"], 10, tmp_path / "names.txt")
    with pytest.raises(UsageError, match="outside the model's 2 classes"):
        class_indices(["bird"], 2, tmp_path / "names.txt")
    with pytest.raises(UsageError, match="pass --class-map"):
        class_indices(["cat", "dog"], 10, None)


def test_compare_pixel_layout(digits_folder, trained_model, tmp_path):
    torch.save(trained_model.state_dict(), tmp_path / "trained.pt")
    for name, model in (("bundled", ["example:digits"]),
                        ("trained", [tmp_path / "trained.pt", "--arch", "robench.examples:digits_cnn"])):
        result = invoke(*model, digits_folder, "--pixels", "2,8", "--trials", "2", "--quiet", "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
    table = invoke_raw("compare", tmp_path / "bundled", tmp_path / "trained", "--format", "markdown",
                       "--label", "bundled", "--label", "trained")
    assert table.exit_code == 0, table.stderr
    assert "Pixel-index Pi" in table.stdout and "| range:0-255 · bundled |" in table.stdout
    assert "2 px" in table.stdout and "8 px" in table.stdout
    mis = invoke_raw("compare", tmp_path / "bundled", "--metric", "misclassified", "--format", "csv")
    doc = json.loads((tmp_path / "bundled" / "results.json").read_text())
    first = doc["experiments"][0]["results"][0]["misclassified"]
    assert f"{first:.1f}" in mis.stdout or str(round(first, 1)) in mis.stdout
    plot = invoke_raw("plot", tmp_path / "bundled", tmp_path / "trained", "--out", tmp_path / "px.png")
    assert plot.exit_code == 0, plot.stderr
    with Image.open(tmp_path / "px.png") as img:
        assert img.size[0] > 500 and np.asarray(img.convert("L")).std() > 10


def invoke_raw(*args):
    return CliRunner().invoke(app, [str(a) for a in args])
