"""Published observations (JSON-LD or any RDF graph of one event) back to typed records.

``decode_jsonld`` reads the JSON-LD the normalizer publishes without an RDF library (the
worker's hot path); ``decode_graph`` reads the same facts from an rdflib graph (from the RDF
store, or JSON-LD that another tool re-serialized). Both go through one decoder, so they agree.

Every fact the graph holds comes back: a censored result's comparator (the value is then the
limit), its limit of detection and the assay's reading; a drug's codes, the body size and the
dose as reported; a treatment's place in its course; a segmentation's label map; when the feed
recorded the event; and the event's extensions (field path, JSON text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stream.rdf import (
    CONTEXT,
    EVENT_PREFIX,
    FHIR,
    GENE_STUDIED,
    GENETIC_VARIANT,
    OT,
    PROV,
    RDF_TYPE,
    RXNORM,
    XSD,
    ClaimCheckFacts,
    expand,
)

_TREATMENT_TYPES = {
    OT + "RadiotherapyFraction": "radiotherapy",
    OT + "Surgery": "surgery",
    FHIR + "MedicationAdministration": "chemotherapy",
}


class DecodeError(ValueError):
    """The document is not the graph of one normalized event."""


# The decoded claim check is the one the graph was built from (stream.rdf), read back.
ClaimCheck = ClaimCheckFacts


@dataclass(frozen=True)
class DecodedObservation:
    """One normalized event as the assimilation side needs it (values in canonical units)."""

    event_id: str
    patient_id: str
    kind: str  # imaging, lab, ctdna, treatment
    time: datetime  # event time (occurred_at)
    resource_type: str  # Observation, ImagingStudy, Procedure, MedicationAdministration
    code: str  # IRI of the term (LOINC, SNOMED CT, local) of the primary resource
    value: float | None  # canonical value (volume mL, marker, fraction, dose) or None
    unit: str | None  # canonical UCUM unit of value
    reported_value: float | None = None  # as sent, when it differed from the canonical one
    reported_unit: str | None = None
    schema_version: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    recorded_at: datetime | None = None  # when the feed recorded the event
    # fields the contract does not name: ((path, value as JSON text), ...), by path
    extensions: tuple[tuple[str, str], ...] = ()
    # lab, ctdna: a censored result ("<", "<=", ">=", ">"; None: a measurement), whose value
    # is then the limit; below_lod: sent as below the limit of detection; the lod and the
    # assay's reading under it, in the canonical unit
    comparator: str | None = None
    below_lod: bool = False
    detection_limit: float | None = None
    assay_reading: float | None = None
    # ctdna
    ctdna_measure: str | None = None
    gene: str | None = None
    variant_hgvs: str | None = None
    # imaging
    modality_code: str | None = None
    modality: str | None = None  # DICOM modality (MR, CT, PT)
    study_uid: str | None = None
    series_uid: str | None = None
    voxel_spacing_mm: tuple[float, float, float] | None = None
    volume_ml: float | None = None
    centroid_mm: tuple[float, float, float] | None = None
    dicom: ClaimCheck | None = None
    segmentation: ClaimCheck | None = None
    density_map: ClaimCheck | None = None
    tissue_map: ClaimCheck | None = None
    segmentation_labels: tuple[tuple[int, str], ...] | None = None  # (label, meaning), by label
    label_convention: str | None = None  # explicit, brats, binary, soft (stream.imaging)
    # treatment
    treatment_type: str | None = None  # radiotherapy, chemotherapy, surgery
    dose: float | None = None
    dose_unit: str | None = None
    drug_name: str | None = None
    rxnorm: str | None = None
    drug_codes: tuple[str, ...] = ()  # IRIs, sorted: the code sent and the table's other codes of the drug
    route: str | None = None
    body_weight_kg: float | None = None
    body_surface_area_m2: float | None = None
    total_dose_mg: float | None = None  # the dose in mg, where the event made it computable
    fraction_number: int | None = None
    fractions_planned: int | None = None
    target: str | None = None
    cycle: int | None = None
    cycles_planned: int | None = None
    day_of_cycle: int | None = None
    cycle_length_days: float | None = None
    regimen: str | None = None
    line_of_therapy: int | None = None
    planned: bool | None = None
    resection_mask: ClaimCheck | None = None


def _names_a_context(document: Any) -> bool:
    """Whether a JSON-LD document refers to a context by reference (a string in ``@context``,
    or an ``@import``) anywhere, which a JSON-LD processor would load."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if "@import" in item:
                return True
            ctx = item.get("@context")
            if isinstance(ctx, str) or (isinstance(ctx, list) and any(isinstance(c, str) for c in ctx)):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# A neutral view of a graph: node key -> {"types": set[str], "props": {predicate: [value]}},
# value = ("iri", text) | ("lit", lexical, datatype or None) | ("node", key).
_Nodes = dict[str, dict[str, Any]]


def decode_jsonld(document: bytes | str | Mapping[str, Any]) -> DecodedObservation:
    """Decode the JSON-LD of one observation as published (compact form, inline context)."""
    if isinstance(document, (bytes, str)):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as exc:
            raise DecodeError(f"not JSON: {exc.msg}") from exc
    if not (isinstance(document, Mapping) and document.get("@context") == CONTEXT and isinstance(document.get("@graph"), list)):
        # Not our compact form (another context, expanded, flattened): full JSON-LD processing.
        from rdflib import Graph  # noqa: PLC0415

        if not isinstance(document, (Mapping, list)):
            raise DecodeError("expected a JSON-LD document (object or array)")
        if _names_a_context(document):
            # rdflib would fetch it: a URL that never answers stalls the worker, and file:
            # URLs read local files. The observations topic carries inline contexts only.
            raise DecodeError("the JSON-LD refers to a context by URL (or @import): only inline contexts are read")
        graph = Graph()
        try:
            graph.parse(data=json.dumps(document), format="json-ld")
        except Exception as exc:  # noqa: BLE001  (any parser failure: not JSON-LD we can read)
            raise DecodeError(f"not readable JSON-LD: {type(exc).__name__}: {exc}") from exc
        return decode_graph(graph)
    nodes: _Nodes = {}
    counter = [0]

    def value_of(item: Any) -> tuple[Any, ...]:
        if isinstance(item, Mapping):
            if "@value" in item:
                dt = item.get("@type")
                return ("lit", str(item["@value"]), expand(dt) if dt else None)
            if "@id" in item and len(item) == 1:
                return ("iri", expand(item["@id"]))
            return ("node", add(item))
        if isinstance(item, bool):
            return ("lit", "true" if item else "false", XSD + "boolean")
        if isinstance(item, int):
            return ("lit", str(item), XSD + "integer")
        if isinstance(item, float):
            return ("lit", repr(item), XSD + "double")
        return ("lit", str(item), None)

    def add(obj: Mapping[str, Any]) -> str:
        key = obj.get("@id")
        if key is None:
            counter[0] += 1
            key = f"_:n{counter[0]}"
        node = nodes.setdefault(key, {"types": set(), "props": {}})
        types = obj.get("@type", [])
        node["types"].update(expand(t) for t in (types if isinstance(types, list) else [types]))
        for name, raw in obj.items():
            if name.startswith("@"):
                continue
            predicate = expand(name)
            items = raw if isinstance(raw, list) else [raw]
            node["props"].setdefault(predicate, []).extend(value_of(i) for i in items)
        return str(key)

    for obj in document["@graph"]:
        if isinstance(obj, Mapping):
            add(obj)
    return _decode(nodes)


def decode_graph(graph: Any) -> DecodedObservation:
    """Decode an rdflib graph holding one event's resources."""
    from rdflib import BNode, Literal, URIRef  # noqa: PLC0415

    nodes: _Nodes = {}

    def key(term: Any) -> str:
        return f"_:{term}" if isinstance(term, BNode) else str(term)

    for s, p, o in graph:
        node = nodes.setdefault(key(s), {"types": set(), "props": {}})
        if str(p) == RDF_TYPE:
            node["types"].add(str(o))
            continue
        if isinstance(o, Literal):
            dt = str(o.datatype) if o.datatype is not None else None
            value: tuple[Any, ...] = ("lit", str(o), None if dt == XSD + "string" else dt)
        elif isinstance(o, BNode):
            value = ("node", key(o))
        elif isinstance(o, URIRef):
            value = ("iri", str(o))
        else:  # pragma: no cover
            continue
        node["props"].setdefault(str(p), []).append(value)
    return _decode(nodes)


# -- the shared decoder ---------------------------------------------------------------------


class _View:
    def __init__(self, nodes: _Nodes, key: str) -> None:
        self.nodes = nodes
        self.key = key
        self.node = nodes.get(key, {"types": set(), "props": {}})

    def all(self, predicate: str) -> list[tuple[Any, ...]]:
        return list(self.node["props"].get(predicate, []))

    def one(self, predicate: str) -> tuple[Any, ...] | None:
        values = self.node["props"].get(predicate)
        return values[0] if values else None

    def text(self, predicate: str) -> str | None:
        v = self.one(predicate)
        return None if v is None else str(v[1])

    def number(self, predicate: str) -> float | None:
        v = self.one(predicate)
        return None if v is None or v[0] != "lit" else float(v[1].replace("INF", "inf"))

    def integer(self, predicate: str) -> int | None:
        v = self.one(predicate)
        return None if v is None or v[0] != "lit" else int(v[1])

    def boolean(self, predicate: str) -> bool | None:
        v = self.one(predicate)
        return None if v is None or v[0] != "lit" else v[1] in ("true", "1")

    def child(self, predicate: str) -> _View | None:
        v = self.one(predicate)
        return _View(self.nodes, v[1]) if v is not None and v[0] in ("node", "iri") else None


def _quantity(view: _View | None) -> tuple[float | None, str | None]:
    if view is None:
        return None, None
    return view.number(FHIR + "value"), view.text(FHIR + "code")


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _extensions(nodes: _Nodes, resources: dict[str, dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    found = []
    for key in resources:
        for value in _View(nodes, key).all(OT + "extension"):
            view = _View(nodes, value[1])
            found.append((view.text(OT + "field") or "", view.text(OT + "jsonValue") or "null"))
    return tuple(sorted(found))


def _labels(view: _View) -> tuple[tuple[int, str], ...] | None:
    labels = []
    for value in view.all(OT + "segmentationLabel"):
        label = _View(view.nodes, value[1])
        number, meaning = label.integer(OT + "labelValue"), label.text(OT + "labelMeaning")
        if number is not None and meaning is not None:
            labels.append((number, meaning))
    return tuple(sorted(labels)) if labels else None


def _claim(view: _View | None) -> ClaimCheck | None:
    if view is None:
        return None
    return ClaimCheck(
        uri=view.text(OT + "uri") or "",
        sha256=view.text(OT + "sha256") or "",
        size=view.integer(OT + "byteSize") or 0,
        format=view.text(OT + "format"),
        content=view.text(OT + "content"),
        verified=bool(view.boolean(OT + "verified")),
    )


def _decode(nodes: _Nodes) -> DecodedObservation:
    resources = {k: n for k, n in nodes.items() if PROV + "wasDerivedFrom" in n["props"]}
    if not resources:
        raise DecodeError("no resource with prov:wasDerivedFrom: not the graph of a normalized event")

    def pick(resource_type: str) -> _View | None:
        for k, n in resources.items():
            if FHIR + resource_type in n["types"]:
                return _View(nodes, k)
        return None

    obs, study = pick("Observation"), pick("ImagingStudy")
    procedure, medication = pick("Procedure"), pick("MedicationAdministration")
    primary = obs or study or procedure or medication
    if primary is None:
        raise DecodeError("no Observation, ImagingStudy, Procedure or MedicationAdministration in the graph")
    derived = primary.text(PROV + "wasDerivedFrom") or ""
    if not derived.startswith(EVENT_PREFIX):
        raise DecodeError(f"prov:wasDerivedFrom {derived!r} is not an event IRI (urn:uuid:...)")
    subject = primary.child(FHIR + "subject")
    patient_id = subject.text(OT + "pseudonym") if subject is not None else None
    if not patient_id:
        raise DecodeError("the subject has no ot:pseudonym")
    kind = primary.text(OT + "eventKind") or ""
    common: dict[str, Any] = {
        "event_id": derived[len(EVENT_PREFIX):],
        "patient_id": patient_id,
        "kind": kind,
        "schema_version": primary.text(OT + "schemaVersion"),
        "source_topic": primary.text(OT + "sourceTopic"),
        "source_partition": primary.integer(OT + "sourcePartition"),
        "source_offset": primary.integer(OT + "sourceOffset"),
        "recorded_at": _time(primary.text(FHIR + "issued") or primary.text(OT + "recordedAt")),
        "extensions": _extensions(nodes, resources),
    }
    if kind == "treatment":
        return _treatment(procedure or medication, common)  # type: ignore[arg-type]
    fields: dict[str, Any] = {}
    if study is not None:
        spacing = tuple(study.number(OT + f"voxelSpacing{a}") for a in "XYZ")
        fields.update(
            modality_code=study.text(FHIR + "modality"),
            modality=study.text(OT + "dicomModality"),
            study_uid=study.text(OT + "studyInstanceUid"),
            series_uid=study.text(OT + "seriesInstanceUid"),
            voxel_spacing_mm=spacing if all(v is not None for v in spacing) else None,
            dicom=_claim(study.child(OT + "dicom")),
            # A study with no measure derived from it is the resource the claim checks are on.
            segmentation=_claim(study.child(OT + "segmentation")),
            density_map=_claim(study.child(OT + "densityMap")),
            tissue_map=_claim(study.child(OT + "tissueMap")),
            segmentation_labels=_labels(study),
            label_convention=study.text(OT + "labelConvention"),
        )
    time_text = (obs or study).text(FHIR + "effectiveDateTime") if obs else study.text(FHIR + "started")  # type: ignore[union-attr]
    value = unit = reported_value = reported_unit = None
    code = ""
    if obs is not None:
        code = obs.text(FHIR + "code") or ""
        quantity = obs.child(FHIR + "valueQuantity")
        value, unit = _quantity(quantity)
        reported_value, reported_unit = _quantity(obs.child(OT + "reportedQuantity"))
        centroid = tuple(obs.number(OT + f"centroid{a}") for a in "XYZ")
        fields.update(
            segmentation=_claim(obs.child(OT + "segmentation")) or fields.get("segmentation"),
            segmentation_labels=_labels(obs) or fields.get("segmentation_labels"),
            label_convention=obs.text(OT + "labelConvention") or fields.get("label_convention"),
            density_map=_claim(obs.child(OT + "densityMap")) or fields.get("density_map"),
            tissue_map=_claim(obs.child(OT + "tissueMap")) or fields.get("tissue_map"),
            centroid_mm=centroid if all(v is not None for v in centroid) else None,
            comparator=quantity.text(FHIR + "comparator") if quantity is not None else None,
            below_lod=bool(obs.boolean(OT + "belowDetectionLimit")),
            detection_limit=_quantity(obs.child(OT + "detectionLimit"))[0],
            assay_reading=_quantity(obs.child(OT + "assayReading"))[0],
        )
        if kind == "imaging":
            fields["volume_ml"] = value
        if kind == "ctdna":
            fields["ctdna_measure"] = obs.text(OT + "ctdnaMeasure")
            for component in obs.all(FHIR + "component"):
                view = _View(nodes, component[1])
                which = view.text(FHIR + "code")
                if which == GENE_STUDIED:
                    fields["gene"] = view.text(FHIR + "valueString")
                elif which == GENETIC_VARIANT:
                    fields["variant_hgvs"] = view.text(FHIR + "valueString")
    elif study is not None:
        code = study.text(FHIR + "modality") or ""
    if not time_text:
        raise DecodeError("the resource has no event time")
    return DecodedObservation(
        **common,
        time=_time(time_text),  # type: ignore[arg-type]  (not empty: checked above)
        resource_type="Observation" if obs is not None else "ImagingStudy",
        code=code,
        value=value,
        unit=unit,
        reported_value=reported_value,
        reported_unit=reported_unit,
        **fields,
    )


def _treatment(resource: _View, common: dict[str, Any]) -> DecodedObservation:
    types = resource.node["types"]
    treatment_type = next((t for c, t in _TREATMENT_TYPES.items() if c in types), None)
    if FHIR + "MedicationAdministration" in types:
        dosage = resource.child(FHIR + "dosage")
        dose, dose_unit = _quantity(dosage.child(FHIR + "dose") if dosage is not None else None)
        time_text = resource.text(FHIR + "effectiveDateTime")
        code = resource.text(FHIR + "category") or ""
        codes = tuple(sorted({str(v[1]) for v in resource.all(FHIR + "medicationCodeableConcept") if v[0] == "iri"}))
        rx = next((c for c in codes if c.startswith(RXNORM)), None)
        extra: dict[str, Any] = {
            "drug_name": resource.text(OT + "drugName"),
            "rxnorm": rx[len(RXNORM):] if rx else None,
            "drug_codes": codes,
            "route": dosage.text(FHIR + "route") if dosage is not None else None,
            "body_weight_kg": _quantity(resource.child(OT + "bodyWeight"))[0],
            "body_surface_area_m2": _quantity(resource.child(OT + "bodySurfaceArea"))[0],
            "total_dose_mg": _quantity(resource.child(OT + "totalDose"))[0],
            "cycle": resource.integer(OT + "cycle"),
            "cycles_planned": resource.integer(OT + "cyclesPlanned"),
            "day_of_cycle": resource.integer(OT + "dayOfCycle"),
            "cycle_length_days": resource.number(OT + "cycleLengthDays"),
        }
        resource_type = "MedicationAdministration"
    else:
        dose, dose_unit = _quantity(resource.child(OT + "dose"))
        time_text = resource.text(FHIR + "performedDateTime")
        code = resource.text(FHIR + "code") or ""
        extra = {
            "fraction_number": resource.integer(OT + "fractionNumber"),
            "fractions_planned": resource.integer(OT + "fractionsPlanned"),
            "target": resource.text(OT + "target"),
            "resection_mask": _claim(resource.child(OT + "resectionMask")),
        }
        resource_type = "Procedure"
    reported_value, reported_unit = _quantity(resource.child(OT + "reportedQuantity"))
    if not time_text:
        raise DecodeError("the treatment has no event time")
    return DecodedObservation(
        **common,
        time=_time(time_text),  # type: ignore[arg-type]  (not empty: checked above)
        resource_type=resource_type,
        code=code,
        value=dose,
        unit=dose_unit,
        reported_value=reported_value,
        reported_unit=reported_unit,
        treatment_type=treatment_type,
        dose=dose,
        dose_unit=dose_unit,
        planned=resource.boolean(OT + "planned"),
        regimen=resource.text(OT + "regimen"),
        line_of_therapy=resource.integer(OT + "lineOfTherapy"),
        **extra,
    )
