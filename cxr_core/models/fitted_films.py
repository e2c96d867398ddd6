"""Which of a site's films a model version was fitted on, so that a later validation can tell.

A site adaptation trains and calibrates on part of the site's films; a training job from the
app trains on an uploaded set; an adopted site threshold was chosen on the films of one
validation. Scored on those same films again, each version looks better than it will on the
site's next patient. The version's manifest keeps a fingerprint
of each such film (``training["fitted_site_films"]``: the first 16 hex digits of the sha256 of
its bytes, so a copy under another name or in another upload is still recognised) and what they
were used for; :func:`cxr_core.training.validation.validate_site` counts how many of the films
it scores are among them, and a validation that counts any is never shown as the version's
site validation on Diagnose.

Only fingerprints are kept: no file name, path or pixel of a film reaches the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cxr_core.fileio import sha256_file
from cxr_core.models.manifest import Manifest

#: the manifest's ``training`` entry: {"fingerprints": [...], "uses": [...]}
FITTED_FILMS_KEY = "fitted_site_films"
#: hex digits of a film's sha256 kept: 64 bits, so two different films of one site share a
#: fingerprint with odds of about n² / 2^65 (10^-11 for 30,000 films)
FINGERPRINT_HEX = 16


def film_fingerprint(path: Path, sha256: str | None = None) -> str:
    """A film's fingerprint: the start of the sha256 of its bytes (``sha256``: already computed)."""
    return (sha256 or sha256_file(path))[:FINGERPRINT_HEX]


def fitted_fingerprints(manifest: Manifest) -> frozenset[str]:
    """Fingerprints of the site films ``manifest``'s version was fitted on (empty when none)."""
    entry = manifest.training.get(FITTED_FILMS_KEY) or {}
    return frozenset(str(f) for f in entry.get("fingerprints", ()))


def fitted_uses(manifest: Manifest) -> tuple[str, ...]:
    """What the site films were used for, e.g. ("adaptation (training, calibration and threshold)",)."""
    entry = manifest.training.get(FITTED_FILMS_KEY) or {}
    return tuple(str(u) for u in entry.get("uses", ()))


def fitted_uses_text(manifest: Manifest) -> str:
    """:func:`fitted_uses` in words, e.g. "adaptation (training, calibration and threshold) and COVID-19 threshold"."""
    return " and ".join(fitted_uses(manifest)) or "fitting"


def with_fitted_films(training: Mapping[str, Any], paths: Iterable[Path], use: str) -> dict[str, Any]:
    """``training`` (a manifest's ``training`` entry) with the films at ``paths`` added to the ones
    it was fitted on for ``use``; films already recorded (a version adapted, then given a site
    threshold) are kept."""
    entry = training.get(FITTED_FILMS_KEY) or {}
    fingerprints = set(entry.get("fingerprints", ())) | {film_fingerprint(Path(p)) for p in paths}
    uses = list(entry.get("uses", ()))
    if use not in uses:
        uses.append(use)
    return {**training, FITTED_FILMS_KEY: {"fingerprints": sorted(fingerprints), "uses": uses}}


def record_fitted_films(model_folder: Path, paths: Iterable[Path], use: str, base: Manifest | None = None) -> Manifest:
    """Record in ``model_folder``'s manifest that its version was fitted on the films at ``paths``
    for ``use``, with the films ``base`` (the version it was trained from) was fitted on: a
    version adapted twice, or adapted and then given a site threshold, is flagged on the films
    of every step. Returns the manifest as written."""
    from cxr_core.models.loading import update_manifest
    from cxr_core.models.manifest import read_manifest

    manifest = read_manifest(model_folder)
    inherited = {FITTED_FILMS_KEY: base.training[FITTED_FILMS_KEY]} if base and FITTED_FILMS_KEY in base.training else {}
    training = with_fitted_films({**manifest.training, **inherited}, paths, use)
    return update_manifest(model_folder, replace(manifest, training=training))


def count_fitted(manifest: Manifest, paths: Sequence[Path], file_sha256: Mapping[Path, str] | None = None) -> int:
    """How many of the films at ``paths`` ``manifest``'s version was fitted on; no file is read
    when it records none. ``file_sha256``: each film's sha256, where already computed."""
    fitted = fitted_fingerprints(manifest)
    if not fitted:
        return 0
    return sum(film_fingerprint(p, file_sha256.get(p) if file_sha256 else None) in fitted for p in paths)


def fitted_warning(fitted: int, n: int, manifest: Manifest) -> str:
    """What a validation or evaluation on ``n`` films, ``fitted`` of them ones ``manifest``'s version was fitted on, must say."""
    return f"{fitted} of these {n} films were used for this version's {fitted_uses_text(manifest)}: its figures on them flatter it"
