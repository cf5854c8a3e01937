"""The re-identification results document: CMC, mAP and mINP per setting, on the shared blocks of
:mod:`robench.results.document`."""

from __future__ import annotations

from typing import Any

from robench.evaluation import distributed
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.reid.datasets import ReIDData
from robench.reid.engine import ReIDOptions, ReIDOutcome
from robench.results.document import ABSENT, data_block, env_block, header, model_block, suite_block
from robench.results.schema import SCHEMA
from robench.suites import LoadedSuite


def reid_document(outcome: ReIDOutcome, loaded: LoadedModel, normalization: Normalization | None,
              surrogate: LoadedModel | None, suite: LoadedSuite, data: ReIDData, options: ReIDOptions,
              feature_layer: str | None, flip: bool, l2: bool, dev: Any) -> dict[str, Any]:
    """The results document of a finished or an interrupted run (``progress``: settings finished of all)."""
    return {
        **header(SCHEMA, "reid", outcome.complete),
        "progress": {"evaluated": len(outcome.attacks), "total": outcome.total, "unit": "settings"},
        "model": model_block(loaded, normalization=normalization, feature_layer=feature_layer, flip=flip, l2=l2),
        "surrogate": None if surrogate is None else model_block(surrogate),
        "suite": suite_block(suite.suite.name, suite.path, suite.sha256, overrides=suite.overrides),
        "data": data_block({"spec": data.spec, "queries": len(data.query),
                            "gallery": len(data.gallery), "junk_excluded": data.junk, "skipped": data.skipped},
                           outcome.fingerprint),
        "protocol": {"distance": options.metric, "ranks": list(options.ranks), "ap_convention": options.ap,
                     "denominator": options.denominator, "perturb": options.perturb, "rerank": options.rerank},
        "clean": outcome.clean,
        "clean_reranked": outcome.clean_reranked,
        "attacks": outcome.attacks,
        "sanity": {"nonfinite_features": outcome.nonfinite_features},
        # A ReID run has no precision option: it always runs in fp32.
        "env": env_block(dev, precision="fp32", seed=options.seed, batch_size=options.batch_size,
                         checkpoint_sha256=loaded.sha256, processes=distributed.world()[1],
                         suite_sha256=suite.sha256, dataset_fingerprint=outcome.fingerprint,
                         seconds=outcome.seconds,
                         speed={"work_units": outcome.work_units} if outcome.work_units else ABSENT),
    }
