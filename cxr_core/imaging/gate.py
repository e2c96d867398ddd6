"""Is this a frontal chest radiograph? Decide before showing a prediction.

Three sources, combined into accepted / warning / rejected:

1. DICOM metadata when present (PS3.3 C.7.3.1 Modality, C.7.3.1 Body Part Examined,
   C.8.11.5 View Position): a CT/MR/US/... modality, a body part other than the chest,
   or a lateral view is rejected.
2. The image's appearance, for every model: its distance from chest-film space
   (:mod:`cxr_core.imaging.chest_space`, principal components of real chest films), which
   catches CT slices, photographs, documents and other body parts without a network.
3. The classifier's own feature space: the class-conditional Mahalanobis distance
   (Lee et al. 2018) of the pooled features, in the top principal components of the
   training features, to the nearest class mean. Thresholds come from the validation
   films' distances. No external weights, nothing downloaded.
4. Image quality (rotation, inversion, resolution, cropping: :mod:`cxr_core.imaging.quality`),
   which warns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from cxr_core.imaging.chest_space import chest_space
from cxr_core.imaging.film import ImageMetadata
from cxr_core.imaging.quality import BLANK_CONTRAST, QualityReport, shown_apart
from cxr_core.models.feature_gate import FeatureGate

log = logging.getLogger(__name__)

ACCEPTED, WARNING, REJECTED = "accepted", "warning", "rejected"
#: beyond this multiple of the feature gate's rejection distance a film is turned away whatever
#: its appearance
FEATURE_ONLY_REJECT = 1.5
_RANK = {ACCEPTED: 0, WARNING: 1, REJECTED: 2}

# Projection radiography modalities (PS3.3 C.7.3.1.1.1): CR, DX and the retired RG/DR.
RADIOGRAPHY = {"CR", "DX", "RG", "DR"}
# Secondary capture or "other": no opinion from metadata, the image decides.
NEUTRAL_MODALITIES = {"OT", "SC", ""}
MODALITY_NAMES = {
    "CT": "a CT image", "MR": "an MR image", "US": "an ultrasound image", "NM": "a nuclear medicine image",
    "PT": "a PET image", "MG": "a mammogram", "XA": "an angiography image", "RF": "a fluoroscopy image",
    "IO": "an intra-oral dental radiograph", "PX": "a panoramic dental radiograph", "OP": "an ophthalmic image",
    "SEG": "a segmentation object", "RTDOSE": "a radiotherapy dose map", "RTIMAGE": "a radiotherapy image",
    "ES": "an endoscopy image", "XC": "an external camera photograph", "SM": "a microscopy slide",
}
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORAX", "THORACIC")
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


@dataclass(frozen=True)
class GateResult:
    outcome: str  # accepted | warning | rejected
    reasons: tuple[str, ...] = ()
    distance: float | None = None  # feature-space distance, None when the model has no fitted gate
    image_checked: bool = False  # whether the feature-space check ran
    #: turning or inverting the film is worth offering: it passed the gate, or it was rejected
    #: only for an appearance that the correction would fix
    correctable: bool = False

    @property
    def rejected(self) -> bool:
        return self.outcome == REJECTED


def metadata_verdict(meta: ImageMetadata) -> tuple[str, list[str]]:
    reasons: list[str] = []
    outcome = ACCEPTED
    modality = (meta.modality or "").upper().strip()
    if modality and modality not in RADIOGRAPHY and modality not in NEUTRAL_MODALITIES:
        what = MODALITY_NAMES.get(modality, f"a {modality} image")
        return REJECTED, [f"The DICOM header says this is {what} (Modality {modality}), not a chest radiograph."]
    part = (meta.body_part or "").upper().strip()
    if part and not any(word in part for word in CHEST_BODY_PARTS):
        return REJECTED, [f"The DICOM header says the body part is {part}, not the chest."]
    view = (meta.view_position or "").upper().strip()
    if view in LATERAL_VIEWS:
        return REJECTED, [f"This is a lateral view (View Position {view}); the model reads frontal (PA/AP) films only."]
    if meta.source_format == "dicom" and modality in NEUTRAL_MODALITIES:
        outcome = WARNING
        reasons.append("The DICOM header does not say this is a radiograph (modality missing or secondary capture).")
    return outcome, reasons


def judge(
    meta: ImageMetadata, distance: float | None, gate: FeatureGate | None, quality: QualityReport | None, lungs: str | None = None
) -> GateResult:
    """The input check's verdict; ``lungs`` is the lung segmenter's objection, if any (a warning)."""
    outcome, reasons = metadata_verdict(meta)
    fixes_rejection = False
    space = chest_space()
    film = quality.film_distance if quality is not None else None
    if quality is not None and quality.contrast < BLANK_CONTRAST:
        outcome = REJECTED
        reasons.append("The image is almost uniform (blank): there is no film to read.")
    elif space is not None and film is not None and quality is not None:
        if film > space.reject:
            outcome = REJECTED
            shown, limit = shown_apart(film, space.reject, 2)
            reasons.append(
                f"The image does not look like a chest radiograph (appearance distance {shown} from real chest films; "
                f"rejected above {limit})."
            )
            corrected = quality.corrected_film_distance
            if quality.fixable and corrected is not None and corrected <= space.warn:
                reasons.append("Turned upright and with bones bright it would look like a chest film: correct the film and check again.")
                fixes_rejection = True
        elif film > space.warn:
            outcome = max(outcome, WARNING, key=_RANK.get)
            shown, limit = shown_apart(film, space.warn, 2)
            reasons.append(
                f"The image looks unlike most chest radiographs (appearance distance {shown}; typical films stay below "
                f"{limit}). Check that it is a whole frontal chest film."
            )
    # The feature distance says "unlike this model's training films", not "not a chest film": a
    # film that every other check takes for a chest film (an appearance not rejected, upright,
    # bones bright, a readable size, a plausible pair of lungs) and that is not very far is
    # warned about, not turned away: another site's processing (CLAHE, a white collimation
    # border) must not lock its films out (scripts/stress_gate.py; an unusual appearance too:
    # docs/experiments/2026-12-06-gate-stress-appearance.md). Small or smooth images
    # (gradients, dose grids) can look chest-like at 32 px, hence every condition.
    chest_like = (
        space is not None and film is not None and quality is not None and film <= space.reject
        and not quality.low_resolution and not quality.fixable and not lungs
    )
    if gate is not None and distance is not None:
        if gate.reject < distance <= FEATURE_ONLY_REJECT * gate.reject and chest_like and outcome != REJECTED:
            outcome = max(outcome, WARNING, key=_RANK.get)
            shown, limit = shown_apart(distance, gate.reject, 1)
            reasons.append(
                f"The image is far from every chest film this model was trained on (distance {shown}; "
                f"typical films stay below {gate.warn:.1f}, rejected above {limit}), though it looks like a chest film: read the answer with "
                "particular care, the model may not know films like this one."
            )
        elif distance > gate.reject:
            outcome = REJECTED
            shown, limit = shown_apart(distance, gate.reject, 1)
            reasons.append(
                f"The image is far from every chest film the model was trained on (distance {shown}; "
                f"rejected above {limit}). It may not be a frontal chest radiograph."
            )
        elif distance > gate.warn:
            outcome = max(outcome, WARNING, key=_RANK.get)
            shown, limit = shown_apart(distance, gate.warn, 1)
            reasons.append(
                f"The image is unusual for this model (distance {shown}; typical films stay below {limit}). "
                "Check that it is a frontal chest radiograph."
            )
    elif gate is None:
        outcome = max(outcome, WARNING, key=_RANK.get)
        reasons.append("This model has no feature-space check fitted: only the image's general appearance was checked, "
                       "not whether it resembles the films this model was trained on.")
    # Quality and lungs are questions about a chest film: not asked of an image rejected as
    # something else (an MR is not "rotated by 180 degrees"), unless correcting it is the way in.
    judged = outcome != REJECTED or fixes_rejection
    if judged and quality is not None and quality.warnings:
        outcome = max(outcome, WARNING, key=_RANK.get)
        reasons.extend(quality.warnings)
    if lungs and outcome != REJECTED:
        outcome = max(outcome, WARNING, key=_RANK.get)
        reasons.append(lungs)
    correctable = judged and quality is not None and quality.fixable
    return GateResult(outcome, tuple(reasons), distance, gate is not None and distance is not None, correctable)


def outcome_counts(results: Sequence[GateResult]) -> dict[str, int]:
    counts = {ACCEPTED: 0, WARNING: 0, REJECTED: 0}
    for r in results:
        counts[r.outcome] += 1
    return counts
