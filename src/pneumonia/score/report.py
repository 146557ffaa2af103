"""Results back into the PACS: one DICOM Structured Report per scored film (``--write-back``).

Why TID 1500 (Measurement Report) in a Comprehensive SR: it is the template the IHE AI Results
profile names for AI output and the one that viewers (OHIF, 3D Slicer) and highdicom read back
as structured findings, and a whole-image classification fits its image-level group (TID 1501)
without inventing a template: the finding type Pneumonia, the source film as the group's
source image, the model as its algorithm (name, version, weights digest as a parameter), a
measurement P(PNEUMONIA) and one of the threshold (unit ``1``), and qualitative evaluations
for the label (Pneumonia present when PNEUMONIA, absent when NORMAL) and the input check's
outcome. A Comprehensive SR rather than Comprehensive 3D: there are no 3-D coordinates.

Films the input check refuses get no report: "not a (frontal) chest X-ray" is not a finding
about the patient, and a report in the study would look like a read. Their rows say so in OUT,
and the per-study summary counts them. Films it scores but flags (``unlike_training``) get a report
that carries the flag.

The report's UIDs come from the model's weights digest and operating point and the source
film's UIDs (``2.25`` and
a name-based UUID of them), so storing the report of the same film by the same model twice
replaces nothing and adds nothing.

With ``--write-heatmap``, each reported film also gets a Secondary Capture beside its report: the
film with the model's class-activation map for its label over it (the picture the service's
``?heatmap=true`` draws), in the report's series, its UID derived the same way.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pneumonia.labels import LABELS
from pneumonia.score.rows import ScoreError, ScoreRow

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

    from pneumonia.predictor import Predictor
    from pneumonia.score.dicomweb import DicomWebSettings, DicomWebSource

log = logging.getLogger(__name__)

#: Local codes (DICOM PS3.16 8.2: a private scheme designator starts with 99).
SCHEME = "99PNEUMONIA"
MANUFACTURER = "pneumonia-detection"
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "Pneumonia model report (not verified by a radiologist)"


@dataclass(frozen=True)
class ModelIdentity:
    """What a report says about the model that wrote it.

    ``operating_point`` (temperature, bias and threshold) joins the weights digest in the
    reports' UIDs: a site model recalibrated on the same weights gives other probabilities and
    labels, so its reports must not share UIDs with the base model's (a PACS keeps the first
    copy of a UID), while a card rewrite that changes neither keeps them.
    """

    name: str
    version: str
    weights_sha256: str
    operating_point: str = ""

    @property
    def uid_key(self) -> str:
        """What the reports' UIDs derive from: the weights and the operating point."""
        return f"{self.weights_sha256}/{self.operating_point}"


def model_identity(predictor: Predictor) -> ModelIdentity:
    """The model's name, version and weights digest (the sha256 of the ONNX file without its
    metadata, so the same when only the card changes; pneumonia.card): the one place reports
    read them.

    Raises:
        ScoreError: the model has no weights digest to derive the reports' UIDs from; the
            file's own sha256 is not used instead (it changes with every card rewrite, and
            with it every report's UIDs).
    """
    identity = predictor.identity()
    digest = identity.get("weights_sha256") or ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ScoreError(
            f"model {predictor.path} has no weights digest (got {digest!r}); re-export it with "
            "`pneumonia export` to write reports back"
        )
    point = f"{predictor.temperature!r}/{predictor.bias!r}/{predictor.threshold!r}"
    return ModelIdentity(identity["name"], identity["version"], digest, point)


#: Namespace of the name-based UUIDs under the reports' ``2.25`` UIDs (any fixed UUID would do;
#: changing it would give every report new UIDs).
UID_NAMESPACE = uuid.UUID("5b0c6f0e-8f4e-4b43-9d0a-6e6f6e6f7020")


def derived_uid(*parts: str) -> str:
    """A UID that is a function of ``parts`` alone: ``2.25.`` and the integer of their
    name-based (SHA-1, version 5) UUID, as ISO/IEC 9834-8 and DICOM PS3.5 B.2 allow.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` looks like it but ignores the
    entropy under the ``2.25`` root and returns a random UUID: reports would be stored twice.
    """
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(0).join(parts)).int}"


def report_uids(model: ModelIdentity, header: Dataset) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the report on ``header``'s film by ``model``."""
    return (
        derived_uid("pneumonia-report-series", model.uid_key, str(header.SeriesInstanceUID)),
        derived_uid("pneumonia-report", model.uid_key, str(header.SOPInstanceUID)),
    )


def heatmap_uid(model: ModelIdentity, header: Dataset) -> str:
    """SOP instance UID of the heatmap Secondary Capture of ``header``'s film by ``model``."""
    return derived_uid("pneumonia-heatmap", model.uid_key, str(header.SOPInstanceUID))


def _orientation(header: Dataset) -> tuple[str, str] | None:
    """The film's PatientOrientation (the overlay keeps its rows and columns), if it has one."""
    value = header.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2 or not all(value):
        return None
    return str(value[0]), str(value[1])


def build_heatmap(header: Dataset, rgb: np.ndarray, model: ModelIdentity) -> Dataset:
    """The heatmap of one film as a Secondary Capture (RGB) in the report's series, pointing at
    the film it was drawn on.

    Args:
        header: The film's DICOM header.
        rgb: uint8 (H, W, 3): :func:`pneumonia.heatmap.overlay` of the film.
        model: The model that drew it.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    header = _evidence(header)
    series_uid, _ = report_uids(model, header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=heatmap_uid(model, header),
        instance_number=max(1, int(header.get("InstanceNumber") or 1)),
        manufacturer=MANUFACTURER,
        # highdicom demands an orientation; a film that records none gets an empty one (type 2:
        # unknown) below rather than a guess.
        patient_orientation=_orientation(header) or ("L", "F"),
        series_description=SERIES_DESCRIPTION,
    )
    if _orientation(header) is None:
        sc.PatientOrientation = []
    # Type 2C in General Series (dciodvfy asks for it): the film's, else empty (unknown).
    sc.Laterality = str(header.get("Laterality") or "")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"class activation map of {model.name} {model.version} over the film"
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


#: Type 2 attributes of the patient and study that highdicom copies from the film into the
#: report; archives often leave them out of a film (then the report has them empty).
_COPIED_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _evidence(header: Dataset) -> Dataset:
    """``header`` with every attribute the report copies present (empty where it had none)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.update(header)
    for keyword in _COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _codes() -> dict[str, Any]:
    from highdicom.sr import CodedConcept

    return {
        "procedure": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
        "lung": CodedConcept("39607008", "SCT", "Lung structure"),
        "present": CodedConcept("52101004", "SCT", "Present"),
        "absent": CodedConcept("2667000", "SCT", "Absent"),
        "unitless": CodedConcept("1", "UCUM", "no units"),
        "probability": CodedConcept("p-pneumonia", SCHEME, "Probability of pneumonia"),
        "threshold": CodedConcept("threshold", SCHEME, "Decision threshold of the model"),
        "input_check": CodedConcept("input-check", SCHEME, "Input check of the model"),
    }


#: What each scored outcome of the input check (pneumonia.guard) reads as in a report.
INPUT_CHECK_MEANINGS = {
    "typical": "Typical of the films the model was validated on",
    "unlike_training": "Unlike the films the model was validated on",
    "not_a_chest_xray": "Not a chest X-ray (scored with --flag-only)",
    "not_a_frontal_chest_xray": "Not a frontal chest X-ray (scored with --flag-only)",
}


def build_report(header: Dataset, row: ScoreRow, model: ModelIdentity) -> Dataset:
    """The Comprehensive SR (TID 1500) of one scored film, in its study.

    Args:
        header: The film's DICOM header (patient and study are copied from it).
        row: Its scored row (``prediction`` set).
        model: The model that scored it.

    Raises:
        ScoreError: the row has no prediction, or the header lacks the UIDs a report needs.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if row.prediction is None or row.p_pneumonia is None:
        raise ScoreError(f"{row.key} has no prediction to report ({row.error})")
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not header.get(attr):
            raise ScoreError(f"{row.key}: the film's header has no {attr}; cannot report on it")
    header = _evidence(header)
    c = _codes()
    series_uid, sop_uid = report_uids(model, header)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights sha256 {model.weights_sha256}", f"threshold {row.threshold!r}"],
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("pneumonia-model", model.uid_key),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    unit = c["unitless"]
    measurements = [
        hd.sr.Measurement(
            name=c["probability"], value=row.p_pneumonia, unit=unit, algorithm_id=algorithm
        ),
        hd.sr.Measurement(name=c["threshold"], value=row.threshold, unit=unit),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            c["pneumonia"], c["present"] if row.prediction == LABELS[1] else c["absent"]
        )
    ]
    if row.input_check:
        meaning = INPUT_CHECK_MEANINGS.get(row.input_check, row.input_check)
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                c["input_check"], hd.sr.CodedConcept(row.input_check, SCHEME, meaning)
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("pneumonia-finding", model.uid_key, str(header.SOPInstanceUID)),
            identifier="Pneumonia classification of the whole film",
        ),
        finding_type=c["pneumonia"],
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(c["lung"])],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )
    content = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=c["procedure"],
        imaging_measurements=[group],
    )
    instance_number = int(header.get("InstanceNumber") or 1)
    return hd.sr.ComprehensiveSR(
        evidence=[header],
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=max(1, instance_number),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def heatmap_rgb(predictor: Predictor, data: bytes, row: ScoreRow) -> np.ndarray:
    """The film with the model's activation map for the row's label over it (uint8 RGB), drawn
    as the service draws its heatmaps."""
    from pneumonia.heatmap import MAX_OVERLAY_SIDE, overlay
    from pneumonia.predictor import Prediction

    pre = predictor.prepare(data, view_side=MAX_OVERLAY_SIDE)
    (pred,) = predictor.predict([pre], with_cam=True, refuse=False)
    if not isinstance(pred, Prediction) or pre.view is None or pred.cam is None:
        raise ScoreError(f"{row.key}: no picture or activation map to draw a heatmap from")
    return overlay(pre.view, pred.cam, row.prediction or pred.label)


class ReportWriter:
    """The ``on_rows`` hook of a ``--write-back`` job: one report per scored film, stored with
    STOW-RS before the batch's rows are saved (a failed store stops the job with those rows
    unsaved, so a rerun tries them again).

    Args:
        source: The job's source, keeping the headers (and, for heatmaps, the files) of the
            films it retrieved.
        settings: The connection to store through.
        heatmaps: Also store each film's heatmap as a Secondary Capture (the film is decoded
            and run through the model once more, in this process, for its activation map).
    """

    def __init__(
        self, source: DicomWebSource, settings: DicomWebSettings, heatmaps: bool = False
    ) -> None:
        self.source = source
        self.settings = settings
        self.heatmaps = heatmaps
        self.client = settings.client()
        self.stored = 0
        self._model: ModelIdentity | None = None

    def __call__(self, predictor: Predictor, rows: list[ScoreRow]) -> None:
        if self._model is None:
            self._model = model_identity(predictor)
        reports = []
        for row in rows:
            header = self.source.pop_header(row.key)
            data = self.source.pop_file(row.key)
            if row.prediction is None:  # an error row: refused, skipped or unreadable
                continue
            if header is None:
                raise ScoreError(f"{row.key} was scored but its header was not kept; report a bug")
            reports.append(build_report(header, row, self._model))
            if self.heatmaps:
                if data is None:
                    raise ScoreError(
                        f"{row.key} was scored but its file was not kept; report a bug"
                    )
                reports.append(
                    build_heatmap(header, heatmap_rgb(predictor, data, row), self._model)
                )
        if reports:
            self.store(reports)

    def store(self, reports: Sequence[Dataset]) -> None:
        """STOW-RS ``reports`` (and heatmaps); raises ScoreError naming what the server refused."""
        from pneumonia.score.dicomweb import connection_error

        try:
            answer = self.client.store_instances(datasets=list(reports))
        except Exception as exc:
            raise connection_error(self.settings, exc, "store reports (STOW-RS)") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise ScoreError(
                f"the DICOMweb server refused {len(failed)} of {len(reports)} reports "
                f"(DICOM failure reasons {reasons}); the rows of this batch are not saved"
            )
        self.stored += len(reports)
        log.debug("stored %d reports", len(reports))
