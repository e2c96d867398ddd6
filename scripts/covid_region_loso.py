"""Leave-one-source-out test of a second condition for calling COVID-19, on the pooled features
(docs/experiments/2026-12-05-covid-region-loso.md and 2026-12-06-opacity-gate-loso.md; each rule
was written before this ran).

    python scripts/covid_region_loso.py var/features/densenet.npz --model densenet121-covid3@1.3.1 [--json OUT]
    python scripts/covid_region_loso.py ... --candidates opacity

A film is called COVID-19 only if its probability reaches the threshold *and* (``region``) its
features lie within radius r of the training COVID-19 films (Mahalanobis to the class mean, or
mean cosine distance to the 10 nearest), or (``opacity``) it scores high enough on a pneumonia
direction fitted within single sources only. JSRT and every test split are never fitted,
calibrated or chosen on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from last_layer_loso import FOLDS, PRIMARY, Data, calibrate, targets_for  # noqa: E402

from cxr_core.models.feature_gate import fit_feature_gate  # noqa: E402
from cxr_core.models.loading import resolve_model  # noqa: E402
from cxr_core.models.manifest import read_manifest  # noqa: E402
from cxr_core.training.head import LinearHead  # noqa: E402
from cxr_core.training.trainer import probabilities  # noqa: E402

SENSITIVITY = 0.95
CANDIDATE_SETS = {
    "region": ("T", "K-m(0.98)", "K-m(0.99)", "K-nn(0.98)", "K-nn(0.99)"),
    "opacity": ("T", "G(0.02)", "G(0.05)"),
}
# Pneumonia vs normal inside one source each: the collection cannot separate these labels.
WITHIN_SOURCE = {"c19rdb/normal": 0, "nih_pneumonia/pneumonia": 1,
                 "kermany/normal": 0, "kermany/bacterial_pneumonia": 1, "kermany/viral_pneumonia": 1}


def covid_distance(kind: str, features: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray):
    """A function (N, C) features -> (N,) distance to the training COVID-19 films, fitted on ``train`` rows."""
    covid = labels[train] == "covid"
    if kind == "m":
        gate = fit_feature_gate(features[train], labels[train], features[val])
        index = int(np.searchsorted(np.unique(labels[train]), "covid"))

        def mahalanobis(x: np.ndarray) -> np.ndarray:
            z = (x - gate.center) @ gate.components - gate.class_means[index]
            return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", z, gate.precision, z), 0.0))
        return mahalanobis
    bank = features[train][covid]
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)

    def knn(x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x))
        for i in range(0, len(x), 512):
            q = x[i:i + 512] / np.linalg.norm(x[i:i + 512], axis=1, keepdims=True)
            sim = q @ bank.T
            out[i:i + 512] = 1.0 - np.sort(sim, axis=1)[:, -10:].mean(axis=1)
        return out
    return knn


def opacity_score(features: np.ndarray, groups: np.ndarray, train: np.ndarray):
    """A function (N, C) features -> (N,) pneumonia score, a logistic regression fitted on the ``train``
    rows of the within-source contrasts only (no COVID-19 film), each source weighted equally and
    each label balanced within its source."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = train & np.isin(groups, list(WITHIN_SOURCE))
    g = groups[rows]
    y = np.array([WITHIN_SOURCE[k] for k in g])
    source = np.array([k.split("/")[0] for k in g])
    weights = np.zeros(len(g))
    for s in np.unique(source):
        for label in (0, 1):
            cell = (source == s) & (y == label)
            if cell.any():
                weights[cell] = 1.0 / cell.sum()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    model.fit(features[rows], y, logisticregression__sample_weight=weights / weights.mean())
    return model.decision_function


def region_threshold(p: np.ndarray, inside: np.ndarray) -> float:
    """Highest threshold with mean(p >= t and inside) >= SENSITIVITY over the validation COVID-19 films."""
    need = math.ceil(SENSITIVITY * len(p))
    eligible = np.sort(p[inside])[::-1]
    if len(eligible) < need:
        return math.inf
    return float(eligible[need - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--candidates", choices=sorted(CANDIDATE_SETS), default="region")
    args = parser.parse_args()
    candidates = CANDIDATE_SETS[args.candidates]
    logging.basicConfig(level=logging.WARNING)

    folder = resolve_model(args.model).path
    manifest = read_manifest(folder)
    classes, kind = list(manifest.classes), manifest.head
    state = load_file(str(folder / "model.safetensors"))
    head = LinearHead(state["head.fc.weight"].astype(np.float64), state["head.fc.bias"].astype(np.float64))
    z = np.load(args.features)
    data = Data(z["features"].astype(np.float64), np.char.add(np.char.add(z["source"], "/"), z["label"]), z["label"], z["split"], z["folder"])
    internal = data.folder != "jsrt"

    results: dict[str, dict[str, dict]] = {c: {} for c in candidates}
    for fold, held in FOLDS.items():
        out = np.isin(data.group, list(held))
        train = internal & ~out & (data.split == "train")
        val = internal & ~out & (data.split == "val")
        rows = internal & out
        scored = calibrate(head, data, val, manifest, SENSITIVITY)
        p_all = probabilities(head.logits(data.features), kind, scored.temperature)
        p_val, p_rows = p_all[val], p_all[rows]
        is_covid_val = data.label[val] == "covid"
        targets = targets_for(data.label[val], classes, kind)
        known = np.ones(len(targets), bool) if kind == "sigmoid" else targets >= 0
        truth = np.where(targets == 1, 0, 1) if kind == "sigmoid" else targets
        if args.candidates == "region":
            distances = {k: covid_distance(k, data.features, data.label, train, val) for k in ("m", "nn")}
        else:
            opacity = opacity_score(data.features, data.group, train)
            o_val, o_rows = opacity(data.features[val]), opacity(data.features[rows])
        for name in candidates:
            if name == "T":
                threshold, inside_val, inside_rows = scored.threshold, np.ones(val.sum(), bool), np.ones(rows.sum(), bool)
                radius = math.inf
            elif name.startswith("G"):
                q = float(name[2:-1])
                radius = float(np.quantile(o_val[is_covid_val], q))  # here the lowest opacity still called
                inside_val, inside_rows = o_val >= radius, o_rows >= radius
                threshold = region_threshold(p_val[is_covid_val, 0], inside_val[is_covid_val])
            else:
                d = distances[name[2:name.index("(")]]
                q = float(name[name.index("(") + 1:-1])
                d_val, d_rows = d(data.features[val]), d(data.features[rows])
                radius = float(np.quantile(d_val[is_covid_val], q))
                inside_val, inside_rows = d_val <= radius, d_rows <= radius
                threshold = region_threshold(p_val[is_covid_val, 0], inside_val[is_covid_val])
            called_val = (p_val[:, 0] >= threshold) & inside_val
            # The app's decision: COVID-19 if called, else the most probable other class.
            other = 1 + np.argmax(p_val[:, 1:], axis=1) if kind == "softmax" else np.ones(len(p_val), int)
            decided = np.where(called_val, 0, other)
            accuracy = float(np.mean(decided[known] == truth[known]))
            n = int(np.sum((p_rows[:, 0] >= threshold) & inside_rows))
            results[name][fold] = {"called_covid": n, "n": int(rows.sum()), "val_accuracy": round(accuracy, 4),
                                   "val_sensitivity": round(float(called_val[is_covid_val].mean()), 4),
                                   "threshold": round(threshold, 4), "radius": radius,
                                   "outside_region": int((~inside_rows).sum())}
            print(f"{fold:>14} {name:>10}: {n:4d} of {int(rows.sum()):4d} called COVID-19 ({int((~inside_rows).sum())} outside); "
                  f"val acc {accuracy:.4f}, val sens {called_val[is_covid_val].mean():.3f}, threshold {threshold:.3f}", flush=True)

    def primary(name: str) -> int:
        return sum(results[name][f]["called_covid"] for f in PRIMARY)

    base = results["T"]
    verdicts = {}
    for name in candidates[1:]:
        r = results[name]
        conditions = {
            "1: primary at most 0.8 x T's": primary(name) <= 0.8 * primary("T"),
            "2: folds 3-4 no more than T + 10%": all(r[f]["called_covid"] <= base[f]["called_covid"] * 1.1 for f in ("c19rdb_normal", "kermany")),
            "3: fold-val accuracy within 0.02 of T": all(r[f]["val_accuracy"] >= base[f]["val_accuracy"] - 0.02 for f in FOLDS),
        }
        verdicts[name] = {"primary": primary(name), "conditions": conditions, "passes": all(conditions.values())}
    print(f"\nprimary ({sum(base[f]['n'] for f in PRIMARY)} films): T {primary('T')}")
    for name, v in verdicts.items():
        print(f"  {name}: {v['primary']}  " + "; ".join(f"{k.split(':')[0]} {'ok' if ok else 'FAILS'}" for k, ok in v["conditions"].items()))
    passing = [n for n, v in verdicts.items() if v["passes"]]
    chosen = min(passing, key=lambda n: verdicts[n]["primary"]) if passing else None
    print(f"chosen by the rule: {chosen or 'none (nothing changes)'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(z["model"]), "results": results, "verdicts": verdicts, "chosen": chosen},
                                        indent=2, default=bool) + "\n")


if __name__ == "__main__":
    main()
