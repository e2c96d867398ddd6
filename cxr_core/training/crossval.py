"""k-fold cross-validation (as Lang et al. report): train+val pooled, folds by patient.

The test split is never touched. Each fold trains the full recipe with that fold as its
validation set; the report gives per-fold metrics and their mean and standard deviation.
The same fold runs give cross-fitted scores (:func:`out_of_fold_logits`): every film scored by
a run that did not train on it, which site adaptation fits its temperature and threshold on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxr_core.metrics import compute_metrics
from cxr_core.models.loading import select_device
from cxr_core.training.config import TrainConfig
from cxr_core.training.dataset import _bucket, split_key
from cxr_core.training.images import ImageSet
from cxr_core.training.prepare import PreparedData
from cxr_core.training.run import write_json
from cxr_core.training.trainer import final_spec, load_exported, model_films, predict_arrays, probabilities, train

log = logging.getLogger(__name__)


def fold_of(record: Any, k: int, salt: str = "cxr-folds") -> int:
    """Fold index from the patient (or the file when there is no patient id): a patient stays in one fold."""
    return min(int(_bucket(split_key(record), salt) * k), k - 1)


@dataclass(frozen=True)
class OutOfFold:
    """Scores of every film of a pool, each from the fold run that did not train on it."""

    logits: np.ndarray  # (N, n_model_classes) float32, the exported networks' (auxiliary outputs dropped)
    labels: np.ndarray  # (N,) int64 index into config.model_classes
    records: tuple[Any, ...]  # the N films, in the order of the rows above (film i held out of fold fold_of(records[i], k))
    folds: tuple[dict[str, Any], ...]  # per fold: fold, n_train, n_val, best_epoch


def _fold_runs(config: TrainConfig, data: PreparedData, k: int, run_dir: Path | str,
               stop: threading.Event | None) -> Iterator[tuple[dict[str, Any], ImageSet, np.ndarray]]:
    """Train one run per fold of train+val pooled (folds by patient), each validated on its own
    fold; yields (fold facts, the fold's model-class films, their logits from that fold's run)."""
    if k < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    pool = ImageSet.concat([data.train, data.val])
    folds = np.array([fold_of(r, k) for r in pool.records])
    device = select_device(config.device)
    for fold in range(k):
        held = np.nonzero(folds == fold)[0]
        kept = np.nonzero(folds != fold)[0]
        fold_data = replace(data, train=pool.subset(kept), val=pool.subset(held))
        fold_dir = Path(run_dir) / f"fold-{fold + 1}"
        result, _ = train(config, fold_dir, data=fold_data, stop=stop)
        network = load_exported(config, fold_dir)
        judged = model_films(config, fold_data.val)
        network.to(device)
        logits = predict_arrays(network, judged.resized(config.final_size), final_spec(config), device)
        yield {"fold": fold + 1, "n_train": len(kept), "n_val": len(judged.records), "best_epoch": result.best_epoch}, judged, logits


def out_of_fold_logits(config: TrainConfig, data: PreparedData, k: int, run_dir: Path | str,
                       stop: threading.Event | None = None) -> OutOfFold:
    """Cross-fitting: every film of train+val scored by a run that never trained on it, so that a
    temperature and threshold can be fitted on all of them rather than on the validation split
    alone. Each fold run chooses its epoch on the fold it scores (a small optimism)."""
    index = {c: i for i, c in enumerate(config.model_classes)}
    logits, labels, records, facts = [], [], [], []
    for fact, judged, fold_logits in _fold_runs(config, data, k, run_dir, stop):
        logits.append(fold_logits)
        labels.extend(index[r.label] for r in judged.records)
        records.extend(judged.records)
        facts.append(fact)
        log.info("cross-fitting fold %d/%d scored %d films", fact["fold"], k, fact["n_val"])
    return OutOfFold(np.concatenate(logits).astype(np.float32), np.array(labels, dtype=np.int64), tuple(records), tuple(facts))


def cross_validate(config: TrainConfig, data: PreparedData, k: int, run_dir: Path | str, stop: threading.Event | None = None) -> dict[str, Any]:
    classes = config.model_classes
    index = {c: i for i, c in enumerate(classes)}
    results: list[dict[str, Any]] = []
    for fact, judged, logits in _fold_runs(config, data, k, run_dir, stop):
        probs = probabilities(logits, config.head)
        labels = np.array([index[r.label] for r in judged.records])
        metrics = compute_metrics(labels, probs.argmax(1), probs, classes)
        results.append({**fact, **metrics.as_dict()})
        log.info("fold %d/%d: accuracy %.4f", fact["fold"], k, metrics.accuracy)

    def summary(values: list[float | None]) -> dict[str, float | None]:
        clean = [v for v in values if v is not None]
        return {"mean": round(float(np.mean(clean)), 4), "std": round(float(np.std(clean, ddof=1)), 4)} if len(clean) > 1 else {"mean": None, "std": None}

    report = {
        "folds": k,
        "accuracy": summary([r["accuracy"] for r in results]),
        "auroc_macro": summary([r["auroc_macro"] for r in results]),
        "recall": {c: summary([r["per_class"][c]["recall"] for r in results]) for c in classes},
        "per_fold": results,
    }
    write_json(Path(run_dir) / "crossval.json", report)
    return report
