"""After training: write the model folder, calibrate, evaluate, and describe the model.

Everything is measured on the weights as shipped (fp16 safetensors, reloaded and
verified), not on the in-memory training copy.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cxr_core.inference import abstention_rule, make_prediction
from cxr_core.metrics import EXTERNAL_MEASUREMENT, Metrics, compute_metrics, reliability_bins
from cxr_core.models.loading import load_model, save_model_folder, select_device, update_manifest
from cxr_core.models.manifest import CLAHE_CLIP, Manifest, read_manifest
from cxr_core.training import figures
from cxr_core.training.calibration import choose_threshold, fit_temperature
from cxr_core.training.config import TrainConfig
from cxr_core.training.crossval import OutOfFold
from cxr_core.training.prepare import PreparedData
from cxr_core.training.run import RunDir, write_json
from cxr_core.training.trainer import (
    TrainResult,
    final_spec,
    load_exported,
    manifest_for,
    model_data,
    predict_arrays,
    probabilities,
)

log = logging.getLogger(__name__)

KNOWN_SOURCES = {
    "c19rdb": (
        "COVID-19 Radiography Database, v4 (COVID and adult Normal classes). Cite M.E.H. Chowdhury et al., "
        "IEEE Access 8 (2020) 132665-132676, and T. Rahman et al., Computers in Biology and Medicine 132 (2021) 104319."
    ),
    "kermany": (
        "D. Kermany et al., Cell 172 (2018) 1122-1131 (paediatric Normal, viral and bacterial pneumonia); CC BY 4.0."
    ),
}


def _labels(records: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[r.label] for r in records], dtype=np.int64)


def evaluate_arrays(model_manifest: Manifest, logits: np.ndarray, labels: np.ndarray, sources: Sequence[str | None] | None) -> tuple[Metrics, np.ndarray]:
    probs = probabilities(logits, model_manifest.head, model_manifest.temperature)
    # The app's own rule, thresholds and "uncertain" included: one decision per film.
    results = [make_prediction(model_manifest, row) for row in probs]
    predicted = np.array([model_manifest.classes.index(r.decision) for r in results], dtype=np.int64)
    answered = [not r.uncertain for r in results]
    return compute_metrics(labels, predicted, probs, model_manifest.classes, sources, answered=answered), probs


def finalize(
    config: TrainConfig,
    run_dir: Path | str,
    data: PreparedData,
    result: TrainResult,
    command: str = "",
    crossval: dict[str, Any] | None = None,
    seal_test: bool = False,
    out_of_fold: OutOfFold | None = None,
) -> Manifest:
    """Write ``config.out`` from the run's best epoch, with temperature, threshold, metrics and model card.

    ``seal_test`` leaves the test split unread: no test metrics, figures, card section or
    input-gate rates, so that a candidate can be judged on validation by a rule written
    beforehand and its test figures read afterwards (``scripts/refresh_model_card.py --abstention DATA --split test``
    or ``python -m cxr_core evaluate``). The test split still takes part in the
    duplicate checks, so the training set is the same either way.

    ``out_of_fold`` (cross-fitted scores of train+val, :func:`cxr_core.training.crossval.out_of_fold_logits`)
    fits the temperature and threshold instead of the validation split's scores: several times as
    many films where the validation split is small. The weights are the run's either way.
    """
    run = RunDir(run_dir)
    spec = final_spec(config)
    network = load_exported(config, run.root)
    # The training report keeps every film; calibration, metrics and the gate see the model's classes.
    report = data.report
    data = model_data(config, data)
    out = Path(config.out)
    save_model_folder(network, manifest_for(config, spec), out)
    model = load_model(out, device=select_device(config.device))
    manifest = model.manifest
    classes = manifest.classes

    val_pixels = data.val.resized(config.final_size)
    val_logits = predict_arrays(model.network, val_pixels, spec, model.device)
    y_val = _labels(data.val.records, classes)
    raw_val = compute_metrics(y_val, probabilities(val_logits, manifest.head).argmax(1), probabilities(val_logits, manifest.head), classes)
    cal_logits, y_cal = (val_logits, y_val) if out_of_fold is None else (out_of_fold.logits, out_of_fold.labels)
    temperature = fit_temperature(cal_logits, y_cal, manifest.head)
    thresholds: dict[str, float] = {}
    positive = "covid" if "covid" in classes else None
    if config.target_sensitivity and positive:
        p_cal = probabilities(cal_logits, manifest.head, temperature)
        i = classes.index(positive)
        thresholds[positive] = round(choose_threshold(p_cal[:, i], y_cal == i, config.target_sensitivity), 4)
    manifest = replace(manifest, temperature=round(temperature, 4), thresholds=thresholds)
    val_metrics, _ = evaluate_arrays(manifest, val_logits, y_val, [r.source for r in data.val.records])

    test_metrics: Metrics | None = None
    test_probs = y_test = None
    test_set = data.test if data.test is not None and len(data.test.records) else None
    sealed_films = len(test_set.records) if test_set is not None and seal_test else 0
    if sealed_films:
        log.info("test split sealed: its %d films were not evaluated", sealed_films)
    elif test_set is not None:
        test_logits = predict_arrays(model.network, test_set.resized(config.final_size), spec, model.device)
        y_test = _labels(test_set.records, classes)
        test_metrics, test_probs = evaluate_arrays(manifest, test_logits, y_test, [r.source for r in test_set.records])

    sources = sorted({s for split in report.sources.values() for s in split})
    metrics: dict[str, Any] = {
        "val": val_metrics.as_dict(),
        "val_uncalibrated_ece": round(raw_val.ece, 4),
    }
    if crossval is not None:
        metrics["cross_validation"] = {k: v for k, v in crossval.items() if k != "per_fold"}
    if sealed_films:
        metrics["test_sealed"] = {"n": sealed_films}
    if test_metrics is not None:
        metrics["test"] = test_metrics.as_dict()
        metrics["test_reliability"] = reliability_bins(test_probs, y_test)  # type: ignore[arg-type]
    training_data = {
        "root": report.root,
        "counts": {s: dict(c) for s, c in report.counts.items()},
        "sources": {s: dict(c) for s, c in report.sources.items()},
        "citations": {s: KNOWN_SOURCES[s] for s in sources if s in KNOWN_SOURCES},
        "excluded_labels": dict(report.excluded_labels),
        "patient_leaks_removed": dict(report.patient_leaks_removed),
        "duplicates_removed": {"exact": len(report.exact_duplicates_removed), "near": len(report.near_duplicates_removed)},
        "unreadable": len(report.unreadable),
    }
    training = {
        "command": command,
        "config": config.as_dict(),
        "best_epoch": result.best_epoch,
        "averaged": result.averaged,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 1),
        "device": str(model.device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "history": list(result.history),
        "calibrated_on": _calibrated_on(out_of_fold, len(y_val), classes),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = update_manifest(out, replace(manifest, metrics=metrics, training_data=training_data, training=training))
    write_json(run.report, {"metrics": metrics, "training_data": training_data})

    figs = figures.training_figures(result.history)
    if test_metrics is not None:
        figs.update(figures.evaluation_figures(test_metrics, test_probs, y_test, classes, "test"))  # type: ignore[arg-type]
    figures.save(figs, [run.figures, out / "figures"])
    from cxr_core.training.fit_gate import fit_gate

    manifest = fit_gate(out, data, read_test=not seal_test)
    (out / "README.md").write_text(model_card(manifest, report.notes), encoding="utf-8")
    log.info("wrote %s", out)
    return manifest


def _calibrated_on(out_of_fold: OutOfFold | None, n_val: int, classes: Sequence[str]) -> str:
    """Which films the temperature and threshold were fitted on, in words for the model card."""
    if out_of_fold is None:
        return f"the validation split's {n_val} films"
    positives = int((out_of_fold.labels == 0).sum())
    return (f"out-of-fold scores of {len(out_of_fold.labels)} training and validation films ({positives} {classes[0]}), "
            f"{len(out_of_fold.folds)} folds by patient")


def _table(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    rows = ["| class | n | precision | recall (sensitivity) | specificity | F1 |", "|---|---|---|---|---|---|"]
    for c in classes:
        m = metrics["per_class"][c]
        rows.append(f"| {c} | {m['n']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['specificity']:.3f} | {m['f1']:.3f} |")
    cm = metrics["confusion_matrix"]
    rows += ["", "Confusion matrix (rows: true, columns: predicted, order " + ", ".join(classes) + "):", "", "```"]
    rows += ["  ".join(f"{v:5d}" for v in row) for row in cm]
    rows.append("```")
    return "\n".join(rows)


def model_card(
    manifest: Manifest,
    notes: Sequence[str] = (),
    gate_measurement: Mapping[str, Any] | None = None,
    reviewer_note: str = "",
    shortcut_probe: Mapping[str, Any] | None = None,
    external: Mapping[str, Any] | None = None,
) -> str:
    """A model card (Mitchell et al. 2019 in spirit) from the manifest's own facts; with the
    reports of ``scripts/measure_gate.py``, ``scripts/probe_shortcuts.py`` and
    ``scripts/measure_external.py`` and a hand-written reviewer's note when given."""
    m = manifest
    # Older manifests do not say which films; their cards keep the words they were written with.
    calibrated_on = m.training.get("calibrated_on")
    calibration = "validation NLL" if calibrated_on is None else f"the NLL of {calibrated_on}"
    chosen_on = calibrated_on or "validation"
    lines = [f"# {m.name} ({m.key})", "", f"**Intended use.** {m.intended_use}", ""]
    lines += [
        "## Model",
        f"- Architecture: {m.architecture}, {m.head} head over classes {', '.join(m.classes)} (output order).",
        f"- Input: {m.input.size[0]}x{m.input.size[1]} px greyscale repeated to {m.input.channels} channels, "
        f"ImageNet mean/std, aspect ratio not kept (as in training).",
        *_view_lines(m),
        f"- Calibration: temperature {m.temperature:g} fitted on {calibration}.",
        f"- Decision: {'; '.join(f'{c} is called when p >= {t:g} (chosen on {chosen_on} for sensitivity)' for c, t in m.thresholds.items()) or 'most probable class'}.",
        f"- Weights: `model.safetensors` (fp16), sha256 `{m.weights_sha256}`.",
    ]
    if m.ood:
        rates = m.ood.get("test_rates", {})
        lines.append(
            f"- Input gate: {m.ood.get('method')}; warning above {m.ood.get('warn')}, rejection above {m.ood.get('reject')}"
            + (f"; on the test split {rates['warned_or_rejected']:.1%} of films warned or rejected, {rates['rejected']:.1%} rejected (n = {rates['n']})." if rates else ".")
        )
    if gate_measurement:
        chest, other, bare = gate_measurement["chest"], gate_measurement["non_chest"], gate_measurement["non_chest_without_dicom_headers"]
        lines.append(
            "- The whole input check as the app runs it (DICOM metadata, image appearance, this feature-space gate, quality), measured by "
            f"`scripts/measure_gate.py` (`gate_measurement.json` here): shared test split, all four labels, n = {chest['n']}: "
            f"{chest['wrongly_rejected_rate']:.2%} rejected, {chest['warned_rate']:.1%} warned; {other['n']} non-chest images (pydicom's CT, MR, US, NM, "
            f"extremity CR and others, scikit-image samples, synthetic documents and photos): {other['rejected_or_warned_rate']:.0%} rejected or warned "
            f"({other['rejected_rate']:.1%} rejected), and {bare['rejected_or_warned_rate']:.0%} ({bare['rejected_rate']:.1%} rejected) with their DICOM headers removed."
        )
    lines += [
        "",
        "## Training data",
    ]
    td = m.training_data
    for split, counts in td.get("counts", {}).items():
        lines.append(f"- {split}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + (f" (sources: {td.get('sources', {}).get(split)})" if td.get("sources") else ""))
    if td.get("calibration"):
        cal = td["calibration"]
        lines.append(f"- Temperature and threshold fitted on validation films of {cal.get('root')}: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(cal.get("val", {}).items())) + f" (sources: {cal.get('val_sources')})")
    for source, citation in td.get("citations", {}).items():
        lines.append(f"- `{source}`: {citation}")
    for note in notes:
        lines.append(f"- Data check: {note}")
    tr = m.training
    heading = "## Recipe"
    if "base" in tr:  # a head refitted on another model's features (cxr_core.training.head): its recipe, then the base's
        lines += ["", heading, f"- {tr.get('recipe') or 'n/a'}", f"- Command: `{tr.get('command') or 'n/a'}`"]
        heading, tr = f"### The recipe of {tr['base']}, whose network is kept", tr["base_training"]
    cfg = tr.get("config", {})
    lines += [
        "",
        heading,
        f"- Initialisation: {cfg.get('init')}; schedule (size, epochs): {cfg.get('schedule')}; batch {cfg.get('batch_size')}; "
        f"AdamW lr {cfg.get('lr')} one-cycle, weight decay {cfg.get('weight_decay')}; balance: {cfg.get('balance')}; "
        f"label smoothing {cfg.get('label_smoothing')}; augmentation {cfg.get('augment')}.",
    ]
    if cfg.get("aux_classes"):
        lines.append(
            f"- Auxiliary classes trained as extra outputs and dropped at export (the softmax renormalises over the model's classes): "
            f"{', '.join(cfg['aux_classes'])}. Their films are not in the validation or test metrics."
        )
    lines += [
        _selection_line(tr, cfg) + f"{_training_hours(tr):.1f} h of training on {tr.get('device')} ({tr.get('platform')}).",
        f"- Command: `{tr.get('command') or 'n/a'}`",
        "",
        "## Evaluation",
    ]
    if "test_sealed" in m.metrics:
        lines += [
            f"The test split ({m.metrics['test_sealed']['n']} films) was sealed at training and has not been evaluated here.",
            "",
        ]
    for split in ("test", "val"):
        if split in m.metrics:
            metrics = m.metrics[split]
            lines += [
                f"### {split} split",
                f"Accuracy {metrics['accuracy']:.4f}, macro AUROC {metrics['auroc_macro']}, ECE {metrics['ece']:.4f} (n = {metrics['n']}).",
                *_abstention_line(metrics.get("abstention"), m),
                "",
                _table(metrics, m.classes),
                "",
            ]
            for source, sm in metrics.get("by_source", {}).items():
                recalls = ", ".join(f"{c} recall {v['recall']:.3f} (n {v['n']})" for c, v in sm["per_class"].items() if v["n"])
                lines.append(f"- source `{source}`: accuracy {sm['accuracy']:.4f} (n = {sm['n']}); {recalls}")
            lines.append("")
    lines += _external_lines(external)
    lines += [
        "## Known limits",
        "- Every COVID-19 film is an adult (COVID-19 Radiography Database) and every viral/bacterial pneumonia film a child (Kermany): "
        "the model can separate classes by age, hospital or JPEG history rather than by disease. Adult normals and paediatric normals "
        "are both in the normal class to weaken that shortcut, and results are reported per source, but high accuracy on this test "
        "split does not show the model works on films from another hospital.",
        "- Trained on 224 px or smaller JPEG-derived images; full-resolution DICOM are resized the same way, but their look (processing, "
        "windowing) may differ from the training films. A hospital's own processing can change the answer: strong local-contrast "
        "processing, as many digital systems apply, can turn non-COVID films into COVID-19 calls (measured with "
        "`scripts/stress_gate.py`; figures in the reviewer's note).",
        "- Not trained on lateral views, CT, children with COVID-19, adults with non-COVID viral pneumonia, or devices/lines in "
        "unusual numbers." + (" The input gate flags films far from the training data, but a film close to it can still be wrong." if m.ood else " It cannot say a film is outside what it knows."),
    ]
    if "viral_pneumonia" in m.classes:
        lines.append("- The viral-pneumonia class was learned from children's films only: an adult with a viral pneumonia other "
                     "than COVID-19 is likely to be called COVID-19.")
    lines += _shift_notes(m.metrics)
    lines += _probe_lines(shortcut_probe)
    lines += ["- Decision support only: not a diagnosis.", ""]
    if reviewer_note.strip():
        lines += [REVIEWER_HEADING, reviewer_note.strip(), ""]
    return "\n".join(lines)


REVIEWER_HEADING = "## Reviewer's note (added by hand after training)"


def _view_lines(m: Manifest) -> list[str]:
    lines = []
    if m.input.crop == "lungs":
        lines.append(f"- What it sees: the box around both lung fields found by {m.input.crop_segmenter}, widened by "
                     f"{m.input.crop_margin:.0%} of its size on each side; borders, labels and collimation outside it are not seen. "
                     "Heatmaps cover that box only.")
    if m.input.intensity == "standardise":
        lines.append("- Intensity: every film standardised to one mean and spread before the network (a site's overall brightness "
                     "and contrast are removed).")
    if m.input.intensity == "clahe":
        lines.append(f"- Intensity: every film given the same local-contrast processing (CLAHE, clip {CLAHE_CLIP:g}, 8x8 tiles, at "
                     "the input size) before the network, in training and at every prediction, so that a site's own processing "
                     "is not read as a sign of disease.")
    return lines


def _external_lines(external: Mapping[str, Any] | None) -> list[str]:
    """The per-source table of films called COVID-19 (scripts/measure_external.py)."""
    if not external:
        return []
    lines = ["## Films called COVID-19, by source", "",
             "Measured with `scripts/measure_external.py` through the app's own prediction path (`external_measurement.json`). "
             "JSRT is a hospital no model here trained, calibrated or was chosen on.", "",
             "| source / label | films | called COVID-19 |", "|---|---|---|"]
    for group, row in external.get("groups", {}).items():
        rate = row.get("called_covid_rate")
        lines.append(f"| {group} | {row['n']} | {row['called_covid']} ({rate:.1%}) |" if rate is not None else f"| {group} | {row['n']} | n/a |")
    for note in external.get("notes", []):
        lines.append(f"- {note}")
    return lines + [""]


def refresh_model_card(folder: Path) -> str:
    """Rewrite ``folder/README.md`` from the manifest as it is now, keeping the card's data
    checks and reviewer's note, and adding ``gate_measurement.json`` and this version's
    ``shortcut_probe.json`` when present."""
    card_path = folder / "README.md"
    old = card_path.read_text(encoding="utf-8") if card_path.exists() else ""
    notes = [line[len("- Data check: "):] for line in old.splitlines() if line.startswith("- Data check: ")]
    reviewer = old.split(REVIEWER_HEADING, 1)[1] if REVIEWER_HEADING in old else ""
    gate_path = folder / "gate_measurement.json"
    gate = json.loads(gate_path.read_text(encoding="utf-8")) if gate_path.exists() else None
    probe = None
    # sharpness_probe.json: the name the probe's report had before it also tried framing
    for name in ("shortcut_probe.json", "sharpness_probe.json"):
        if (folder / name).exists():
            probe = json.loads((folder / name).read_text(encoding="utf-8"))
            break
    manifest = read_manifest(folder)
    if probe and probe.get("model") != manifest.key:
        probe = None  # measured on another version: stale
    external_path = folder / EXTERNAL_MEASUREMENT
    external = json.loads(external_path.read_text(encoding="utf-8")) if external_path.exists() else None
    if external and external.get("model") != manifest.key:
        external = None
    card = model_card(manifest, notes, gate, reviewer, probe, external)
    card_path.write_text(card, encoding="utf-8")
    return card


def _abstention_line(abstention: Mapping[str, Any] | None, manifest: Manifest) -> list[str]:
    if not abstention:
        return []
    floor, margin = abstention_rule(manifest)
    rule = (f"top probability below {floor:g}"
            + (f" or top two within {margin:g}" if len(manifest.classes) > 2 else "")
            + (", unless a class is called at its threshold" if manifest.thresholds else ""))

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    return ["", f"Abstention ({rule}): the app names a class for {pct(abstention['answered'])} of these films and says "
                f"\"uncertain\" for {abstention['n_abstained']}; accuracy on the answered films {pct(abstention['accuracy_answered'])}, "
                f"on the abstained ones {pct(abstention['accuracy_abstained'])} (their withheld decision)."]


def _probe_lines(probe: Mapping[str, Any] | None) -> list[str]:
    """Limit lines from ``scripts/probe_shortcuts.py``: how many decisions blur, sharpening and tighter framing
    (zoom; crops in reports since they were added) flip."""
    if not probe:
        return []
    parts = []
    for group, g in sorted(probe["groups"].items()):
        parts.append(f"{group} {g['flipped_by_blur']}/{g['n']} by blur, {g['flipped_by_sharpening']}/{g['n']} by sharpening"
                     + (f", {g['flipped_by_zoom']}/{g['n']} by zoom" if "flipped_by_zoom" in g else "")
                     + (f", {g['flipped_by_crop_top_bottom']}/{g['n']} by cropping top and bottom, {g['flipped_by_crop_top']}/{g['n']} "
                        f"the top, {g['flipped_by_crop_bottom']}/{g['n']} the bottom" if "flipped_by_crop_top_bottom" in g else "")
                     + (f", {g['flipped_by_frame']}/{g['n']} by a black frame, {g['flipped_by_clahe']}/{g['n']} by CLAHE"
                        if "flipped_by_frame" in g else ""))
    zoom, crop = probe.get("zoom"), probe.get("crop")
    return [
        f"- Shortcut probe (`scripts/probe_shortcuts.py`, {probe['split']} split): decisions changed when the "
        f"films were blurred (Gaussian, {probe['blur_sigma_px_at_224']} px at 224 px)"
        + (f", sharpened (unsharp mask) or zoomed in (the central 1/{zoom:g} of each side, as a tighter collimation shows)"
           if zoom else " or sharpened (unsharp mask)")
        + (f"; or cropped ({crop['top_and_bottom']:.0%} of the rows off top and bottom, or {crop['one_edge']:.0%} off one edge, "
           "resized back: neck or abdomen left out)" if crop else "")
        + (f"; or given a black frame ({probe['frame']:.0%} of the side on each edge) or CLAHE local-contrast processing"
           if probe.get("frame") else "")
        + ": " + "; ".join(parts) + ". "
        "A film from a softer or crisper detector, or framed differently from the training films, can change the answer by this much."
    ]


def _selection_line(training: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    averaged = training.get("averaged")
    if not averaged:
        return f"- Best epoch {int(training.get('best_epoch', -1)) + 1} of {training.get('epochs_run')} (selected on validation {config.get('select_on')}); "
    final = (config.get("schedule") or [[0, 0]])[-1][1]
    return (f"- Weights: the average of {averaged['snapshots']} snapshots, one every {averaged['every_steps']} steps of the last "
            f"{final} epochs (of {training.get('epochs_run')}), batch-norm statistics recomputed on {averaged['batchnorm_images']} "
            f"training images; validation loss {averaged['val_loss']}, accuracy {averaged['val_accuracy']} before calibration; ")


def _training_hours(training: Mapping[str, Any]) -> float:
    # The history's per-epoch seconds survive resumes; ``seconds`` is only the last process's share.
    epochs = sum(float(h.get("seconds", 0.0)) for h in training.get("history", []))
    return max(epochs, float(training.get("seconds", 0.0))) / 3600


def _shift_notes(metrics: Mapping[str, Any], gap: float = 0.05) -> list[str]:
    """A limit line for each source whose test accuracy falls well below its validation accuracy.

    Validation is drawn from the same collection as training, so a gap this size means the
    test films of that source differ (another collection or period) and validation overstates
    how the model does on new films of that kind.
    """
    test, val = metrics.get("test", {}).get("by_source", {}), metrics.get("val", {}).get("by_source", {})
    notes = []
    for source, tm in test.items():
        vm = val.get(source)
        if vm and vm["accuracy"] - tm["accuracy"] >= gap:
            worst = min((c for c, v in tm["per_class"].items() if v["n"]), key=lambda c: tm["per_class"][c]["recall"])
            notes.append(
                f"- On source `{source}` the test accuracy ({tm['accuracy']:.3f}) is well below validation ({vm['accuracy']:.3f}); "
                f"the weakest class there is {worst} (recall {tm['per_class'][worst]['recall']:.3f} on test, "
                f"{vm['per_class'][worst]['recall']:.3f} on validation). The test films of that source come from a different "
                "collection than its training films, so expect results like the test figures, not the validation ones, on new films."
            )
    return notes
