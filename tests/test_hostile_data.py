"""Hostile and odd data degrades a run, never stops it: bombs, mixed channels, swapped axes, unreadable paths.

Image folders are real PNG files written from the digits test split.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from robench.data.images import load_folder, read_image8, scan_folder
from robench.data.sources import DataOptions, from_arrays, load_data
from robench.errors import UsageError
from cli_helpers import invoke, one_error_line

N_GOOD = 100  # digits per test folder: enough for all ten classes, small enough to stay fast


def run_eval(folder, out, *extra):
    result = invoke("eval", "example:digits", "--suite", "clean", "--data", f"imagefolder:{folder}",
                    "--json", "--quiet", "--out", out, *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def run_pixel_index(folder, out, *extra):
    result = invoke("pixel-index", "example:digits", folder, "--pixels", "1", "--json", "--quiet",
                    "--out", out, *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 grayscale PNG whose header (IHDR, with a correct CRC) claims another size."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # the first chunk, right after the 8-byte signature and its length
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def by_name(entries):
    return {entry["file"].rsplit("/", 1)[-1]: entry for entry in entries}


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory, digits_split):
    """N_GOOD grayscale digit PNGs in class folders 0..9."""
    _, x_te, _, y_te = digits_split
    root = tmp_path_factory.mktemp("gray")
    for i, (img, label) in enumerate(zip(x_te[:N_GOOD], y_te[:N_GOOD])):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / str(label) / f"{i:03d}.png")
    assert len(list(root.iterdir())) == 10  # every class present, so folder order equals label order
    return root


@pytest.fixture
def bomb_folder(gray_folder, tmp_path):
    root = tmp_path / "bomb"
    shutil.copytree(gray_folder, root)
    (root / "3" / "bomb.png").write_bytes(png_claiming(20000, 20000))
    assert (root / "3" / "bomb.png").stat().st_size < 200
    return root


# --- decompression bombs ---------------------------------------------------------------------------------

def test_bomb_is_skipped_and_the_rest_evaluated(bomb_folder, tmp_path):
    doc = run_eval(bomb_folder, tmp_path / "eval")
    assert doc["data"]["n"] == N_GOOD and doc["clean"]["n"] == N_GOOD
    reason = by_name(doc["data"]["skipped"])["bomb.png"]["reason"]
    assert reason == ("decompression bomb: 20000x20000 = 400,000,000 pixels exceeds the limit of "
                      f"{Image.MAX_IMAGE_PIXELS:,}; pass --max-image-pixels to raise it")  # Pillow's own default
    assert doc["clean"]["accuracy"] > 0.9

    pixels = run_pixel_index(bomb_folder, tmp_path / "pixels")
    assert pixels["images"]["read"] == N_GOOD
    assert "decompression bomb" in by_name(pixels["images"]["skipped"])["bomb.png"]["reason"]


def skipped_reasons(doc) -> dict[str, str]:
    entries = doc["images"]["skipped"] if doc["task"] == "pixel-index" else doc["data"]["skipped"]
    return {name: entry["reason"] for name, entry in by_name(entries).items()}


@pytest.mark.parametrize("command", [run_eval, run_pixel_index])
def test_max_image_pixels_moves_the_limit(command, bomb_folder, tmp_path):
    raised = command(bomb_folder, tmp_path / "raised", "--max-image-pixels", 400_000_001)
    # Under the limit the file is decoded, and its fake header then fails as a truncated image.
    assert skipped_reasons(raised)["bomb.png"].startswith("unreadable image: image file is truncated")
    # The limit is inclusive: 8x8 digits pass a limit of 64.
    at_limit = command(bomb_folder, tmp_path / "at-limit", "--max-image-pixels", 64)
    assert skipped_reasons(at_limit) == {"bomb.png": "decompression bomb: 20000x20000 = 400,000,000 pixels "
                                         "exceeds the limit of 64; pass --max-image-pixels to raise it"}


@pytest.mark.parametrize("command", ["eval", "pixel-index"])
def test_max_image_pixels_below_every_image(command, bomb_folder, tmp_path):
    target = ["--data", f"imagefolder:{bomb_folder}"] if command == "eval" else [bomb_folder]
    result = invoke(command, "example:digits", *target, "--max-image-pixels", 63, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"none of the {N_GOOD + 1} image files could be read" in one_error_line(result)


def test_warning_range_bombs_are_skipped_and_pillow_state_is_restored(tmp_path):
    # 1x..2x Pillow's limit: Pillow itself would only warn and decode.
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(10000, 10000))
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with pytest.raises(ValueError, match=r"decompression bomb: 10000x10000 = 100,000,000 pixels"):
        read_image8(path, None, None)
    with pytest.raises(ValueError, match=r"exceeds the limit of 1,000"):
        read_image8(path, None, None, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before_limit and warnings.filters == before_filters
    # The caller's own Pillow limit is the default and is left as the caller set it.
    Image.MAX_IMAGE_PIXELS = 10
    try:
        with pytest.raises(ValueError, match="exceeds the limit of 10;"):
            read_image8(path, None, None)
        assert Image.MAX_IMAGE_PIXELS == 10
    finally:
        Image.MAX_IMAGE_PIXELS = before_limit


def test_any_decoder_failure_is_a_skip_but_interrupts_are_not(gray_folder, monkeypatch):
    scan = scan_folder(gray_folder)
    victim = scan.files[5]
    real_load = Image.Image.load

    def hostile_load(self):
        if getattr(self, "filename", None) == str(victim):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", hostile_load)
    x, kept = load_folder(scan, None, None)
    assert 5 not in kept and len(kept) == N_GOOD - 1 and x.shape == (N_GOOD - 1, 1, 8, 8)
    reason = by_name(scan.skipped)[victim.name]["reason"]
    assert reason == "unreadable image: struct.error: unpack requires a buffer of 4 bytes"

    def interrupted_load(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "load", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        read_image8(victim, None, None)


@pytest.mark.parametrize("command", ["eval", "pixel-index"])
def test_max_image_pixels_must_be_positive(command, gray_folder, tmp_path):
    target = ["--data", f"imagefolder:{gray_folder}"] if command == "eval" else [gray_folder]
    result = invoke(command, "example:digits", *target, "--max-image-pixels", 0, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--max-image-pixels must be a positive integer, got 0" in one_error_line(result)
    assert not (tmp_path / "run").exists()


# --- channels follow the majority ----------------------------------------------------------------------------

def rgba_version(gray_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA image with distinct colour channels, and the gray image robench should make of it."""
    rgb = np.stack([gray_image, gray_image // 2, 255 - gray_image], axis=-1)
    alpha = np.full_like(gray_image, 90)[..., None]
    luma = np.clip(np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, alpha], axis=-1), luma


def test_one_rgba_image_among_gray_is_converted_and_listed(gray_folder, tmp_path):
    victim = sorted((gray_folder / "7").iterdir())[0]
    rgba, luma = rgba_version(np.asarray(Image.open(victim)))
    odd, expected = tmp_path / "odd", tmp_path / "expected"
    shutil.copytree(gray_folder, odd)
    shutil.copytree(gray_folder, expected)
    Image.fromarray(rgba, mode="RGBA").save(odd / "7" / victim.name)
    Image.fromarray(luma).save(expected / "7" / victim.name)

    dataset = load_data(f"imagefolder:{odd}")
    assert dataset.base.x.shape == (N_GOOD, 1, 8, 8)
    assert dataset.converted == [{"file": str(odd / "7" / victim.name), "from": "RGBA", "to": "L"}]
    assert load_data(f"imagefolder:{expected}").converted == []

    odd_doc, expected_doc = run_eval(odd, tmp_path / "run-odd"), run_eval(expected, tmp_path / "run-expected")
    assert odd_doc["clean"]["n"] == N_GOOD
    # Same pixels as a folder holding the luma image instead: same fingerprint, same accuracy.
    assert odd_doc["data"]["fingerprint"] == expected_doc["data"]["fingerprint"]
    assert odd_doc["clean"] == expected_doc["clean"]

    result = invoke("pixel-index", "example:digits", odd, "--pixels", "1", "--json", "--out", tmp_path / "px")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["images"]["converted"] == dataset.converted
    assert "converted 1 image(s) to grayscale" in result.stderr


def test_majority_tie_and_forced_channels(gray_folder, tmp_path):
    files = sorted((gray_folder / "1").iterdir())[:4]
    folder = tmp_path / "mixed" / "1"
    folder.mkdir(parents=True)
    for i, source in enumerate(files):
        gray = np.asarray(Image.open(source))
        image = Image.fromarray(gray) if i < 2 else Image.fromarray(gray).convert("P")  # palette reads as RGB
        image.save(folder / f"{i}.png")

    def channels_and_converted(gray=None):
        scan = scan_folder(folder.parent)
        x, _ = load_folder(scan, None, None, gray)
        return x.shape[1], {(e["file"].rsplit("/", 1)[-1], e["from"], e["to"]) for e in scan.converted}

    # Two gray and two palette images: a tie keeps colour, the gray ones are repeated to RGB.
    assert channels_and_converted() == (3, {("0.png", "L", "RGB"), ("1.png", "L", "RGB")})
    # Forced conversions are listed too: the list is every file whose channels were changed.
    assert channels_and_converted(gray=True) == (1, {("2.png", "P", "L"), ("3.png", "P", "L")})
    Image.fromarray(np.asarray(Image.open(files[0]))).save(folder / "4.png")
    assert channels_and_converted() == (1, {("2.png", "P", "L"), ("3.png", "P", "L")})  # gray majority
    assert channels_and_converted(gray=False)[0] == 3

    dataset = load_data(f"imagefolder:{folder.parent}", DataOptions(gray=False))
    assert dataset.base.x.shape == (5, 3, 8, 8) and len(dataset.converted) == 3
    assert len(dataset.subset(2).converted) == 3  # the list describes the folder, as skipped does


def test_eval_rgb_option_reaches_the_data(gray_folder, tmp_path):
    # The digits model takes one channel: --rgb makes three, so the run fails in the model, not the option.
    rgb = invoke("eval", "example:digits", "--suite", "clean", "--data", f"imagefolder:{gray_folder}", "--rgb",
                 "--quiet", "--out", tmp_path / "rgb")
    gray = invoke("eval", "example:digits", "--suite", "clean", "--data", f"imagefolder:{gray_folder}", "--gray",
                  "--json", "--quiet", "--out", tmp_path / "gray")
    assert gray.exit_code == 0, gray.stderr
    assert rgb.exit_code in (2, 3)
    one_error_line(rgb)


def test_folder_options_are_refused_for_other_data(tmp_path):
    result = invoke("eval", "example:digits", "--suite", "clean", "--gray", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--gray/--rgb apply to imagefolder: data only, not example" in one_error_line(result)


# --- array layouts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, hint", [
    ("uint8-nchw", "x is uint8 with shape ({n}, 1, 8, 8): robench reads uint8 images as NHWC; "
                   "transpose with x.transpose(0, 2, 3, 1)"),
    ("float-nhwc", "x is float32 with shape ({n}, 8, 8, 1): robench reads float images as NCHW; "
                   "transpose with x.transpose(0, 3, 1, 2)"),
])
def test_swapped_axes_in_npz_exit_2_with_the_transpose(layout, hint, digits_split, tmp_path):
    _, x_te, _, y_te = digits_split
    x = x_te.transpose(0, 3, 1, 2) if layout == "uint8-nchw" else (x_te / 255.0).astype(np.float32)
    np.savez(tmp_path / "bad.npz", x=x, y=y_te)
    result = invoke("eval", "example:digits", "--suite", "clean", "--data", f"npz:{tmp_path / 'bad.npz'}",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert one_error_line(result).endswith(hint.format(n=len(x_te)))
    # Transposed as told, the same arrays evaluate.
    fixed = x.transpose(0, 2, 3, 1) if layout == "uint8-nchw" else x.transpose(0, 3, 1, 2)
    assert len(from_arrays(fixed, y_te)) == len(x_te)


def test_ambiguous_layouts_are_left_alone():
    y = np.zeros(2, dtype=np.int64)
    for x in (np.zeros((2, 3, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8),
              np.zeros((2, 3, 8, 3), np.float32), np.zeros((2, 1, 8, 8), np.float32),
              np.zeros((2, 3, 5, 4), np.uint8)):
        assert len(from_arrays(x, y)) == 2, x.shape
    with pytest.raises(UsageError, match=r"transpose\(0, 2, 3, 1\)"):
        from_arrays(np.zeros((2, 3, 32, 32), np.uint8), y)


# --- unreadable paths ----------------------------------------------------------------------------------------

def test_unreadable_npz_exits_2_in_one_line(tmp_path):
    # Reading /proc/self/mem at offset 0 fails with an I/O error, even for root.
    result = invoke("eval", "example:digits", "--suite", "clean", "--data", "npz:/proc/self/mem",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert one_error_line(result) == "robench: error: cannot read data file /proc/self/mem: Input/output error; " \
                                     "check that it is readable by this user"


def test_unlistable_class_folder_exits_2_instead_of_losing_the_class(gray_folder, tmp_path, monkeypatch):
    locked = gray_folder / "4"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for args in (["eval", "example:digits", "--suite", "clean", "--data", f"imagefolder:{gray_folder}"],
                 ["pixel-index", "example:digits", gray_folder]):
        result = invoke(*args, "--out", tmp_path / args[0])
        assert result.exit_code == 2, result.stderr
        assert one_error_line(result) == (f"robench: error: cannot read {locked} in data folder {gray_folder}: "
                                          "Permission denied")


def test_unlistable_data_folder_on_this_machine(tmp_path):
    folder = "/proc/1/fdinfo"  # listing another process's descriptors is refused inside most containers
    try:
        os.listdir(folder)
    except PermissionError:
        pass
    else:
        pytest.skip(f"{folder} is listable here")
    for args in (["eval", "example:digits", "--data", f"imagefolder:{folder}"],
                 ["pixel-index", "example:digits", folder]):
        result = invoke(*args, "--out", tmp_path / args[0])
        assert result.exit_code == 2
        assert one_error_line(result) == f"robench: error: cannot read data folder {folder}: Permission denied"


def test_an_npz_whose_array_claims_more_than_the_machine_has_is_refused_before_loading(tmp_path):
    """A forged .npy header (or a zip bomb of zeros) would have numpy allocate what it claims."""
    import time
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10 ** 6, 1000, 1000, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, dtype=np.int64))
    with zipfile.ZipFile(tmp_path / "forged.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue())  # magic and header, no data
        archive.writestr("y.npy", labels.getvalue())
    started = time.perf_counter()
    result = invoke("eval", "example:digits", "--data", f"npz:{tmp_path / 'forged.npz'}", "--suite", "clean",
                    "--out", tmp_path / "run")
    assert time.perf_counter() - started < 30
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "x.npy holds 3e+03 GB (shape (1000000, 1000, 1000, 3)), more than the" in line
    assert line.endswith("GB of memory available")
    assert not (tmp_path / "run").exists()
