"""Leave-one-source-out comparison of refitted last layers on extracted features
(docs/experiments/2026-12-05-last-layer-loso.md; the rule there was written before this ran).

    python scripts/last_layer_loso.py var/features/densenet.npz --model densenet121-covid3 [--json OUT]

Reads the .npz of scripts/extract_features.py. JSRT films (folder ``jsrt``) and every ``test``
split are never fitted, calibrated or selected on here; the final head's test figures are
printed only with ``--final``, after the choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.inference import decide  # noqa: E402
from cxr_core.models.loading import (
    resolve_model,  # noqa: E402
    update_manifest,  # noqa: E402
)
from cxr_core.models.manifest import Manifest, read_manifest  # noqa: E402
from cxr_core.training.calibration import choose_threshold, fit_temperature  # noqa: E402
from cxr_core.training.finalize import evaluate_arrays, refresh_model_card  # noqa: E402
from cxr_core.training.head import (  # noqa: E402
    NOT_POSITIVE,
    LinearHead,
    direction_projection,
    fit_linear_head,
    group_weights,
    write_refitted_folder,
)
from cxr_core.training.trainer import probabilities  # noqa: E402

TARGET_SENSITIVITY = 0.97
FOLDS = {
    "openist": {"openist/normal"},
    "nih_pneumonia": {"nih_pneumonia/pneumonia"},
    "c19rdb_normal": {"c19rdb/normal"},
    "kermany": {"kermany/normal", "kermany/viral_pneumonia", "kermany/bacterial_pneumonia"},
}
PRIMARY = ("openist", "nih_pneumonia")
NORMAL_SOURCES = ("c19rdb/normal", "kermany/normal", "openist/normal")


@dataclass(frozen=True)
class Data:
    features: np.ndarray
    group: np.ndarray
    label: np.ndarray
    split: np.ndarray
    folder: np.ndarray


@dataclass(frozen=True)
class Scored:
    head: LinearHead
    temperature: float
    threshold: float
    val_accuracy: float


def targets_for(labels: np.ndarray, classes: list[str], head: str) -> np.ndarray:
    if head == "sigmoid":
        return (labels == classes[0]).astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(lab, NOT_POSITIVE) for lab in labels], dtype=np.int64)


def target_for(name: str) -> float:
    """T (the addendum) is S with its threshold chosen for sensitivity 0.95; every other candidate 0.97."""
    return 0.95 if name == "T" else TARGET_SENSITIVITY


def calibrate(head: LinearHead, data: Data, val: np.ndarray, manifest: Manifest, target: float = TARGET_SENSITIVITY) -> Scored:
    """Temperature on the validation films of the model's classes, then the threshold for ``target`` sensitivity;
    the accuracy is of the app's own decision rule (cxr_core.inference.decide) with both."""
    classes, kind = list(manifest.classes), manifest.head
    targets = targets_for(data.label[val], classes, kind)
    logits = head.logits(data.features[val])
    if kind == "sigmoid":
        labels = np.where(targets == 1, 0, 1)  # class index: 0 = covid, 1 = other
        known = np.ones(len(labels), dtype=bool)
    else:
        known = targets >= 0
        labels = targets
    temperature = fit_temperature(logits[known], labels[known], kind)
    probs = probabilities(logits, kind, temperature)
    is_covid = data.label[val] == classes[0]
    threshold = choose_threshold(probs[:, 0], is_covid, target)
    rule = replace(manifest, temperature=temperature, thresholds={classes[0]: threshold})
    decided = np.array([classes.index(decide(row, rule)) for row in probs[known]])
    accuracy = float(np.mean(decided == labels[known]))
    return Scored(head, temperature, threshold, accuracy)


def called_covid(scored: Scored, data: Data, rows: np.ndarray, kind: str) -> int:
    probs = probabilities(scored.head.logits(data.features[rows]), kind, scored.temperature)
    return int(np.sum(probs[:, 0] >= scored.threshold))


def fit_candidate(name: str, data: Data, train: np.ndarray, start: LinearHead, classes: list[str], kind: str) -> LinearHead:
    """The candidate's head (folded to act on raw features)."""
    if name in ("S", "T"):
        return start
    targets = targets_for(data.label[train], classes, kind)
    weights = group_weights(data.label[train] == classes[0], data.group[train])
    if name.startswith("L"):
        return fit_linear_head(data.features[train], targets, weights, start, head=kind, l2=float(name[2:-1]))
    if name == "P":
        present = [g for g in NORMAL_SOURCES if np.any(data.group[train] == g)]
        means = np.stack([data.features[train][data.group[train] == g].mean(axis=0) for g in present])
        projection = direction_projection(means.astype(np.float64))
        fitted = fit_linear_head(data.features[train] @ projection, targets, weights, start, head=kind, l2=0.1)
        return LinearHead(fitted.weight @ projection, fitted.bias)  # P is symmetric: (XP)W' = X(W P)'
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--final", metavar="CANDIDATE", help="fit CANDIDATE on every source and print its test figures")
    parser.add_argument("--out", type=Path, help="with --final: write the model folder here")
    parser.add_argument("--version", default="2.0.0", help="with --out: the new folder's version")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    folder = resolve_model(args.model).path
    manifest = read_manifest(folder)
    classes, kind = list(manifest.classes), manifest.head
    state = load_file(str(folder / "model.safetensors"))
    start = LinearHead(state["head.fc.weight"].astype(np.float64), state["head.fc.bias"].astype(np.float64))

    z = np.load(args.features)
    data = Data(z["features"].astype(np.float64), np.char.add(np.char.add(z["source"], "/"), z["label"]), z["label"], z["split"], z["folder"])
    gap = np.abs(start.logits(data.features[:256]) - z["logits"][:256]).max()
    print(f"{z['model']}: {len(data.label)} films; head check |logits - features @ W' - b| <= {gap:.2e}")
    internal = data.folder != "jsrt"

    candidates = ["S", "L(0.01)", "L(0.1)", "L(1)"] + (["P"] if kind == "softmax" else []) + ["T"]
    if args.final:
        final(args, data, internal, start, manifest)
        return
    results: dict[str, dict[str, dict[str, float]]] = {c: {} for c in candidates}
    for fold, held in FOLDS.items():
        out = np.isin(data.group, list(held))
        train = internal & ~out & (data.split == "train")
        val = internal & ~out & (data.split == "val")
        scored_rows = internal & out
        for name in candidates:
            head = fit_candidate(name, data, train, start, classes, kind)
            scored = calibrate(head, data, val, manifest, target_for(name))
            n = called_covid(scored, data, scored_rows, kind)
            results[name][fold] = {"called_covid": n, "n": int(scored_rows.sum()), "val_accuracy": round(scored.val_accuracy, 4),
                                   "threshold": round(scored.threshold, 4), "temperature": round(scored.temperature, 3)}
            print(f"{fold:>14} {name:>8}: {n:4d} of {int(scored_rows.sum()):4d} called COVID-19; fold-val accuracy {scored.val_accuracy:.4f}, "
                  f"T {scored.temperature:.3f}, threshold {scored.threshold:.3f}", flush=True)

    def primary(name: str) -> int:
        return sum(results[name][f]["called_covid"] for f in PRIMARY)

    base = results["S"]
    verdicts = {}
    for name in candidates[1:]:
        r = results[name]
        conditions = {
            "1: at least 20% fewer of the 757 than S": primary(name) <= 0.8 * primary("S"),
            "2: fold-val accuracy within 0.02 of S in every fold": all(r[f]["val_accuracy"] >= base[f]["val_accuracy"] - 0.02 for f in FOLDS),
            "3: folds 3-4 no more than S + 10%": all(r[f]["called_covid"] <= base[f]["called_covid"] * 1.1 for f in ("c19rdb_normal", "kermany")),
        }
        verdicts[name] = {"primary": primary(name), "conditions": conditions, "passes": all(conditions.values())}
    print(f"\nprimary (openist + nih_pneumonia, {sum(base[f]['n'] for f in PRIMARY)} films): S {primary('S')}")
    for name, v in verdicts.items():
        print(f"  {name}: {v['primary']}  " + "; ".join(f"{k.split(':')[0]} {'ok' if ok else 'FAILS'}" for k, ok in v["conditions"].items()))
    passing = [n for n, v in verdicts.items() if v["passes"]]
    chosen = min(passing, key=lambda n: verdicts[n]["primary"]) if passing else None
    print(f"chosen by the rule: {chosen or 'none (nothing changes)'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(z["model"]), "results": results, "verdicts": verdicts, "chosen": chosen}, indent=2, default=bool) + "\n")


def final(args: argparse.Namespace, data: Data, internal: np.ndarray, start: LinearHead, manifest: Manifest) -> None:
    """Fit the chosen candidate on every source's train films, calibrate on every val film, print test figures."""
    classes, kind = list(manifest.classes), manifest.head
    train = internal & (data.split == "train")
    val = internal & (data.split == "val")
    for name in ("S", args.final):
        scored = calibrate(fit_candidate(name, data, train, start, classes, kind), data, val, manifest, target_for(name))
        print(f"{name}: T {scored.temperature:.3f}, threshold {scored.threshold:.4f}, val accuracy {scored.val_accuracy:.4f}")
        for group in sorted(set(data.group[(data.split == "test")])):
            rows = (data.split == "test") & (data.group == group)
            print(f"   test {group:>30}: {called_covid(scored, data, rows, kind):4d} of {int(rows.sum()):4d} called COVID-19")
        if name == args.final and args.out:
            write(args, data, train, val, scored, classes, kind)


def write(args: argparse.Namespace, data: Data, train: np.ndarray, val: np.ndarray, scored: Scored, classes: list[str], kind: str) -> None:
    """The chosen head as a model folder, with validation metrics through the app's decision rule and a card."""
    folder = resolve_model(args.model).path
    counts: dict[str, dict[str, int]] = {}
    sources: dict[str, dict[str, int]] = {}
    fitted = train | val | ((data.split == "test") & (data.folder != "jsrt"))
    for split, label, group in zip(data.split[fitted], data.label[fitted], data.group[fitted]):
        counts.setdefault(str(split), {}).setdefault(str(label), 0)
        counts[str(split)][str(label)] += 1
        source = str(group).split("/")[0]
        sources.setdefault(str(split), {}).setdefault(source, 0)
        sources[str(split)][source] += 1
    base = read_manifest(folder)
    roots = ", ".join(sorted({f"../shared/data/{f}" for f in data.folder[fitted]}))
    if args.final == "T":  # the network and head are the base's: its training data stands; calibration saw every source's val
        training_data = dict(base.training_data, calibration={"root": roots, "val": counts.get("val", {}), "val_sources": sources.get("val", {})})
    else:
        training_data = dict(base.training_data, root=roots, counts=counts, sources=sources)
    if args.final == "T":
        recipe = (f"{base.key}'s network and head unchanged; temperature refitted and the COVID-19 threshold re-chosen on every "
                  "source's validation films for sensitivity 0.95 instead of 0.97 (candidate T, docs/experiments/2026-12-05-last-layer-loso.md)")
    else:
        recipe = (f"last layer refitted from {base.key} ({args.final}; docs/experiments/2026-12-05-last-layer-loso.md): "
                  "the network's pooled features kept, head.fc fitted by L-BFGS on every source's train films, COVID-19 films "
                  "half the weight and each other (source, label) group an equal share of the rest, pulled toward the old head")
    training = {
        "recipe": recipe,
        "command": "python scripts/last_layer_loso.py " + " ".join(sys.argv[1:]),
        "features": str(args.features),
        "base": base.key,
        "base_training": dict(base.training),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    written = write_refitted_folder(folder, args.out, scored.head, version=args.version, temperature=scored.temperature,
                                    threshold=scored.threshold, training=training, training_data=training_data, metrics={})
    known = val & (np.isin(data.label, classes) if kind == "softmax" else np.ones(len(data.label), dtype=bool))
    labels = np.array([classes.index(lab) if lab in classes else 1 for lab in data.label[known]], dtype=np.int64)
    metrics, _ = evaluate_arrays(written, scored.head.logits(data.features[known]), labels,
                                 [str(g).split("/")[0] for g in data.group[known]])
    update_manifest(args.out, replace(written, metrics={"val": metrics.as_dict(), "test_sealed": {"n": int(((data.split == "test") & (data.folder != "jsrt")).sum())}}))
    refresh_model_card(args.out)
    print(f"wrote {args.out} ({written.key}); its test split is sealed: read it with scripts/refresh_model_card.py --abstention")


if __name__ == "__main__":
    main()
