"""Is this installation able to serve? One pass over what the app needs, for monitoring and
after an upgrade (``python -m cxr_core check``).

The web server's own health URL (Streamlit's ``/_stcore/health``) only says the process
answers; it does not notice a model whose weights no longer match their manifest, a state
folder the service user cannot write, or an audit trail someone edited. Each of those
leaves the app up while clinicians get errors or an untrustworthy record, so each is
checked here and named when it fails.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cxr_core import config
from cxr_core.errors import ModelError
from cxr_core.imaging import ASSETS

log = logging.getLogger(__name__)

#: the sample film every model predicts: the mean of upright training films (no patient in it),
#: enlarged to a readable size so it passes the reader's and the quality checks' size rules
SAMPLE = ASSETS / "mean_chest.png"
SAMPLE_SIDE = 512


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def rows(self) -> list[dict[str, object]]:
        """One dict per check: name, ok, detail, seconds (the CLI's JSON and the Models page's table)."""
        return [asdict(c) for c in self.checks]


def _timed(name: str, probe: Callable[[], str]) -> Check:
    """Run ``probe``; its return value is the detail of a passed check, its exception a failed one."""
    started = time.perf_counter()
    try:
        detail = probe()
        ok = True
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure, whatever it is
        log.debug("check %s failed", name, exc_info=True)
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return Check(name, ok, detail, round(time.perf_counter() - started, 3))


def _state_folder() -> str:
    folder = config.var_dir()
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".health-{uuid.uuid4().hex}"
    probe.write_bytes(b"ok")
    probe.unlink()
    return f"{folder} is writable"


def _database() -> str:
    from cxr_core.state.db import connect, database_path

    with connect() as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return f"{database_path()} opens ({len(tables)} tables)"


def _audit_trail() -> str:
    from cxr_core.state.audit import verify_chain

    report = verify_chain()
    if not report.ok:
        raise RuntimeError(f"audit trail broken at entry {report.first_bad_id}: {report.problem}")
    return f"hash chain intact ({report.rows} entries)"


def _input_checks() -> str:
    from cxr_core.imaging.chest_space import ASSET, chest_space
    from cxr_core.imaging.quality import EXPOSURE_ASSET, exposure_range

    # Without these files the appearance and exposure checks are skipped without a word to
    # the clinician (the app still runs), so a partial copy of the code must fail here.
    exposure = exposure_range()
    missing = [p.name for p, loaded in ((ASSET, chest_space()), (EXPOSURE_ASSET, exposure)) if loaded is None]
    if missing or exposure is None:
        raise RuntimeError(f"missing from cxr_core/imaging/assets: {', '.join(missing)} (the image checks that need them are skipped)")
    lo, hi = exposure
    return f"chest-film appearance basis and exposure range ({lo:.2f} to {hi:.2f}) present"


@lru_cache(maxsize=1)
def sample_film() -> bytes:
    """The sample film as PNG bytes, (SAMPLE_SIDE, SAMPLE_SIDE) greyscale."""
    picture = Image.open(SAMPLE).convert("L").resize((SAMPLE_SIDE, SAMPLE_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _model(path: Path) -> str:
    from cxr_core.imaging.io import read_image
    from cxr_core.inference import predict
    from cxr_core.models.loading import load_model

    # load_model checks the weights against the manifest's sha256 before building the network.
    model = load_model(path)
    started = time.perf_counter()
    prediction = predict(model, [read_image(sample_film(), name="sample")])[0]
    seconds = time.perf_counter() - started
    probabilities = np.asarray(prediction.probabilities, dtype=np.float64)
    if not (np.all(np.isfinite(probabilities)) and math.isclose(float(probabilities.sum()), 1.0, abs_tol=1e-3)):
        raise RuntimeError(f"the sample film gave unusable probabilities {probabilities.tolist()}")
    gate = "input gate fitted" if model.manifest.ood else "no input gate fitted: every film gets a warning"
    return f"weights match the manifest; sample film predicted on {model.device} in {seconds:.2f} s; {gate}"


def _model_registry() -> str:
    """The active-version pointers and the default model name folders that exist: the app
    would otherwise log an error and quietly use the shipped version (or another model)."""
    from cxr_core.models.loading import installed_models
    from cxr_core.models.manifest import read_manifest
    from cxr_core.models.pointer import read_pointer, registry_dir

    pointer = read_pointer()  # RegistryError (a failed check) when unreadable
    broken = []
    for model_id, version in pointer["active"].items():
        try:
            read_manifest(registry_dir() / model_id / version)
        except ModelError:
            broken.append(f"{model_id}@{version}")
    if broken:
        raise RuntimeError(f"active version(s) {', '.join(broken)} are unreadable: the shipped versions are used instead; promote or roll back")
    default = pointer.get("default")
    installed = {f.manifest.id for f in installed_models() if f.manifest}
    if default and default not in installed:
        raise RuntimeError(f"the default model {default} is not installed: choose another on the Models page")
    chosen = f"default model {default}" if default else "no default model chosen (the first by name is offered)"
    return f"{len(pointer['active'])} version(s) promoted here; {chosen}"


def _lung_segmenter(needed_by: list[str]) -> str:
    from cxr_core.imaging.io import read_image
    from cxr_core.imaging.lungs import implausible_lungs, load_default_segmenter, lung_views

    # Loading checks the weights against the manifest's sha256 first.
    segmenter = load_default_segmenter()
    if segmenter is None:
        if needed_by:
            raise RuntimeError(f"not installed (weights/lung-segmenter), and {', '.join(needed_by)} read lung crops: they cannot predict")
        return "not installed: no per-film lung check; the Compare page's lung share uses the atlas"
    view = lung_views([read_image(sample_film(), name="sample").pixels], segmenter)[0]
    objection = implausible_lungs(view, segmenter)
    if objection:
        raise RuntimeError(f"on the sample film: {objection}")
    return f"{segmenter.key}: weights match the manifest; lungs found on the sample film ({view.mean():.0%} of it)"


def check_health(*, models: bool = True) -> HealthReport:
    """Every check, in order: state folder, database, audit trail, input-check assets, then each model.

    ``models=False`` skips loading the models (seconds each on a CPU).
    """
    from cxr_core.models.loading import discover_models

    checks = [_timed(name, probe) for name, probe in (("state folder", _state_folder), ("database", _database),
                                                      ("audit trail", _audit_trail), ("input checks", _input_checks),
                                                      ("model registry", _model_registry))]
    folders = discover_models()
    if not folders:
        checks.append(Check("models", False, f"no trained model is installed (looked in {config.weights_dir()})", 0.0))
    for folder in folders:
        label = folder.manifest.key if folder.manifest else os.fspath(folder.path)
        if not folder.ok:
            checks.append(Check(f"model {label}", False, folder.problem or "unusable", 0.0))
        elif models:
            checks.append(_timed(f"model {label}", lambda p=folder.path: _model(p)))
    if models:
        needed_by = [f.manifest.key for f in folders if f.manifest and f.manifest.input.crop == "lungs"]
        checks.append(_timed("lung segmenter", lambda: _lung_segmenter(needed_by)))
    return HealthReport(tuple(checks))
