"""Local validation: how a model does on one hospital's own labelled films, with the certainty
its numbers allow.

The question a site asks first is the COVID-19 one (is a COVID-19 film flagged; is a film
without COVID-19 left alone), so the figures are about COVID-19 against everything else,
every other folder label (normal, nodule, pneumonia...) counting as "not COVID-19", whatever
classes the model has. Films go through the app's own prediction path
(:func:`cxr_core.inference.predict`: preprocessing, temperature, the model's threshold); the
input gate's verdicts are counted beside the figures, which judge the model's decision on
every film, as :func:`cxr_core.training.evaluate.evaluate_folder` does.

Intervals: Wilson score intervals for proportions (Wilson 1927; Brown, Cai and DasGupta 2001
recommend it over the normal approximation for small n), a percentile bootstrap for AUROC.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cxr_core.errors import CxrError
from cxr_core.fileio import sha256_file
from cxr_core.metrics import expected_calibration_error, reliability_bins
from cxr_core.models.fitted_films import count_fitted, fitted_warning
from cxr_core.models.loading import LoadedModel

log = logging.getLogger(__name__)

#: fewer films than this of a class, and its figures are "too few to conclude"
TOO_FEW = 50
POSITIVE = "covid"


class ValidationError(CxrError):
    """The folder cannot validate the model (no readable labelled films, or no films on one side)."""


@dataclass(frozen=True)
class Estimate:
    """A proportion ``successes / n`` with its 95% Wilson interval; ``value`` None when n is 0."""

    value: float | None
    ci95: tuple[float, float] | None
    successes: int
    n: int

    @classmethod
    def of(cls, successes: int, n: int) -> "Estimate":
        if n == 0:
            return cls(None, None, 0, 0)
        return cls(round(successes / n, 4), tuple(round(v, 4) for v in wilson_interval(successes, n)), successes, n)  # type: ignore[arg-type]

    def words(self) -> str:
        if self.value is None:
            return "not measurable (no films)"
        assert self.ci95 is not None
        return f"{self.value:.3f} (95% CI {self.ci95[0]:.3f}-{self.ci95[1]:.3f}; {self.successes}/{self.n})"


@dataclass(frozen=True)
class SiteValidation:
    """One model on one labelled folder. ``confusion_matrix`` rows follow ``labels`` (the
    folder's), columns ``classes`` (the model's decisions)."""

    model: str
    data_sha256: str
    n: int
    counts: dict[str, int]
    labels: tuple[str, ...]
    classes: tuple[str, ...]
    confusion_matrix: list[list[int]]
    threshold: float | None
    covid_sensitivity: Estimate
    non_covid_specificity: Estimate
    ppv: Estimate
    npv: Estimate
    auroc: dict[str, Any]
    ece: float | None
    reliability: list[dict[str, float]]
    suggested_threshold: dict[str, Any] | None
    gate: dict[str, int]
    uncertain: int
    unreadable: int
    #: films scored here that this version was fitted on (:mod:`cxr_core.models.fitted_films`):
    #: more than 0 and the figures flatter it, so Diagnose does not show them as its validation
    fitted_films: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("covid_sensitivity", "non_covid_specificity", "ppv", "npv"):
            data[key]["ci95"] = list(data[key]["ci95"]) if data[key]["ci95"] else None
        data["labels"], data["classes"], data["warnings"] = list(self.labels), list(self.classes), list(self.warnings)
        return data


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (by default) Wilson score interval for ``successes`` out of ``n``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); None without both sides."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks over ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc(scores: np.ndarray, positive: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """{"value", "ci95"}: AUROC and its 95% percentile bootstrap interval (films resampled with
    replacement, positives and negatives separately, so every resample has both)."""
    value = auroc(scores, positive)
    if value is None:
        return {"value": None, "ci95": None}
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(scores)[np.asarray(positive, bool)], np.asarray(scores)[~np.asarray(positive, bool)]
    draws = []
    for _ in range(resamples):
        a, b = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        draws.append(auroc(np.concatenate([a, b]), np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)]))
    lo, hi = np.percentile(np.array(draws, dtype=np.float64), [2.5, 97.5])
    return {"value": round(value, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def suggest_threshold(p_covid: np.ndarray, is_covid: np.ndarray, target_sensitivity: float) -> dict[str, Any] | None:
    """The largest COVID-19 threshold that reaches ``target_sensitivity`` on these films (at most
    0.5, as training chooses it), with the sensitivity and specificity it gives here."""
    from cxr_core.training.calibration import choose_threshold

    if not is_covid.any() or is_covid.all():
        return None
    threshold = choose_threshold(p_covid, is_covid, target_sensitivity)
    called = p_covid >= threshold
    return {"value": round(threshold, 4), "target_sensitivity": target_sensitivity,
            "sensitivity": round(float(called[is_covid].mean()), 4), "specificity": round(float((~called[~is_covid]).mean()), 4)}


def data_sha256(paths: Sequence[Path], root: Path, file_sha256: Mapping[Path, str] | None = None) -> str:
    """One hash for a labelled folder's content: each file's relative path and bytes, in order.
    ``file_sha256``: each file's sha256, where already computed."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        digest.update(bytes.fromhex(file_sha256[path] if file_sha256 else sha256_file(path)))
    return digest.hexdigest()


def validate_site(model: LoadedModel, root: Path | str, *, target_sensitivity: float = 0.95, batch_size: int = 16,
                  bootstrap: int = 1000) -> SiteValidation:
    """Score ``model`` on the labelled folder ``root`` (class folders, optionally under
    train/val/test; every split is used) and report the figures of :class:`SiteValidation`."""
    from cxr_core.training.dataset import scan_folder
    from cxr_core.training.evaluate import predict_records

    root = Path(root)
    records = scan_folder(root)
    if not records:
        raise ValidationError(f"No labelled films under {root}: one folder per label (covid, normal, ...) is expected.")
    manifest = model.manifest
    classes = tuple(manifest.classes)

    labels: list[str] = []
    scored: list[Path] = []
    decisions: list[str] = []
    probabilities: list[tuple[float, ...]] = []
    gate: Counter[str] = Counter()
    uncertain = unreadable = 0
    for record, result in predict_records(model, records, batch_size=batch_size):
        if result is None:
            unreadable += 1
            continue
        labels.append(record.label)
        scored.append(record.path)
        decisions.append(result.decision or classes[0])
        probabilities.append(result.probabilities)
        gate[result.gate_outcome] += 1
        uncertain += int(result.uncertain)
    if not labels:
        raise ValidationError(f"None of the {len(records)} files under {root} could be read as a film.")
    if POSITIVE not in classes:
        raise ValidationError(f"{model.key} has no {POSITIVE!r} class to validate.")
    order = sorted(set(labels), key=lambda label: (label != POSITIVE, label))
    probs = np.array(probabilities, dtype=np.float64)
    p_covid = probs[:, classes.index(POSITIVE)]
    is_covid = np.array([label == POSITIVE for label in labels])
    called = np.array([d == POSITIVE for d in decisions])
    tp, fn = int((called & is_covid).sum()), int((~called & is_covid).sum())
    tn, fp = int((~called & ~is_covid).sum()), int((called & ~is_covid).sum())
    confusion = [[sum(1 for lab, dec in zip(labels, decisions) if lab == label and dec == cls) for cls in classes] for label in order]

    # Calibration on the films whose label is one of the model's classes (a binary model's
    # negative class holds every other label).
    negative = classes[1] if manifest.head == "sigmoid" else None
    target = [classes.index(lab) if lab in classes else (classes.index(negative) if negative else -1) for lab in labels]
    known = np.array([t >= 0 for t in target])
    ece = round(expected_calibration_error(probs[known], np.array(target)[known]), 4) if known.any() else None
    reliability = reliability_bins(probs[known], np.array(target)[known], bins=10) if known.any() else []

    counts = {label: labels.count(label) for label in order}
    warnings = [f"{label}: {n} film(s), too few to conclude (fewer than {TOO_FEW}); the intervals show how little is known."
                for label, n in counts.items() if n < TOO_FEW]
    if not is_covid.any():
        warnings.append("No COVID-19 films: sensitivity cannot be measured here.")
    if is_covid.all():
        warnings.append("Only COVID-19 films: specificity cannot be measured here.")
    if unreadable:
        warnings.append(f"{unreadable} file(s) could not be read and were left out.")
    paths = [r.path for r in records]
    file_sha256 = {path: sha256_file(path) for path in paths}
    fitted = count_fitted(manifest, scored, file_sha256)
    if fitted:
        warnings.insert(0, fitted_warning(fitted, len(labels), manifest) + ", and Diagnose does not show them as its site "
                           "validation. Validate it on films of this site it has not seen.")
    return SiteValidation(
        model=model.key, data_sha256=data_sha256(paths, root, file_sha256), n=len(labels), counts=counts, labels=tuple(order), classes=classes,
        confusion_matrix=confusion, threshold=manifest.thresholds.get(POSITIVE),
        covid_sensitivity=Estimate.of(tp, tp + fn), non_covid_specificity=Estimate.of(tn, tn + fp),
        ppv=Estimate.of(tp, tp + fp), npv=Estimate.of(tn, tn + fn),
        auroc=bootstrap_auroc(p_covid, is_covid, resamples=bootstrap), ece=ece, reliability=reliability,
        suggested_threshold=suggest_threshold(p_covid, is_covid, target_sensitivity),
        gate=dict(sorted(gate.items())), uncertain=uncertain, unreadable=unreadable, fitted_films=fitted, warnings=tuple(warnings),
    )


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float | None, float | None]:
    """(PPV, NPV) of a test with ``sensitivity`` and ``specificity`` where a share ``prevalence``
    of the films are COVID-19 (Bayes' rule); None where no film would be called that way."""
    tp, fn = sensitivity * prevalence, (1 - sensitivity) * prevalence
    tn, fp = specificity * (1 - prevalence), (1 - specificity) * (1 - prevalence)
    return (tp / (tp + fp) if tp + fp > 0 else None), (tn / (tn + fn) if tn + fn > 0 else None)


def covid_share(result: Mapping[str, Any]) -> float:
    """The share of a validation's films (``SiteValidation.as_dict()``) that are COVID-19: the
    prevalence its PPV and NPV are at."""
    return result["counts"].get(POSITIVE, 0) / result["n"] if result["n"] else 0.0


def predictive_values_at(result: Mapping[str, Any], prevalence: float) -> dict[str, dict[str, Any]] | None:
    """PPV and NPV at another COVID-19 share than the validation films' own (a site's PPV and NPV
    depend on how many of its films are COVID-19; the uploaded set's share is whatever was
    gathered): ``{"ppv": {"value", "range"}, "npv": {...}}``, the range taken over the corners of
    the sensitivity and specificity intervals (each value rises with both). None when either
    figure was not measurable."""
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence {prevalence}: need 0 < p < 1")
    sens, spec = result["covid_sensitivity"], result["non_covid_specificity"]
    if sens["value"] is None or spec["value"] is None:
        return None
    point = predictive_values(sens["value"], spec["value"], prevalence)
    low = predictive_values(sens["ci95"][0], spec["ci95"][0], prevalence)
    high = predictive_values(sens["ci95"][1], spec["ci95"][1], prevalence)
    return {name: {"value": point[i], "range": [low[i], high[i]]} for i, name in enumerate(("ppv", "npv"))}


def estimate_text(e: Mapping[str, Any] | None, missing: str = "not measurable") -> str:
    """A stored estimate (``{value, ci95[, successes, n]}``) in words: "0.910 (0.849-0.948); 121/133",
    without the counts for one that has none (AUROC); ``missing`` when it was not measurable."""
    if not e or e.get("value") is None:
        return missing
    text = f"{e['value']:.3f} ({e['ci95'][0]:.3f}-{e['ci95'][1]:.3f})"
    return text + (f"; {e['successes']}/{e['n']}" if "n" in e else "")


#: the COVID-19 shares a report gives PPV and NPV at, besides the validation films' own
REPORT_PREVALENCES = (0.02, 0.05, 0.10, 0.20, 0.50)


def value_range_text(e: Mapping[str, Any]) -> str:
    """"0.512 (0.301-0.702)" for ``{"value", "range"}`` of :func:`predictive_values_at`; "—" for an undefined end."""
    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"
    return f"{f(e['value'])} ({f(e['range'][0])}-{f(e['range'][1])})"


def validation_report(result: Mapping[str, Any], *, data_name: str, user: str | None = None, created: str | None = None,
                      label: Callable[[str], str] = lambda c: c.replace("_", " ")) -> str:
    """A site validation (``SiteValidation.as_dict()``) as a Markdown document for the hospital's
    records: the model and version, who validated it on which films (their name, count and
    content hash; no file name), every figure with its interval, the confusion matrix, the
    reliability table, the offered threshold, the warnings and the disclaimer. ``label`` names
    the model's classes."""
    from cxr_core.inference import DISCLAIMER

    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    lines = [f"# Site validation of `{result['model']}`", ""]
    who = " ".join(part for part in (f"on {created}" if created else "", f"by {user}" if user else "") if part)
    if who:
        lines.append(f"- Validated {who}.")
    lines += [
        f"- Films: {data_name}, {result['n']} read ({counts}); {result.get('unreadable', 0)} unreadable, left out.",
        f"- Data sha256 (every file's path and bytes): `{result['data_sha256']}`.",
        f"- Decisions at the model's COVID-19 threshold {result['threshold']}; every label other than covid counts as not COVID-19.",
        "",
    ]
    if result.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    lines += ["## Figures", "", "| figure | value (95% CI); films |", "|---|---|"]
    for name, key in (("COVID-19 sensitivity", "covid_sensitivity"), ("Specificity (not COVID-19 left alone)", "non_covid_specificity"),
                      ("PPV", "ppv"), ("NPV", "npv"), ("AUROC, COVID-19 vs not", "auroc")):
        lines.append(f"| {name} | {estimate_text(result[key])} |")
    lines.append(f"| ECE on the model's own classes | {'not measurable' if result['ece'] is None else format(result['ece'], '.3f')} |")
    lines += ["", "Intervals: Wilson score (rates), percentile bootstrap (AUROC).", ""]
    if predictive_values_at(result, 0.5) is not None:
        lines += [f"PPV and NPV above are at these films' COVID-19 share ({covid_share(result):.1%}). Where another share of the films read "
                  "is COVID-19 they differ (ranges over the sensitivity and specificity intervals):", "",
                  "| COVID-19 share | PPV | NPV |", "|---|---|---|"]
        for prevalence in REPORT_PREVALENCES:
            at = predictive_values_at(result, prevalence)
            assert at is not None
            lines.append(f"| {prevalence:.0%} | " + " | ".join(value_range_text(at[k]) for k in ("ppv", "npv")) + " |")
        lines.append("")
    lines += ["## Confusion matrix (rows: the folders' labels; columns: the model's decisions)", "",
              "| | " + " | ".join(f"called {label(c)}" for c in result["classes"]) + " |",
              "|---|" + "---|" * len(result["classes"])]
    lines += [f"| folder {name} | " + " | ".join(str(n) for n in row) + " |" for name, row in zip(result["labels"], result["confusion_matrix"])]
    if result.get("reliability"):
        lines += ["", "## Reliability on these films", "", "| confidence | accuracy | films |", "|---|---|---|"]
        lines += [f"| {b['confidence']:.3f} | {b['accuracy']:.3f} | {b['n']} |" for b in result["reliability"]]
    t = result.get("suggested_threshold")
    if t:
        lines += ["", "## Site threshold offered (not applied)", "",
                  f"p >= {t['value']} would reach COVID-19 sensitivity {t['sensitivity']:.3f} on these films, at specificity "
                  f"{t['specificity']:.3f} (target {t['target_sensitivity']}). These films chose it, so they flatter it."]
    gate = ", ".join(f"{k} {v}" for k, v in result.get("gate", {}).items())
    lines += ["", "## Input check", "", f"{gate}; the model said \"uncertain\" for {result.get('uncertain', 0)} film(s).",
              "", "---", "", f"*{DISCLAIMER}*", ""]
    return "\n".join(lines)
