"""Published observations (JSON-LD or any RDF graph of one event) back to typed records.

``decode_jsonld`` reads the JSON-LD the normalizer publishes without an RDF library (the
worker's hot path); ``decode_graph`` reads the same facts from an rdflib graph (from the RDF
store, or JSON-LD that another tool re-serialized). Both go through one decoder, so they agree.
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
    # treatment
    treatment_type: str | None = None  # radiotherapy, chemotherapy, surgery
    dose: float | None = None
    dose_unit: str | None = None
    drug_name: str | None = None
    rxnorm: str | None = None
    fraction_number: int | None = None
    planned: bool | None = None
    resection_mask: ClaimCheck | None = None


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
        )
    time_text = (obs or study).text(FHIR + "effectiveDateTime") if obs else study.text(FHIR + "started")  # type: ignore[union-attr]
    value = unit = reported_value = reported_unit = None
    code = ""
    if obs is not None:
        code = obs.text(FHIR + "code") or ""
        value, unit = _quantity(obs.child(FHIR + "valueQuantity"))
        reported_value, reported_unit = _quantity(obs.child(OT + "reportedQuantity"))
        centroid = tuple(obs.number(OT + f"centroid{a}") for a in "XYZ")
        fields.update(
            segmentation=_claim(obs.child(OT + "segmentation")),
            density_map=_claim(obs.child(OT + "densityMap")),
            tissue_map=_claim(obs.child(OT + "tissueMap")),
            centroid_mm=centroid if all(v is not None for v in centroid) else None,
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
        time=datetime.fromisoformat(time_text.replace("Z", "+00:00")),
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
        rx = resource.text(FHIR + "medicationCodeableConcept")
        extra: dict[str, Any] = {
            "drug_name": resource.text(OT + "drugName"),
            "rxnorm": rx[len(RXNORM):] if rx and rx.startswith(RXNORM) else None,
        }
        resource_type = "MedicationAdministration"
    else:
        dose, dose_unit = _quantity(resource.child(OT + "dose"))
        time_text = resource.text(FHIR + "performedDateTime")
        code = resource.text(FHIR + "code") or ""
        extra = {
            "fraction_number": resource.integer(OT + "fractionNumber"),
            "resection_mask": _claim(resource.child(OT + "resectionMask")),
        }
        resource_type = "Procedure"
    reported_value, reported_unit = _quantity(resource.child(OT + "reportedQuantity"))
    if not time_text:
        raise DecodeError("the treatment has no event time")
    return DecodedObservation(
        **common,
        time=datetime.fromisoformat(time_text.replace("Z", "+00:00")),
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
        **extra,
    )
