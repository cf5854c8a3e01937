"""The papers' reported tables (robench/reporting/paper_tables) and ``robench compare --paper``."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

import robench
from robench.errors import UsageError
from robench.examples import digits_cnn
from robench.reid.generator import GeneratorConfig
from robench.reporting.compare import alignment_layout, fdd_layout, pixel_layout, reid_layout, reid_rows_layout
from robench.reporting.paper import (CSV_COLUMNS, OPTIONAL_COLUMNS, PAPER_TABLES, available, header_lines,
                                     paper_rows, read_table)
from robench.results.metric_table import metric_info
from robench.results.reading import ROW_COLUMNS
from cli_helpers import invoke, one_error_line

KNOWN_METRICS = {"accuracy", "rank1", "rank5", "rank10", "mAP", "misclassified", "recognition_rate"}

# (table, dataset) -> rows: models x settings x metrics, as the papers print them.
ROW_COUNTS = {
    ("fdd-table3", "fashion-mnist"): 6 * 7,
    ("fdd-table3", "cifar100"): 6 * 7,
    ("alignment-table2", "mnist"): 5 * (1 + 4),
    ("alignment-table3", "fashion-mnist"): 5 * (1 + 6),
    ("alignment-table4", "cifar10"): 5 * (1 + 6),
    ("alignment-table5", "stl10"): 5 * (1 + 6),
    ("alignment-table6", "cifar10"): 3 * (1 + 8),
    ("lfm-table1", "market1501"): 11 * 4,
    ("lfm-table2", "dukemtmc"): 12 * 4,
    ("lfm-table3", "market1501"): 4 * 2 * 4,
    ("pixel-table10", "imagenet"): 5 * 5 * 2,
    ("pixel-table11", "imagenet"): 2 * 2,
}

# The Mean column each alignment table prints (not stored in the CSVs): the transcription check.
PRINTED_MEANS = {
    "alignment-table2": {"Normal Training": 20.06, "Goodfellow et al.": 52.36, "Madry et al.": 73.04,
                         "Ours PGD(k=10)": 92.77, "Ours PGD(k=40)": 97.07},
    "alignment-table3": {"Normal Training": 6.41, "Goodfellow et al.": 39.61, "Madry et al.": 67.93,
                         "Ours PGD(k=10)": 72.78, "Ours PGD(k=40)": 72.46},
    "alignment-table4": {"Normal Training": 13.26, "Goodfellow et al.": 34.01, "Madry et al.": 45.96,
                         "Ours PGD(k=10)": 57.84, "Ours PGD(k=40)": 59.61},
    "alignment-table5": {"Normal Training": 15.33, "Goodfellow et al.": 23.92, "Madry et al.": 30.02,
                         "Ours PGD(k=10)": 41.05, "Ours PGD(k=40)": 41.51},
    "alignment-table6": {"Song et al.": 52.13, "Ours PGD(k=10)": 59.44, "Ours PGD(k=40)": 59.92},
}
# Rows whose printed Mean is not the mean of the paper's own printed row (beyond rounding).
MEAN_DISAGREES = {("alignment-table2", "Ours PGD(k=40)"), ("alignment-table3", "Normal Training"),
                  ("alignment-table3", "Goodfellow et al."), ("alignment-table3", "Ours PGD(k=10)"),
                  ("alignment-table4", "Goodfellow et al."), ("alignment-table4", "Ours PGD(k=10)"),
                  ("alignment-table6", "Ours PGD(k=10)")}


def _value(frame, model, entry, metric, eps=None, pixels=None):
    rows = frame[(frame.model == f"paper: {model}") & (frame.entry == entry) & (frame.metric == metric)]
    if eps is not None:
        rows = rows[np.isclose(rows.eps.astype(float), eps)]
    if pixels is not None:
        rows = rows[rows.pixels == pixels]
    assert len(rows) == 1, (model, entry, metric, eps, pixels)
    return float(rows.value.iloc[0])


# ------------------------------------------------------------------ the CSVs
@pytest.mark.parametrize("name", available())
def test_every_csv_parses_with_the_tidy_columns(name):
    table = read_table(name)
    stored = list(table.columns)
    assert stored[:len(CSV_COLUMNS)] == CSV_COLUMNS
    assert set(stored[len(CSV_COLUMNS):]) <= set(OPTIONAL_COLUMNS)
    assert set(table.metric) <= KNOWN_METRICS
    values = table.value.astype(float)
    fractions = table.metric.map(lambda m: metric_info(m).percent)
    assert values[fractions].between(0, 1).all(), "percentages are stored as fractions"
    assert (values[~fractions] >= 0).all()
    assert header_lines(name), "each CSV says where it comes from and how it was read"
    keys = table[["dataset", "model", "entry", "eps", "pixels", "metric"]].astype(str).agg("|".join, axis=1)
    assert keys.is_unique, "one value per printed cell"


@pytest.mark.parametrize("table_dataset", sorted(ROW_COUNTS))
def test_row_counts_and_frame_columns(table_dataset):
    name, dataset = table_dataset
    rows = paper_rows(f"{name}:{dataset.upper()}")  # the dataset is matched case-insensitively
    assert list(rows.columns) == ROW_COLUMNS
    assert len(rows) == ROW_COUNTS[table_dataset]
    assert rows.model.str.startswith("paper: ").all()
    assert set(rows.kind) == {PAPER_TABLES[name].kind}
    assert (rows.source == f"paper:{name}").all()


def test_spot_values_fdd_table3():
    fmnist, cifar = paper_rows("fdd-table3:fashion-mnist"), paper_rows("fdd-table3:cifar100")
    assert _value(fmnist, "FDD-1D", "fgsm", "accuracy", 0.03) == pytest.approx(0.5492)
    assert _value(fmnist, "Spatial", "pgd", "accuracy", 0.03) == pytest.approx(0.1115)
    assert _value(cifar, "FDD-3D", "bim", "accuracy", 0.015) == pytest.approx(0.5009)
    # The paper's text: FDD-1D beats the original dropout on CIFAR-100 by 51.28 (FGSM 0.06), 53.61 (BIM 0.03)
    # and 50.71 (PGD 0.03) points.
    for entry, eps, gain in (("fgsm", 0.06, 51.28), ("bim", 0.03, 53.61), ("pgd", 0.03, 50.71)):
        diff = _value(cifar, "FDD-1D", entry, "accuracy", eps) - _value(cifar, "Original", entry, "accuracy", eps)
        assert 100 * diff == pytest.approx(gain, abs=1e-9)


def test_fdd_rows_fill_the_fdd_layout_as_the_paper_prints_it():
    table = fdd_layout(paper_rows("fdd-table3:cifar100")).frame
    assert list(table.index) == ["fgsm ε = 0.015", "fgsm ε = 0.03", "fgsm ε = 0.06", "bim ε = 0.015",
                                 "bim ε = 0.03", "pgd ε = 0.015", "pgd ε = 0.03"]
    assert list(table.columns) == [f"paper: {m}" for m in
                                   ("Non-dropout", "Original", "FDD-1D", "Spatial", "FDD-2D", "FDD-3D")]
    assert table.loc["pgd ε = 0.03"].round(2).tolist() == [7.53, 9.25, 59.96, 8.49, 51.01, 39.44]


@pytest.mark.parametrize("name", sorted(PRINTED_MEANS))
def test_alignment_layout_mean_matches_the_printed_mean(name):
    table = alignment_layout(paper_rows(name)).frame
    stored = read_table(name)
    for model, printed in PRINTED_MEANS[name].items():
        mean = table.loc[f"paper: {model}", "Mean"]
        note = set(stored[stored.model == model].note)
        if (name, model) in MEAN_DISAGREES:
            assert abs(mean - printed) > 0.01
            assert len(note) == 1 and f"paper prints Mean {printed:.2f}" in note.pop(), "the disagreement is noted"
        else:
            assert mean == pytest.approx(printed, abs=0.01 + 1e-9), (name, model)
            assert note == {""}


def test_alignment_columns_use_the_suite_labels():
    table = alignment_layout(paper_rows("alignment-table3")).frame
    assert list(table.columns) == ["Clean", "fgsm ε = 0.2", "fgsm ε = 0.3", "pgd-k10 ε = 0.2", "pgd-k10 ε = 0.3",
                                   "pgd-k20 ε = 0.2", "pgd-k20 ε = 0.3", "Mean"]
    assert table.loc["paper: Madry et al.", "pgd-k20 ε = 0.3"] == pytest.approx(62.16)
    assert table.loc["paper: Ours PGD(k=40)", "Clean"] == pytest.approx(91.59)


def test_lfm_tables_fill_the_reid_layouts():
    table = reid_layout(paper_rows("lfm-table1")).frame
    assert table.loc["paper: ReID Baseline + LFM (Ours)", "Original Rank-1"] == pytest.approx(88.7)
    assert table.loc["paper: ReID Baseline + LFM (Ours)", "Original + re-ranking mAP"] == pytest.approx(85.6)
    assert np.isnan(table.loc["paper: ReID Baseline - Dropout", "Original + re-ranking Rank-1"])
    assert len(table) == 6, "a model and its re-ranked row share one row"
    rows = reid_rows_layout(paper_rows("lfm-table2")).frame
    assert rows.loc["Original + re-ranking · paper: Strong Baseline", "mAP"] == pytest.approx(89.1)
    assert list(rows.columns) == ["Rank-1", "Rank-5", "Rank-10", "mAP"]


def test_lfm_table3_dmr_lands_where_a_default_dmr_run_does():
    rows = paper_rows("lfm-table3")
    dmr = rows[rows.entry == "dmr"]
    assert dmr.eps.eq(GeneratorConfig().eps).all() and dmr.eps_text.isna().all()
    table = reid_layout(rows).frame
    assert table.loc["paper: ResNet + LFM (Ours)", "dmr ε = 0.0627451 Rank-1"] == pytest.approx(34.5)
    assert table.loc["paper: ResNet", "Original mAP"] == pytest.approx(71.5)
    assert _value(rows, "ResNet + LFM (Ours)", "dmr", "rank1") - _value(rows, "ResNet + Dropout", "dmr", "rank1") \
        == pytest.approx(0.048), "the paper's text: a 4.8 point gain"


def test_pixel_table10_counts_agree_with_rates_but_for_the_noted_cell():
    rows = paper_rows("pixel-table10")
    stored = read_table("pixel-table10")
    odd = set(zip(stored[stored.note != ""].model, stored[stored.note != ""].pixels.astype(int)))
    assert odd == {("ResNet101-16", 4)}
    for model in ("ResNet101-4", "ResNet101-8", "ResNet101-16", "ResNet101-32", "ResNet101-64"):
        for pixels in (4, 8, 16, 32, 64):
            missed = _value(rows, model, "range:0-255", "misclassified", pixels=pixels)
            rate = _value(rows, model, "range:0-255", "recognition_rate", pixels=pixels)
            agrees = rate == pytest.approx(1 - missed / 1000)
            assert agrees != ((model, pixels) in odd), (model, pixels)
    table = pixel_layout(rows, "misclassified").frame
    assert list(table.columns) == ["4 px", "8 px", "16 px", "32 px", "64 px"]
    assert table.loc["range:0-255 · paper: ResNet101-64"].tolist() == [47, 48, 50, 52, 55]


def test_pixel_table11():
    rows = paper_rows("pixel-table11")
    assert _value(rows, "ResNet101-4", "attack:fgsm", "misclassified", pixels=0) == 2490
    assert _value(rows, "ResNet101-4", "attack:fgsm", "recognition_rate", pixels=0) == pytest.approx(0.751)
    assert _value(rows, "ResNet", "attack:fgsm", "misclassified", pixels=0) == 10000
    table = pixel_layout(rows, "recognition_rate").frame
    assert table.loc["attack:fgsm · paper: ResNet101-4", "0 px"] == pytest.approx(75.1)


def test_spec_errors():
    with pytest.raises(UsageError, match="did you mean 'fdd-table3'.*available: fdd-table3"):
        paper_rows("fdd-tabel3")
    with pytest.raises(UsageError, match=r"several datasets.*\(fashion-mnist, cifar100\)"):
        paper_rows("fdd-table3")
    with pytest.raises(UsageError, match="no dataset 'mnist'; it has fashion-mnist, cifar100"):
        paper_rows("fdd-table3:mnist")
    assert len(paper_rows("FDD-Table3:Fashion-MNIST")) == 42


# ------------------------------------------------------------------ robench compare --paper
@pytest.fixture(scope="module")
def fdd_run(tmp_path_factory):
    """A real (tiny, untrained) run of the built-in fdd-fashion-mnist suite on 24 digits images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images[:24]).float().div(16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target[:24]).long()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = digits_cnn().eval()
    result = robench.evaluate(model, (x, y), "fdd-fashion-mnist", device="cpu", seed=0)
    result.doc["model"]["name"] = "measured"
    return result.save(tmp_path_factory.mktemp("paper") / "run")


def test_compare_puts_the_paper_beside_the_run(fdd_run):
    result = invoke("compare", fdd_run, "--paper", "fdd-table3:fashion-mnist", "--layout", "fdd", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    table = {row["setting"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    assert list(next(iter(table.values()))) == ["setting", "measured", "paper: Non-dropout", "paper: Original",
                                                "paper: FDD-1D", "paper: Spatial", "paper: FDD-2D", "paper: FDD-3D"]
    # The paper's settings land in the run's rows: seven shared rows, plus the run's clean and worst-case rows.
    assert list(table) == ["clean", "fgsm ε = 0.03", "fgsm ε = 0.06", "fgsm ε = 0.12", "bim ε = 0.02",
                           "bim ε = 0.03", "pgd ε = 0.02", "pgd ε = 0.03", "worst case"]
    assert all(row["measured"] != "" for row in table.values())
    assert float(table["fgsm ε = 0.03"]["paper: FDD-1D"]) == pytest.approx(54.92)
    assert float(table["bim ε = 0.03"]["paper: Original"]) == pytest.approx(2.11)
    assert table["clean"]["paper: FDD-1D"] == "", "the paper prints no clean row"
    assert "not comparable" not in result.stderr, "paper rows are not runs"
    markdown = invoke("compare", fdd_run, "--paper", "fdd-table3:fashion-mnist", "--format", "markdown")
    assert "> paper rows: FDD Table 3 of Feature-Density Dropout (fashion-mnist)" in markdown.stdout


def test_compare_paper_in_another_layout_warns(fdd_run):
    result = invoke("compare", fdd_run, "--paper", "alignment-table3", "--layout", "alignment", "--format", "csv")
    assert result.exit_code == 0 and "warning" not in result.stderr
    result = invoke("compare", fdd_run, "--paper", "lfm-table1", "--layout", "fdd", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert "warning: LFM Table I fits the reid, reid-rows layout, not fdd" in result.stderr
    assert "paper:" not in result.stdout, "a ReID table has no accuracy rows for the fdd layout"
    result = invoke("compare", fdd_run, "--paper", "alignment-table3", "--format", "csv")
    assert result.exit_code == 0
    assert "warning: Alignment Table 3 fits the alignment layout, not fdd" in result.stderr


def test_compare_paper_list():
    result = invoke("compare", "--paper", "list")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == available()
    assert "fdd-table3\tFDD Table 3\tfashion-mnist, cifar100\tlayout: fdd" in lines


def test_compare_paper_errors_are_one_line(fdd_run):
    for args, text in ((("--paper", "fdd-tabel3"), "did you mean 'fdd-table3'"),
                       (("--paper", "fdd-table3"), "several datasets"),
                       (("--paper", "fdd-table3:stl10"), "no dataset 'stl10'")):
        result = invoke("compare", fdd_run, *args)
        assert result.exit_code == 2
        assert text in one_error_line(result)
    result = invoke("compare")
    assert result.exit_code == 2 and "give at least one result" in one_error_line(result)
