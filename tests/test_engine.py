"""The evaluation loop and its results document, through ``robench.evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from robench import evaluate
from robench.errors import RunError, UsageError
from robench.models.preprocessing import Normalization

SUITE = {
    "name": "small",
    "attacks": [
        {"attack": "fgsm", "eps": [0.05, "0.2"]},
        {"attack": "pgd", "eps": ["1/10"], "steps": 5},
    ],
}


@pytest.fixture(scope="module")
def result(trained_model, test_tensors):
    return evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size=128)


def test_document_contract(result, test_tensors):
    doc = json.loads(result.to_json())
    n = len(test_tensors[1])
    assert doc["schema"] == "robench.results/1"
    assert doc["clean"]["n"] == n and 0.9 < doc["clean"]["accuracy"] <= 1.0
    assert [(a["attack"], a["eps"]) for a in doc["attacks"]] == [("fgsm", 0.05), ("fgsm", 0.2), ("pgd", 0.1)]
    for a in doc["attacks"]:
        assert 0.0 <= a["accuracy"] <= doc["clean"]["accuracy"]
        assert a["n"] == n and a["attacked"] == doc["clean"]["correct"]
        assert a["success_rate"] == pytest.approx(1 - a["accuracy"] * n / a["attacked"])
        assert a["params"]["norm"] == "linf"
    assert doc["attacks"][2]["params"]["steps"] == 5
    assert doc["attacks"][2]["params"]["step_size"] == pytest.approx(2.5 * 0.1 / 5)
    assert doc["attacks"][1]["params"]["eps_expr"] == "0.2"
    assert doc["robust_accuracy"] <= min(a["accuracy"] for a in doc["attacks"])
    assert doc["mean_attack_accuracy"] == pytest.approx(np.mean([a["accuracy"] for a in doc["attacks"]]))
    env = doc["env"]
    for key in ("robench", "torch", "torchvision", "device", "precision", "seed", "suite_sha256",
                "dataset_fingerprint"):
        assert env[key] not in (None, "")
    assert env["device"] == "cpu" and env["precision"] == "fp32"


def test_accuracy_falls_with_eps(result):
    fgsm = [a["accuracy"] for a in result.doc["attacks"] if a["attack"] == "fgsm"]
    assert fgsm[0] > fgsm[1]


def test_per_sample_flags_agree_with_the_summary(result):
    samples = result.samples
    doc = result.doc
    assert samples["clean_correct"].mean() == pytest.approx(doc["clean"]["accuracy"])
    robust_cols = [c for c in samples.columns if c.startswith("robust[")]
    assert len(robust_cols) == 3
    for col, entry in zip(robust_cols, doc["attacks"]):
        assert samples[col].mean() == pytest.approx(entry["accuracy"])
        assert not (samples[col] & ~samples["clean_correct"]).any(), "robust implies clean-correct"
    worst = samples[robust_cols].all(axis=1)
    assert (worst == samples["robust_all"]).all()


def test_tidy_rows_pivot(result):
    tidy = result.tidy()
    acc = tidy[tidy.metric == "accuracy"]
    table = acc.pivot_table(index=["attack", "eps"], values="value")
    assert table.loc[("clean", 0.0), "value"] == result.clean_accuracy
    assert set(tidy.metric) == {"accuracy", "success_rate", "robust_accuracy", "mean_attack_accuracy"}


def test_batch_size_does_not_change_results(trained_model, test_tensors, result):
    other = evaluate(trained_model, test_tensors, SUITE, device="cpu", batch_size=37)
    for a, b in zip(result.doc["attacks"], other.doc["attacks"]):
        assert a["accuracy"] == b["accuracy"]
    assert result.doc["env"]["dataset_fingerprint"] == other.doc["env"]["dataset_fingerprint"]
    assert result.samples.equals(other.samples)


def test_same_seed_repeats_other_seed_differs(trained_model, test_tensors):
    suite = {"name": "r", "attacks": [{"attack": "pgd", "eps": 0.08, "steps": 1, "final_iterate": True}]}
    runs = [evaluate(trained_model, test_tensors, suite, device="cpu", seed=s).samples for s in (3, 3, 4)]
    assert runs[0].equals(runs[1])
    col = [c for c in runs[0].columns if c.startswith("robust[")][0]
    assert not runs[0][col].equals(runs[2][col])


def test_eval_mode_and_requires_grad_are_restored(test_tensors):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 10))
    model.train()
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    running_mean = model[2].running_mean.clone()
    evaluate(model, test_tensors, {"name": "m", "attacks": [{"attack": "fgsm", "eps": 0.1}]}, device="cpu")
    assert seen and not any(seen), "the model ran in eval mode during the evaluation"
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(running_mean, model[2].running_mean), "BatchNorm statistics untouched"
    assert all(p.grad is None for p in model.parameters())


def test_clean_only_suite(trained_model, test_tensors):
    doc = evaluate(trained_model, test_tensors, {"name": "c", "attacks": []}, device="cpu").doc
    assert doc["attacks"] == [] and doc["robust_accuracy"] is None
    assert doc["clean"]["accuracy"] > 0.9


def test_labels_outside_the_model_classes(trained_model, test_tensors):
    x, y = test_tensors
    bad = y.clone()
    bad[5] = 12
    with pytest.raises(UsageError, match="label 12 .* outside the model's 10 classes"):
        evaluate(trained_model, (x, bad), {"name": "c", "attacks": []}, device="cpu")


class TupleOut(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), torch.zeros(len(x), 5)


class DictOut(TupleOut):
    def forward(self, x):
        return {"features": torch.zeros(len(x), 5), "logits": self.model(x)}


class FeatureDict(TupleOut):
    def forward(self, x):
        return {"features": self.model(x)}


def test_tuple_and_dict_outputs(trained_model, test_tensors, result):
    for wrapper in (TupleOut, DictOut):
        doc = evaluate(wrapper(trained_model), test_tensors, SUITE, device="cpu", batch_size=128).doc
        assert doc["clean"] == result.doc["clean"]
        assert [a["accuracy"] for a in doc["attacks"]] == [a["accuracy"] for a in result.doc["attacks"]]
    with pytest.raises(RunError, match="dict without a logits entry"):
        evaluate(FeatureDict(trained_model), test_tensors, SUITE, device="cpu")


class Normalised(nn.Module):
    """Expects z-scored input: undoes it, so the underlying model sees pixels."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, z):
        return self.model(z * self.std + self.mean)


def test_normalized_eps_space_converts_by_std(trained_model, test_tensors):
    mean, std = 0.3, 0.25
    norm = Normalization(mean=(mean,), std=(std,))
    z_suite = {"name": "z", "eps_space": "normalized",
               "attacks": [{"attack": "bim", "eps": [0.4], "steps": 5, "final_iterate": True}]}
    px_suite = {"name": "p", "attacks": [{"attack": "bim", "eps": [0.4 * std], "steps": 5, "final_iterate": True}]}
    z_doc = evaluate(Normalised(trained_model, mean, std), test_tensors, z_suite, normalization=norm,
                     device="cpu").doc
    px_doc = evaluate(trained_model, test_tensors, px_suite, device="cpu").doc
    assert z_doc["attacks"][0]["eps"] == 0.4 and z_doc["attacks"][0]["eps_space"] == "normalized"
    assert z_doc["clean"]["accuracy"] == px_doc["clean"]["accuracy"]
    assert z_doc["attacks"][0]["accuracy"] == pytest.approx(px_doc["attacks"][0]["accuracy"], abs=2 / 540)
    with pytest.raises(UsageError, match="normalised units"):
        evaluate(trained_model, test_tensors, z_suite, device="cpu")


def test_empty_data_and_bad_batch_size(trained_model, test_tensors):
    x, y = test_tensors
    with pytest.raises(UsageError, match="empty"):
        evaluate(trained_model, (x[:0], y[:0]), {"name": "c", "attacks": []}, device="cpu")
    with pytest.raises(UsageError, match="batch-size"):
        evaluate(trained_model, test_tensors, {"name": "c", "attacks": []}, device="cpu", batch_size=0)


def test_limit_takes_a_fixed_subset(trained_model, test_tensors):
    a = evaluate(trained_model, test_tensors, {"name": "c", "attacks": []}, device="cpu", limit=100)
    b = evaluate(trained_model, test_tensors, {"name": "c", "attacks": []}, device="cpu", limit=100)
    assert a.doc["clean"]["n"] == 100
    assert list(a.samples["index"]) == list(b.samples["index"])
    assert a.doc["env"]["dataset_fingerprint"] == b.doc["env"]["dataset_fingerprint"]
    full = evaluate(trained_model, test_tensors, {"name": "c", "attacks": []}, device="cpu")
    assert a.doc["env"]["dataset_fingerprint"] != full.doc["env"]["dataset_fingerprint"]


def test_save_writes_the_run_directory(result, tmp_path):
    out = result.save(tmp_path / "run")
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "samples.csv", "config.json"}
    assert json.loads((out / "results.json").read_text()) == json.loads(result.to_json())
