"""Command line: ``python -m cxr_core {models,predict,explain}``.

Other tools parse this output, so it is part of the interface (see docs/cli.md):

* ``predict --json`` prints one JSON object per line and per file, in input order:
  ``{"file", "model", "probabilities", "prediction", "warnings", "error", "gate",
  "gate_reasons", "uncertain"}``. A file that cannot be read gets ``error`` set and the
  rest are still processed. ``prediction`` is null when the gate rejected the image or the
  model is uncertain; a rejected image's ``probabilities`` are empty.
* ``lungs --json`` prints one JSON object per line and per file, in input order:
  ``{"file", "mask", "lung_fraction", "error"}``; ``mask`` is the PNG written (0/255, the
  film's own size), null with ``error`` set for a file that cannot be read.
* Exit status: 0 when the command ran (even if some files failed), 2 when it was misused
  (bad arguments, unknown model), 1 when it could not run at all (no model installed,
  ``explain`` on an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from cxr_core import __version__
from cxr_core.errors import CxrError, ModelNotFoundError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command was asked for something that cannot exist (exit status 2)."""


def _iter_files(paths: Sequence[str]) -> Iterator[str]:
    """Files as given; folders walked recursively in sorted order (hidden entries skipped)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield str(Path(root) / name)
        else:
            yield raw


def _cmd_models(args: argparse.Namespace) -> int:
    from cxr_core import config
    from cxr_core.models.loading import discover_models

    root = config.weights_dir()
    folders = discover_models(root)
    if args.json:
        rows = [
            {
                "id": f.manifest.id if f.manifest else None,
                "version": f.manifest.version if f.manifest else None,
                "name": f.manifest.name if f.manifest else None,
                "architecture": f.manifest.architecture if f.manifest else None,
                "head": f.manifest.head if f.manifest else None,
                "classes": list(f.manifest.classes) if f.manifest else None,
                "path": str(f.path),
                "usable": f.ok,
                "problem": f.problem,
            }
            for f in folders
        ]
        print(json.dumps(rows))
        return EXIT_OK
    if not folders:
        print(f"No trained model is installed (looked in {root}).")
        return EXIT_OK
    for f in folders:
        if f.ok and f.manifest:
            m = f.manifest
            print(f"{m.key}\t{m.architecture}\t{m.head}\t{','.join(m.classes)}\t{f.path}")
        else:
            print(f"UNUSABLE\t{f.path}\t{f.problem}")
    return EXIT_OK


def _load(model_id: str | None):  # type: ignore[no-untyped-def]
    from cxr_core.models.loading import load_model, resolve_model

    return load_model(resolve_model(model_id).path)


def _load_any_version(model_id: str | None):  # type: ignore[no-untyped-def]
    """``ID`` (its active version), ``ID@VERSION`` (any registered version, shipped or trained), or the default."""
    from cxr_core.errors import ModelNotFoundError
    from cxr_core.models.loading import load_model
    from cxr_core.models.pointer import RegistryError
    from cxr_core.models.versions import find_version, list_versions

    if model_id and "@" in model_id:
        name, _, version = model_id.partition("@")
        try:
            return load_model(find_version(name, version).path)
        except RegistryError:
            raise ModelNotFoundError(f"Model {model_id!r} is not registered. Versions of {name}: "
                                     + (", ".join(v.version for v in list_versions(name)) or "none") + ".") from None
    return _load(model_id)


def _emit_line(text: str) -> None:
    """Write one output line in a single write and flush it.

    ``print`` writes the text and its newline separately, so two torchrun ranks sharing a
    pipe can land one rank's line between the other's text and newline (seen in CI). POSIX
    keeps a single pipe write of at most PIPE_BUF (4096) bytes whole; a prediction row is
    well under 1 KiB unless its path is very long.
    """
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_predict(args: argparse.Namespace) -> int:
    import itertools

    from cxr_core.batch import predict_paths
    from cxr_core.inference import DISCLAIMER
    from cxr_core.models.loading import load_model, resolve_model, select_device
    from cxr_core.training import distributed

    # Under torchrun each rank predicts every N-th file on its own GPU and all ranks share
    # one stdout: each line goes out in one write (see _emit_line) so lines do not interleave.
    world = distributed.world_from_env()
    model = load_model(resolve_model(args.model).path, device=distributed.rank_device(world, select_device()))
    if world.rank == 0:
        # Once, on stderr: stdout stays the documented one-line-per-file interface.
        sys.stderr.write(f"{model.manifest.name} ({model.key}). {DISCLAIMER}\n")
    files = itertools.islice(_iter_files(args.files), world.rank, None, world.size)
    for item in predict_paths(model, files, batch_size=max(1, args.batch_size), workers=args.workers):
        prediction, path, error = item.prediction, item.path, item.error
        gate = prediction.gate if prediction else None
        rejected = gate is not None and gate.rejected
        row = {
            "file": path,
            "model": model.key,
            # A rejected image's probabilities are not an answer to anything: not given.
            "probabilities": prediction.as_dict() if prediction and not rejected else {},
            "prediction": prediction.predicted if prediction else None,
            "warnings": list(item.warnings),
            "error": error,
            "gate": gate.outcome if gate else None,
            "gate_reasons": list(gate.reasons) if gate else [],
            "uncertain": bool(prediction.uncertain) if prediction else False,
        }
        if args.json:
            _emit_line(json.dumps(row))
        elif error:
            _emit_line(f"{path}\tERROR\t{error}")
        else:
            probs = " ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
            answer = row["prediction"] or ("REJECTED" if rejected else "UNCERTAIN" if row["uncertain"] else "none")
            notes = row["warnings"] + row["gate_reasons"]  # type: ignore[operator]
            extra = f"\twarnings: {'; '.join(notes)}" if notes else ""
            _emit_line(f"{path}\t{answer}\tgate={row['gate']}\t{probs}{extra}")
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from cxr_core.explain.cam import explain, get_method
    from cxr_core.explain.export import Provenance, labelled_png
    from cxr_core.explain.overlay import render_overlay
    from cxr_core.imaging.io import read_image

    try:
        get_method(args.method)  # fail on a bad method before loading anything
    except CxrError as exc:
        raise UsageError(str(exc)) from exc
    model = _load(args.model)
    if args.target and args.target not in model.manifest.classes:
        raise UsageError(f"{model.key} has no class {args.target!r}; its classes are {', '.join(model.manifest.classes)}.")
    image = read_image(args.file)
    # Compute the map for the predicted class unless one was named: one pass gives both.
    explanation = explain(model, image, method=args.method, targets=[args.target] if args.target else None)
    target = args.target or explanation.prediction.decision or model.manifest.classes[0]
    heatmap = explanation.heatmap(target)
    rgb = render_overlay(image.pixels, heatmap.scaled, colormap=args.colormap, opacity=args.opacity)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Film-sized as documented; the provenance goes in the PNG's text chunks only.
    shows = explanation.describe(target, model.manifest.label)
    out.write_bytes(labelled_png(rgb, Provenance(model.key, model.manifest.name, shows, image.sha256), banner=False))
    print(
        f"wrote {out} ({explanation.method} for {target}, p={heatmap.probability:.3f}, "
        f"predicted {explanation.prediction.predicted}, model {model.key})"
    )
    return EXIT_OK


def _cmd_lungs(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from cxr_core.errors import NoModelInstalledError
    from cxr_core.imaging.io import read_image
    from cxr_core.imaging.lungs import load_default_segmenter, segment_lungs

    segmenter = load_default_segmenter()
    if segmenter is None:
        raise NoModelInstalledError("The lung segmenter is not installed (weights/lung-segmenter); see the README.")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path in _iter_files(args.files):
        row: dict[str, object] = {"file": path, "mask": None, "lung_fraction": None, "error": None}
        try:
            image = read_image(path)
            lung = segment_lungs([image.pixels], segmenter)[0]
            stem, n = Path(path).stem, 1
            while f"{stem}.png" in used:  # two inputs of one name: keep both masks
                n += 1
                stem = f"{Path(path).stem}-{n}"
            used.add(f"{stem}.png")
            target = out_dir / f"{stem}.png"
            Image.fromarray(lung.mask.astype(np.uint8) * 255).save(target)
            row.update(mask=str(target), lung_fraction=round(lung.lung_fraction, 4))
            warning = "" if lung.regions == 2 else f"\t{lung.regions} lung region(s) found, 2 expected"
        except CxrError as exc:
            row["error"] = str(exc)
        if args.json:
            _emit_line(json.dumps(row))
        elif row["error"]:
            _emit_line(f"{path}\tERROR\t{row['error']}")
        else:
            _emit_line(f"{path}\t{row['mask']}\tlung_fraction={row['lung_fraction']}{warning}")
    return EXIT_OK


def _cmd_train_lungs(args: argparse.Namespace) -> int:
    from cxr_core.training.segmentation import read_mask_pairs, train_segmenter

    sources = [s.strip() for s in args.source.split(",") if s.strip()] if args.source else None
    pairs = read_mask_pairs(args.masks_csv, args.image_root, sources)
    run = train_segmenter(pairs, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, version=args.version,
                          processing=args.processing)
    print(f"wrote {run.folder}: {run.train_films} training and {run.val_films} validation films; "
          f"best epoch {run.best_epoch}/{run.epochs}, validation Dice {run.val_dice:.4f}; {run.seconds / 60:.1f} min")
    return EXIT_OK


def _schedule(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    if args.schedule:
        try:
            phases = tuple((int(size), int(epochs)) for size, epochs in (p.split(":") for p in args.schedule.split(",")))
        except ValueError as exc:
            raise UsageError("--schedule is SIZE:EPOCHS[,SIZE:EPOCHS...], e.g. 128:10,224:3") from exc
        return phases
    return ((args.size, args.epochs),)


def _zoom_range(text: str) -> tuple[float, float]:
    """``"0.9,1.3"`` -> (0.9, 1.3); a clear error for anything else."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--zoom is MIN,MAX, e.g. 0.9,1.1 (got {text!r})") from None
    if not 0.25 <= lo <= hi <= 4.0:
        raise UsageError(f"--zoom {text}: need 0.25 <= MIN <= MAX <= 4")
    return (lo, hi)


def _fraction(flag: str, value: float, letter: str, most: float, example: str) -> float:
    """``value`` when 0 <= value <= ``most``, else a UsageError naming ``flag``."""
    if not 0.0 <= value <= most:
        raise UsageError(f"{flag} {value}: need 0 <= {letter} <= {most:g} ({example})")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from cxr_core.training.augment import MAX_ASPECT, MAX_EDGE_CROP, AugmentConfig
    from cxr_core.training.config import TrainConfig
    from cxr_core.training.finalize import finalize
    from cxr_core.training.trainer import train

    out = Path(args.out)
    model_id = args.id or out.name
    augment = AugmentConfig.none() if args.no_augment else AugmentConfig(
        hflip=args.hflip, sharpness=args.sharpness, scale=_zoom_range(args.zoom),
        aspect=_fraction("--aspect", args.aspect, "A", MAX_ASPECT, "0.15 stretches by up to 15%"),
        edge_crop=_fraction("--edge-crop", args.edge_crop, "F", MAX_EDGE_CROP, "0.15 crops up to 15% off each edge"),
        acquisition=_fraction("--acquisition", args.acquisition, "P", 1.0, "0.3 gives each film each artefact 30% of the time"),
        acquisition_positive=None if args.acquisition_positive is None else _fraction(
            "--acquisition-positive", args.acquisition_positive, "Q", 1.0, "0 leaves the COVID-19 films as they are"))
    config = TrainConfig(
        data_dir=str(args.data_dir[0]),
        extra_data_dirs=tuple(str(d) for d in args.data_dir[1:]),
        crop=args.crop,
        crop_margin=args.crop_margin,
        intensity=args.intensity,
        mix_style=_fraction("--mix-style", args.mix_style, "P", 1.0, "0.5 mixes every other step"),
        arch=args.arch,
        out=str(out),
        model_id=model_id,
        version=args.version,
        name=args.name or "",
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        binary_positive=args.binary,
        aux_classes=tuple(c.strip() for c in (args.aux_classes or "").split(",") if c.strip()),
        schedule=_schedule(args),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        balance=args.balance,
        augment=augment,
        init=args.init,
        freeze_epochs=args.freeze_epochs,
        layer_decay=args.layer_decay,
        patience=args.patience,
        select_on=args.select_on,
        val_fraction=args.val_fraction,
        target_sensitivity=args.target_sensitivity,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        mask_burned_in=args.mask_text,
        amp_cpu=not args.no_cpu_bf16,
        average_every=args.average_every,
        interpolate=_fraction("--interpolate", args.interpolate, "A", 1.0, "0.5 is halfway between --init and the run"),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / model_id
    crossval = None
    from cxr_core.training import distributed
    if args.folds and distributed.world_from_env().distributed:
        raise UsageError("Cross-validation (--folds) runs in one process; start it without torchrun.")
    if args.folds:
        from cxr_core.training.crossval import cross_validate
        from cxr_core.training.prepare import prepare_data
        from cxr_core.training.trainer import final_spec, label_plan

        data = prepare_data(config.data_dirs, label_plan(config), max(s for s, _ in config.schedule), val_fraction=config.val_fraction, workers=config.workers,
                            mask_text=config.mask_burned_in, crop=final_spec(config))
        crossval = cross_validate(config, data, args.folds, run_dir / "crossval")
        print(f"{args.folds}-fold cross-validation: accuracy {crossval['accuracy']['mean']} +/- {crossval['accuracy']['std']}")
        result, data = train(config, run_dir / "final", data=data)
        run_dir = run_dir / "final"
    else:
        result, data = train(config, run_dir)
    from cxr_core.training import distributed
    if not distributed.world_from_env().main:
        distributed.stop()
        return EXIT_OK  # rank 0 writes the model
    distributed.stop()
    command = "python -m cxr_core " + shlex.join(args.argv)
    manifest = finalize(config, run_dir, data, result, command=command, crossval=crossval, seal_test=args.seal_test)
    # Name the split: with --seal-test (or no test folder) the figures are validation's.
    split = next((s for s in ("test", "val") if manifest.metrics.get(s)), None)
    scores = manifest.metrics[split] if split else {}
    figures = f"{split} accuracy {scores.get('accuracy')}, ECE {scores.get('ece')}" if split else "no split evaluated"
    print(f"wrote {out} ({manifest.key}); best epoch {result.best_epoch + 1}/{result.epochs_run}; {figures}; run folder {run_dir}")
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr_core.training.evaluate import evaluate_folder

    model = _load(args.model)
    metrics = evaluate_folder(model, Path(args.data_dir), split=args.split, metadata=Path(args.metadata) if args.metadata else None, batch_size=args.batch_size)
    data = metrics.as_dict()
    summary = {"model": model.key, "n": data["n"], "classes": data["classes"], "accuracy": data["accuracy"], "per_class": data["per_class"],
               "confusion_matrix": data["confusion_matrix"], "auroc_macro": data["auroc_macro"], "ece": data["ece"],
               "abstention": data.get("abstention")}
    if "by_source" in data:
        summary["by_source"] = {s: {k: v for k, v in m.items() if k in ("n", "accuracy", "per_class", "confusion_matrix", "auroc_macro", "ece")} for s, m in data["by_source"].items()}  # type: ignore[union-attr]
    if "other_labels" in data:
        summary["other_labels"] = data["other_labels"]
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(f"{model.key} on {args.data_dir}: n={summary['n']} accuracy={summary['accuracy']} auroc_macro={summary['auroc_macro']} ece={summary['ece']}")
    for cls, m in summary["per_class"].items():  # type: ignore[union-attr]
        print(f"  {cls}: precision={m['precision']} recall={m['recall']} specificity={m['specificity']} f1={m['f1']} n={m['n']}")
    print("  confusion (rows true, columns predicted): " + json.dumps(summary["confusion_matrix"]))
    if summary["abstention"]:
        a = summary["abstention"]
        print(f"  uncertain: {a['n_abstained']} films (answered {a['answered']}); accuracy answered={a['accuracy_answered']} abstained={a['accuracy_abstained']}")  # type: ignore[index]
    for source, m in summary.get("by_source", {}).items():  # type: ignore[union-attr]
        print(f"  source {source}: n={m['n']} accuracy={m['accuracy']}")
    for label, calls in summary.get("other_labels", {}).items():  # type: ignore[union-attr]
        print(f"  label {label} (not a class of this model): n={sum(calls.values())} called " + ", ".join(f"{c}={n}" for c, n in calls.items()))
    return EXIT_OK


def _check_target_sensitivity(value: float) -> None:
    """A usage error unless 0.5 <= ``value`` < 1: a sensitivity a threshold can be chosen for."""
    if not 0.5 <= value < 1.0:
        raise UsageError(f"--target-sensitivity {value}: need 0.5 <= S < 1 (e.g. 0.95)")


def _cmd_validate(args: argparse.Namespace) -> int:
    from cxr_core.training.validation import validate_site

    _check_target_sensitivity(args.target_sensitivity)
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"--report {args.report}: its folder does not exist")  # said before the films are scored
    model = _load_any_version(args.model)
    result = validate_site(model, Path(args.data_dir), target_sensitivity=args.target_sensitivity)
    data = result.as_dict()
    stored = None
    if args.record:
        from cxr_core.state.site_validations import record_validation

        stored = record_validation(result, user=args.record, role="cli", data_name=Path(args.data_dir).name)
    if args.report:
        from cxr_core.fileio import write_text
        from cxr_core.training.validation import validation_report

        label = model.manifest.label
        write_text(Path(args.report), stored.report(label) if stored else validation_report(data, data_name=Path(args.data_dir).name, label=label))
    if args.json:
        _emit_line(json.dumps(data))
        return EXIT_OK
    lines = [f"{result.model} on {args.data_dir}: {result.n} films (" + ", ".join(f"{k} {v}" for k, v in result.counts.items()) + ")",
             f"  COVID-19 sensitivity   {result.covid_sensitivity.words()}",
             f"  non-COVID specificity  {result.non_covid_specificity.words()}",
             f"  PPV                    {result.ppv.words()}",
             f"  NPV                    {result.npv.words()}"]
    a = result.auroc
    lines.append(f"  AUROC (COVID-19 vs not) {a['value']:.3f} (95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}, bootstrap)" if a["value"] is not None
                 else "  AUROC: not measurable (needs COVID-19 and other films)")
    lines.append(f"  ECE {result.ece}" if result.ece is not None else "  ECE: no film of the model's own classes")
    lines.append(f"  at the model's threshold {result.threshold}; confusion (rows: {', '.join(result.labels)}; columns: {', '.join(result.classes)}) "
                 + json.dumps(result.confusion_matrix))
    if result.suggested_threshold:
        t = result.suggested_threshold
        lines.append(f"  a site threshold of {t['value']} would reach sensitivity {t['sensitivity']} here, at specificity {t['specificity']} "
                     "(offered, not applied)")
    lines.append("  input check: " + ", ".join(f"{k} {v}" for k, v in result.gate.items()) + f"; uncertain {result.uncertain}")
    lines += [f"  warning: {w}" for w in result.warnings]
    for line in lines:
        _emit_line(line)
    return EXIT_OK


def _cmd_adapt(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cxr_core.training.adapt import AdaptationError, adapt, training_folders

    model = _load_any_version(args.model)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder exists and is not empty; adapted models go to a new folder")
    if args.replay is not None and args.no_replay:
        raise UsageError("--replay and --no-replay: give one or the other")
    _check_target_sensitivity(args.target_sensitivity)
    by_default = args.replay is None and not args.no_replay  # the model's own training folders, when here
    if by_default:
        replay = list(training_folders(model.manifest, model.path))
    else:
        replay = [Path(r) for r in args.replay or ()]
    try:
        result = adapt(model.path, Path(args.data_dir), out, version=args.version, replay=replay,
                       replay_share=args.replay_share, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       run_dir=Path(args.run_dir) if args.run_dir else None, device=args.device, seed=args.seed,
                       min_replay_validation=args.min_replay_validation, auxiliary=args.unknown_labels == "auxiliary",
                       distill=args.distill, distill_on=args.distill_on, interpolate=args.interpolate,
                       distill_classes=args.distill_classes, crossfit=args.crossfit, size=args.size,
                       target_sensitivity=args.target_sensitivity)
    except AdaptationError as exc:
        named = (model.manifest.training_data or {}).get("root")
        if by_default and not replay and named:
            raise AdaptationError(f"{exc} (The folders {model.manifest.key} was trained on, {named}, are not on this "
                                  "machine, or are an earlier adaptation's.)") from exc
        raise
    if by_default and replay:
        found = "the model's training data found at " + ", ".join(map(str, replay))
        result = replace(result, notes=(f"replayed {found} (the default; --no-replay adapts on the site's films alone)", *result.notes))
    if args.record:
        from cxr_core.state.site_validations import record_held_out_validations

        record_held_out_validations(result.before, result.after, user=args.record, role="cli",
                                    data_name=f"{Path(args.data_dir).name}, held-out half (adapt)")
    if args.json:
        from dataclasses import asdict

        _emit_line(json.dumps(asdict(result)))
        return EXIT_OK
    _emit_line(f"wrote {result.out} ({result.model}) from {result.base} in {result.seconds:.0f} s; films: "
               + ", ".join(f"{k} {v}" for k, v in result.films.items()))
    for name, key in (("COVID-19 sensitivity", "covid_sensitivity"), ("specificity", "non_covid_specificity")):
        b, a = result.before[key], result.after[key]
        _emit_line(f"  held-out {name}: {b['value']} {b['ci95']} -> {a['value']} {a['ci95']} ({a['successes']}/{a['n']})")
    for note in result.notes:
        _emit_line(f"  note: {note}")
    return EXIT_OK


def _cmd_adopt_threshold(args: argparse.Namespace) -> int:
    from cxr_core.models.site_threshold import adopt_site_threshold
    from cxr_core.state import audit

    name, _, version = args.model.partition("@")
    if not version:
        raise UsageError(f"{args.model}: give the version whose threshold is replaced, as ID@VERSION")
    films: list[Path] = []
    if args.chosen_on:
        from cxr_core.training.dataset import scan_folder

        films = [r.path for r in scan_folder(Path(args.chosen_on))]  # DatasetError when there are none
    adopted = adopt_site_threshold(name, version, args.threshold, new_version=args.version, user=args.user, reason=args.reason,
                                   chosen_films=films)
    audit.record("adopt_site_threshold", user=args.user, role="cli", model=adopted.key,
                 details={"base": args.model, "threshold": args.threshold, "reason": args.reason.strip(), "chosen_on_films": len(films)})
    _emit_line(f"registered {adopted.key}: {args.model} with its COVID-19 threshold at {adopted.manifest.thresholds} "
               f"in {adopted.path}; not active: evaluate it, then promote it on the Models page")
    return EXIT_OK


def _cmd_fit_gate(args: argparse.Namespace) -> int:
    from cxr_core.models.loading import resolve_model
    from cxr_core.training.dataset import LabelPlan
    from cxr_core.training.fit_gate import fit_gate
    from cxr_core.training.prepare import prepare_data, scan_folders

    folder = resolve_model(args.model)
    assert folder.manifest is not None
    plan: LabelPlan
    if folder.manifest.head == "sigmoid":
        plan = LabelPlan.binary(folder.manifest.classes[0], {r.label for r in scan_folders(args.data_dir)}, folder.manifest.classes[1])
    else:
        plan = LabelPlan.multiclass(folder.manifest.classes)
    data = prepare_data(args.data_dir, plan, folder.manifest.input.size[0], workers=args.workers,
                        mask_text=folder.manifest.input.mask_burned_in, crop=folder.manifest.input)
    manifest = fit_gate(folder.path, data, processing=args.processing)
    ood = dict(manifest.ood)
    print(f"fitted the OOD gate of {manifest.key}: warn above {ood['warn']}, reject above {ood['reject']}; test split: {ood.get('test_rates')}")
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from cxr_core.state.audit import entries, verify_chain

    if args.audit_command == "verify":
        report = verify_chain()
        if args.json:
            print(json.dumps({"ok": report.ok, "rows": report.rows, "first_bad_id": report.first_bad_id, "problem": report.problem}))
        elif report.ok:
            print(f"audit trail intact: {report.rows} entries")
        else:
            print(f"audit trail BROKEN at entry {report.first_bad_id}: {report.problem}")
        return EXIT_OK if report.ok else EXIT_FAILED
    for entry in reversed(entries(action=args.action, limit=args.limit)):
        print(json.dumps({"id": entry.id, "created": entry.created, "user": entry.user, "role": entry.role, "action": entry.action,
                          "image_sha256": entry.image_sha256, "model": entry.model, "details": entry.details}))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from cxr_core.state.health import check_health

    report = check_health(models=not args.no_models)
    if args.json:
        print(json.dumps({"ok": report.ok, "checks": report.rows()}))
    else:
        for c in report.checks:
            print(f"{'ok' if c.ok else 'FAILED'}\t{c.name}\t{c.detail}")
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_users(args: argparse.Namespace) -> int:
    import getpass

    from cxr_core.state.users import add_user, list_users, remove_user, users_file

    if args.users_command == "list":
        for user in list_users():
            print(f"{user.name}\t{user.role}")
        return EXIT_OK
    if args.users_command == "remove":
        if not remove_user(args.name):
            raise UsageError(f"No user {args.name!r}.")
        print(f"removed {args.name}")
        return EXIT_OK
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("The two passwords differ.")
    user = add_user(args.name, password, args.role)
    print(f"added {user.name} ({user.role}) to {users_file()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_core", description="cxr: chest X-ray decision support")
    parser.add_argument("--version", action="version", version=f"cxr_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list installed models")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("predict", help="class probabilities for files or folders")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM/PNG/JPEG files or folders (walked recursively)")
    p.add_argument("--model", help="model id or id@version (default: the first installed)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and per file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="threads decoding files ahead of the model")
    p.set_defaults(func=_cmd_predict)

    # pytorch-grad-cam costs seconds to import: predict should not pay for it, so the
    # method name is checked when explain runs rather than through argparse choices.
    from cxr_core.explain.overlay import COLORMAPS

    p = sub.add_parser("explain", help="write a Grad-CAM overlay PNG")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--model")
    p.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++, hirescam, xgradcam, layercam, eigencam or scorecam")
    p.add_argument("--target", metavar="CLASS", help="class to explain (default: the predicted class)")
    p.add_argument("--colormap", default="jet", choices=sorted(COLORMAPS))
    p.add_argument("--opacity", type=float, default=0.4)
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("train", help="train a model folder from labelled image folders")
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="+",
                   help="class sub-folders (optionally under train/val/test, optionally with metadata.csv); "
                        "several folders are merged into one set, checked for duplicates and patient leaks across all of them")
    p.add_argument("--arch", required=True, help="registered architecture, e.g. densenet121, resnet50")
    p.add_argument("--out", required=True, help="model folder to write, e.g. weights/my-model")
    p.add_argument("--id", help="model id (default: the --out folder name)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--name", help="display name")
    p.add_argument("--classes", default="covid,normal,viral_pneumonia", help="multi-class: folder labels used, in output order")
    p.add_argument("--aux-classes", metavar="LABELS",
                   help="multi-class: more folder labels trained as extra outputs and dropped from the exported model, "
                        "e.g. bacterial_pneumonia (default: none)")
    p.add_argument("--binary", metavar="POSITIVE", help="binary POSITIVE-vs-other model (every other folder is 'other')")
    p.add_argument("--init", default="random", help="random, imagenet (downloads torchvision weights), or a checkpoint file")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=224, help="input size (square)")
    p.add_argument("--schedule", help="progressive resizing SIZE:EPOCHS,...; overrides --size/--epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--balance", default="weights", choices=["weights", "sampler", "source", "none"],
                   help="class weights, a balanced sampler, weights balancing every (source, label) group of metadata.csv, or none")
    p.add_argument("--freeze-epochs", type=int, default=0, help="epochs training the head only (fine-tuning)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="per-stage learning-rate multiplier (discriminative LRs)")
    p.add_argument("--patience", type=int, default=0, help="early stopping (epochs without improvement; 0 = off)")
    p.add_argument("--select-on", default="loss", choices=["loss", "accuracy"])
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share when the data has no val split")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="COVID threshold chosen on validation for this sensitivity")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--hflip", action="store_true", help="allow horizontal flips (off: they swap laterality)")
    p.add_argument("--sharpness", type=float, default=1.0, help="sharpness augmentation range, 0 to turn off (default: %(default)s)")
    p.add_argument("--zoom", default="0.9,1.1", metavar="MIN,MAX",
                   help="zoom augmentation range; above 1 frames the chest more tightly (default: %(default)s)")
    p.add_argument("--aspect", type=float, default=0.0, metavar="A",
                   help="aspect-ratio augmentation: width/height stretched by up to 1+A either way (default: off)")
    p.add_argument("--edge-crop", type=float, default=0.0, metavar="F",
                   help="collimation augmentation: each edge cropped by up to F of the side, independently (default: off)")
    p.add_argument("--acquisition", type=float, default=0.0, metavar="P",
                   help="acquisition augmentation: each film gets, each with probability P, a black frame, CLAHE "
                        "processing, a burned-in box, a lower resolution and a JPEG re-encode, whatever its class "
                        "(default: off)")
    p.add_argument("--acquisition-positive", type=float, default=None, metavar="Q",
                   help="with --acquisition: the probability for films of the positive class (COVID-19) instead of P; 0 draws "
                        "the artefacts on the other classes only (measured once: it made unseen normals look more like "
                        "COVID-19, docs/experiments/2026-12-06-densenet-acquisition-non-covid.md) (default: P)")
    p.add_argument("--no-cpu-bf16", action="store_true",
                   help="train in fp32 on a CPU with native bf16 (AMX / AVX512-BF16), where bf16 autocast is the default")
    p.add_argument("--mask-text", action="store_true",
                   help="inpaint burned-in text and markers on every film; the model then does so before every prediction")
    p.add_argument("--crop", default="film", choices=["film", "lungs"],
                   help="what the network sees: the whole film, or the box around both lung fields found by the "
                        "installed lung segmenter (recorded in the model, so every prediction and heatmap does the same)")
    p.add_argument("--crop-margin", type=float, default=0.1, metavar="F",
                   help="with --crop lungs: widen the lung box by F of its size on each side (default: %(default)s)")
    p.add_argument("--intensity", default="fixed", choices=["fixed", "standardise", "clahe"],
                   help="standardise: give every film zero mean and unit spread before the network (removes a site's "
                        "brightness and contrast); clahe: give every film the same local-contrast processing (CLAHE) "
                        "before the network (a site's own processing cannot stand in for disease); recorded in the model")
    p.add_argument("--mix-style", type=float, default=0.0, metavar="P",
                   help="MixStyle: with probability P per step, the channel statistics of the network's early feature "
                        "maps are mixed between films of the batch, whatever their class, so a collection's look "
                        "cannot stand in for its label (training only; default: off)")
    p.add_argument("--average-every", type=int, default=0, metavar="STEPS",
                   help="export the average of the weights taken every STEPS steps of the final phase (SWA), "
                        "batch-norm statistics recomputed, instead of the best epoch (default: off)")
    p.add_argument("--interpolate", type=float, default=1.0, metavar="A",
                   help="export (1 - A) * the --init model's weights + A * the run's (WiSE-FT), temperature and "
                        "threshold chosen on validation for those; needs --init to be a model's weights; resuming a "
                        "finished run with another A (its folder's config.json edited to match) only exports again "
                        "(default: 1, the run's own weights)")
    p.add_argument("--seal-test", action="store_true",
                   help="do not evaluate the test split at the end (no test metrics or figures; the summary line then "
                        "reports validation), to judge a candidate on validation first; "
                        "scripts/refresh_model_card.py --abstention DATA evaluates it later")
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation on train+val first (by patient), then the final model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="threads decoding images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--run-dir", help="checkpoints and progress (default runs/ID); an existing run resumes")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("lungs", help="outline both lung fields of each film (the lung segmenter)")
    p.add_argument("files", nargs="+", metavar="FILE", help="films or folders (walked recursively)")
    p.add_argument("--out-dir", required=True, help="writes OUT_DIR/<file stem>.png: 255 on lung, 0 elsewhere, the film's own size")
    p.add_argument("--json", action="store_true", help='one JSON object per line and file: {"file", "mask", "lung_fraction", "error"}')
    p.set_defaults(func=_cmd_lungs)

    p = sub.add_parser("train-lungs", help="train the lung segmenter from a masks.csv (mask, image, source)")
    p.add_argument("masks_csv", metavar="MASKS_CSV")
    p.add_argument("--out", required=True, help="model folder to write, e.g. weights/lung-segmenter")
    p.add_argument("--source", help="only these sources (comma-separated), e.g. openist; other hospitals are for measuring")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the CSV folder's parent)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--processing", type=float, default=0.0,
                   help="probability of each of another site's processing steps on the film alone "
                        "(CLAHE, a lower resolution, a JPEG re-encode; default 0: off)")
    p.set_defaults(func=_cmd_train_lungs)

    p = sub.add_parser("fit-gate", help="fit a model's out-of-distribution gate on its training data")
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="+", help="the labelled folder(s) the model was trained on")
    p.add_argument("--model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--processing", type=float, default=0.0, metavar="P",
                   help="also fit on a processed copy of every training film, each of another site's "
                        "processing steps drawn with probability P (frame, CLAHE, box, lower resolution, "
                        "JPEG; default 0: the films as they are)")
    p.set_defaults(func=_cmd_fit_gate)

    p = sub.add_parser("users", help="manage the users who can sign in")
    users_sub = p.add_subparsers(dest="users_command", required=True)
    q = users_sub.add_parser("add", help="add a user or reset their password")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["radiologist", "reviewer", "admin"])
    q.add_argument("--password-stdin", action="store_true", help="read the password from standard input (scripts)")
    q = users_sub.add_parser("remove")
    q.add_argument("name")
    users_sub.add_parser("list")
    p.set_defaults(func=_cmd_users)

    p = sub.add_parser("audit", help="check or list the audit trail")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    q = audit_sub.add_parser("verify", help="check the hash chain (exit 1 when broken)")
    q.add_argument("--json", action="store_true")
    q = audit_sub.add_parser("list", help="entries as JSON lines, oldest first")
    q.add_argument("--action")
    q.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("check", help="check that this installation can serve (state, audit trail, every model); exit 1 if not")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-models", action="store_true", help="skip loading the models")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("evaluate", help="metrics of a model on labelled folders")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--model")
    p.add_argument("--split", choices=["train", "val", "test"], help="only this split, when the folder has splits")
    p.add_argument("--metadata", help="metadata.csv giving each file's source (default: DATA_DIR's or its parent's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("validate", help="local validation: COVID-19 sensitivity, specificity, PPV, NPV (95%% CIs), AUROC, "
                                        "calibration and a site threshold, on a hospital's own labelled films")
    p.add_argument("data_dir", metavar="DATA_DIR", help="one folder per label (covid, normal, nodule, ...), optionally under train/val/test")
    p.add_argument("--model", help="ID (its active version) or ID@VERSION (default: the default model)")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="for the suggested site threshold (default: %(default)s)")
    p.add_argument("--record", metavar="USER", help="also store the result in the app's records (and audit trail) as USER: "
                                                    "the Models page lists it and Diagnose shows it beside the model")
    p.add_argument("--report", metavar="FILE", help="also write the validation as a Markdown report for the hospital's records "
                                                    "(figures, intervals, confusion matrix, reliability; no file names)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("adopt-threshold", help="register a new version of a model with a site's own COVID-19 threshold "
                                               "(e.g. validate's suggested_threshold): same weights, not active until promoted")
    p.add_argument("model", metavar="ID@VERSION", help="the version whose COVID-19 threshold is replaced")
    p.add_argument("--threshold", type=float, required=True, help="the new COVID-19 threshold (0 < T < 1)")
    p.add_argument("--version", required=True, help="the new version's name (must not exist)")
    p.add_argument("--user", required=True, help="who adopts it (kept with the version and in the audit trail)")
    p.add_argument("--reason", required=True, help="why the site adopts it (kept with the version)")
    p.add_argument("--chosen-on", metavar="DATA_DIR", help="the labelled folder whose validation chose the threshold: its films are "
                                                          "recorded (by content hash) so that a validation on any of them is flagged")
    p.set_defaults(func=_cmd_adopt_threshold)

    from cxr_core.training.adapt import CROSSFIT, DISTILL, DISTILL_CLASSES, DISTILL_ON, INTERPOLATE

    p = sub.add_parser("adapt", help="fine-tune a model on a site's films (split by patient: half held out to judge "
                                     "before and after), optionally mixing in the original training films")
    p.add_argument("data_dir", metavar="DATA_DIR", help="the site's labelled films (one folder per label)")
    p.add_argument("--record", metavar="USER", help="also store both scorings of the held-out half (the base model's and the "
                                                    "adapted model's) as site validations in the app's records, as USER")
    p.add_argument("--model", required=True, help="ID (its active version) or ID@VERSION")
    p.add_argument("--out", required=True, help="the adapted model's folder, e.g. weights/densenet121-site-b")
    p.add_argument("--version", default="1.0.0-site")
    p.add_argument("--replay", nargs="+", default=None, metavar="DATA_DIR",
                   help="the model's training data folders, to mix in (default: the folders its manifest says it was "
                        "trained on, when they are on this machine)")
    p.add_argument("--no-replay", action="store_true", help="adapt on the site's films alone, even where the training data is here")
    p.add_argument("--replay-share", type=float, default=0.5, help="share of training films from --replay (default: %(default)s)")
    p.add_argument("--min-replay-validation", type=int, default=0, metavar="N",
                   help="draw at least N validation films from --replay, every class in its proportion: they choose the "
                        "epoch, temperature and COVID-19 threshold and are never trained on. 300 keeps COVID-19 "
                        "sensitivity on the replayed collections but costs the site specificity (default: in "
                        "proportion to the site's validation films)")
    p.add_argument("--unknown-labels", choices=["auxiliary", "leave-out"], default="auxiliary",
                   help="multi-class models: films whose label the model has no class for (nodule, pneumonia, ...) are "
                        "trained as auxiliary outputs that the adapted model drops, or left out of the fine-tune "
                        "(default: %(default)s)")
    p.add_argument("--distill", type=float, default=DISTILL, metavar="W",
                   help="weight of a term that keeps the adapted model's answers near the base model's on every film it "
                        "trains on (learning without forgetting); with it a class the site has no films of is kept "
                        "(0: off; default: %(default)s)")
    p.add_argument("--distill-on", choices=["all", "replay"], default=DISTILL_ON,
                   help="which training films get that term: all, or only the replayed ones, so that the site's own "
                        "films are learned from their labels alone (default: %(default)s)")
    p.add_argument("--distill-classes", choices=["all", "missing"], default=DISTILL_CLASSES,
                   help="multi-class models: the term compares all of the model's answers, or only the probability of "
                        "the classes without films (e.g. viral pneumonia at a hospital), leaving the site's labels to decide "
                        "among the others (default: %(default)s)")
    p.add_argument("--interpolate", type=float, default=INTERPOLATE, metavar="A",
                   help="export (1 - A) x the base model's weights + A x the adapted weights, then calibrate (WiSE-FT: "
                        "keeps more of what the base model knew; 1: the adapted weights; default: %(default)s)")
    p.add_argument("--crossfit", type=int, default=CROSSFIT, metavar="K",
                   help="K more fine-tunes, each on all but one of K folds (by patient) of the films adapted and validated on, "
                        "score the fold they did not see; temperature and COVID-19 threshold are fitted on those scores "
                        "instead of the validation films' alone. K times the time; the weights are the same (0: off; "
                        "default: %(default)s)")
    p.add_argument("--target-sensitivity", type=float, default=0.95, metavar="S",
                   help="the COVID-19 threshold is chosen again for this sensitivity (default: %(default)s)")
    p.add_argument("--size", type=int, metavar="PX",
                   help="adapt and predict at this input size (square, px) instead of the model's own; larger costs "
                        "(PX / model size)^2 the time per film (default: the model's size)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--run-dir", help="checkpoints and the adaptation's data view (default runs/adapt-<out name>)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_cmd_adapt)
    return parser


def _drop_tracebacks(record: logging.LogRecord) -> bool:
    # Decoders (pydicom's among them) log a failed frame with its traceback; the file's
    # error is already reported in plain words, so keep stack traces for --verbose.
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_tracebacks)
    try:
        return int(args.func(args))
    except (ModelNotFoundError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK
