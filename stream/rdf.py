"""One small RDF graph per event, and its JSON-LD, built without an RDF library on the hot path.

An event becomes a FHIR-shaped resource (``fhir:`` = <http://hl7.org/fhir/>): an Observation for
lab, ctDNA and imaging measures (with an ImagingStudy for the scan itself), a Procedure for a
radiotherapy fraction or a surgery, a MedicationAdministration for chemotherapy. Resource types
and element names follow FHIR R4; values are plain typed literals and codes are ontology IRIs
(``fhir:code loinc:2857-1``), not FHIR RDF's ``fhir:value`` wrappers and Coding nodes, so that
SPARQL over a patient's history stays short. Quantities keep FHIR's shape (value, unit, UCUM
system and code) in the term's canonical unit; the value as reported, when it differs, is kept
beside it (``ot:reportedQuantity``).

Every resource carries its provenance: ``prov:wasDerivedFrom <urn:uuid:EVENT_ID>`` (the event;
also the name of the event's graph in N-Quads), the feed, the event kind and schema version
(as sent), when the feed recorded it (``fhir:issued`` on an Observation, ``ot:recordedAt``
elsewhere), and the Kafka topic, partition and offset of the record it came from.

Fields the contract does not name (extensions, ``schemas.events.extensions``) are kept on the
event's primary resource: ``ot:extension [ a ot:Extension ; ot:field "body.phase" ;
ot:jsonValue "\"concurrent\""^^rdf:JSON ]``, the field's path and its value as JSON text.
A censored result's quantity carries ``fhir:comparator`` (FHIR Quantity.comparator).

A graph is held as a tree of ``Node``s (resources with nested blank nodes) and emitted from that
one tree as JSON-LD (published), rdflib triples (pyshacl and tests), N-Quads (the event's named
graph) and the RDF store's N-Triples (blank nodes skolemized, see ``EventGraph.ntriples``). A
test parses the JSON-LD with rdflib and checks it is isomorphic to the triples, so they cannot
drift apart.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import orjson

from schemas import NAMESPACES

FHIR = "http://hl7.org/fhir/"
LOINC = NAMESPACES["loinc"]
SCT = NAMESPACES["snomed"]
NCIT = NAMESPACES["ncit"]
OTC = NAMESPACES["local"]  # the local code system of the term table
OT = "https://w3id.org/oncotwin/ns#"  # our own properties and classes
PROV = "http://www.w3.org/ns/prov#"
XSD = "http://www.w3.org/2001/XMLSchema#"
RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
RXNORM = NAMESPACES["rxnorm"]
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category#"
UCUM = "http://unitsofmeasure.org"

RESOURCE_BASE = "https://w3id.org/oncotwin/fhir/"
PATIENT_BASE = RESOURCE_BASE + "Patient/"
EVENT_PREFIX = "urn:uuid:"
# Skolem IRIs (RDF 1.1 §3.5) that stand for an event's blank nodes in the RDF store.
GENID_BASE = "https://w3id.org/oncotwin/.well-known/genid/"

RDF_JSON = "http://www.w3.org/1999/02/22-rdf-syntax-ns#JSON"  # RDF 1.1 JSON-LD's JSON literal
XSD_DOUBLE = XSD + "double"
XSD_DATETIME = XSD + "dateTime"
XSD_ANYURI = XSD + "anyURI"

PREFIXES: Mapping[str, str] = {
    "fhir": FHIR,
    "loinc": LOINC,
    "sct": SCT,
    "ncit": NCIT,
    "otc": OTC,
    "ot": OT,
    "prov": PROV,
    "xsd": XSD,
    "rxnorm": RXNORM,
    "obscat": OBS_CATEGORY,
}
# Inline, so that a reader never fetches a remote context.
CONTEXT: dict[str, str] = dict(PREFIXES)

CONTENT_TYPE_JSONLD = "application/ld+json"

# LOINC codes of the ctDNA components (gene studied, discrete genetic variant).
GENE_STUDIED = LOINC + "48018-6"
GENETIC_VARIANT = LOINC + "81252-9"


class Iri(str):
    """An IRI value (a plain ``str`` value is an xsd:string literal)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Lit:
    """A typed literal given by its lexical form."""

    lex: str
    datatype: str


Value = Union[Iri, Lit, str, int, bool, "Node"]


@dataclass(slots=True)
class Node:
    """A resource (``iri`` set) or a blank node (``iri`` None) with its types and properties."""

    iri: str | None
    types: tuple[str, ...] = ()
    props: list[tuple[str, Value]] = field(default_factory=list)

    def add(self, predicate: str, value: Value | None) -> Node:
        if value is not None:
            self.props.append((predicate, value))
        return self

    def values(self, predicate: str) -> list[Value]:
        return [v for p, v in self.props if p == predicate]

    def first(self, predicate: str) -> Value | None:
        for p, v in self.props:
            if p == predicate:
                return v
        return None


def double(value: float) -> Lit:
    """An xsd:double literal; repr() gives the shortest lexical form that reads back exactly."""
    if math.isnan(value):
        lex = "NaN"
    elif math.isinf(value):
        lex = "INF" if value > 0 else "-INF"
    else:
        lex = repr(float(value))
    return Lit(lex, XSD_DOUBLE)


def date_time(text: str) -> Lit:
    return Lit(text, XSD_DATETIME)


def any_uri(text: str) -> Lit:
    return Lit(text, XSD_ANYURI)


def patient_iri(pseudonym: str) -> str:
    return PATIENT_BASE + pseudonym


def resource_iri(resource_type: str, event_id: str) -> str:
    return f"{RESOURCE_BASE}{resource_type}/{event_id}"


def event_iri(event_id: str) -> str:
    return EVENT_PREFIX + event_id


# -- the graph of one event ---------------------------------------------------------------


@dataclass(slots=True)
class EventGraph:
    """The RDF of one event: its resources (the first is the primary one) and their subject."""

    event_id: str
    patient_id: str
    kind: str
    resources: list[Node]

    @property
    def graph_iri(self) -> str:
        """Name of the event's graph in the RDF store (the event's own IRI)."""
        return event_iri(self.event_id)

    @property
    def primary(self) -> Node:
        return self.resources[0]

    def nodes(self) -> Iterator[Node]:
        """Every node, resources and blank nodes, parents before children."""
        stack = list(reversed(self.resources))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(v for _, v in reversed(node.props) if isinstance(v, Node))

    def jsonld(self) -> dict[str, Any]:
        return {"@context": CONTEXT, "@graph": [_jsonld_node(n) for n in self.resources]}

    def jsonld_bytes(self) -> bytes:
        """Compact UTF-8 JSON (the bytes ``json.dumps(..., separators=(",", ":"),
        ensure_ascii=False)`` would give, several times faster)."""
        return orjson.dumps(self.jsonld())

    def triples(self) -> list[tuple[Any, Any, Any]]:
        """rdflib triples (imported lazily: the hot path needs rdflib only for SHACL)."""
        return list(_rdflib_triples(self.resources))

    def nquads(self) -> str:
        """N-Quads of the graph in the event's named graph, blank nodes labelled from the event
        id. Raises ValueError for an IRI that N-Quads cannot carry."""
        end = f" {_nq_iri(self.graph_iri)} .\n"
        return _nquads(self.resources, end, "_:e" + self.event_id.replace("-", "") + "b", "")

    def ntriples(self) -> str:
        """N-Triples of the graph as the RDF store keeps it (in its default graph): each blank
        node becomes a skolem IRI made from the event id and the node's place in the tree, so
        that the same event always gives the same triples and loading it again adds nothing.
        Raises ValueError for an IRI that N-Triples cannot carry."""
        return _nquads(self.resources, " .\n", f"<{GENID_BASE}{self.event_id}/b", ">")


# -- JSON-LD ------------------------------------------------------------------------------

_COMPACT_CACHE: dict[str, str] = {}
# Longest namespace first, so that a namespace nested in another one wins. JSON-LD 1.1 reads
# "p:x" as a compact IRI only where p's IRI ends in a gen-delim (":/?#[]@"): NCIt's
# ".../NCIT_" does not, so its IRIs are written whole (a reader would take "ncit:C376" for an
# absolute IRI of scheme "ncit").
_PREFIX_ORDER = sorted(((p, ns) for p, ns in PREFIXES.items() if ns[-1] in ":/?#[]@"), key=lambda kv: -len(kv[1]))


def compact(iri: str) -> str:
    """``prefix:local`` for an IRI in one of our namespaces, else the IRI itself."""
    cached = _COMPACT_CACHE.get(iri)
    if cached is not None:
        return cached
    out = iri
    for prefix, namespace in _PREFIX_ORDER:
        if iri.startswith(namespace) and len(iri) > len(namespace):
            local = iri[len(namespace):]
            # A local part starting with "//" would read as a scheme-relative IRI.
            if not local.startswith("//"):
                out = f"{prefix}:{local}"
            break
    if len(_COMPACT_CACHE) < 100_000:
        _COMPACT_CACHE[iri] = out
    return out


def expand(curie_or_iri: str) -> str:
    """Inverse of ``compact`` for the prefixes of ``CONTEXT``."""
    prefix, sep, local = curie_or_iri.partition(":")
    if sep and prefix in PREFIXES and not local.startswith("//"):
        return PREFIXES[prefix] + local
    return curie_or_iri


def _jsonld_value(value: Value) -> Any:
    if isinstance(value, Node):
        return _jsonld_node(value)
    if isinstance(value, Iri):
        return {"@id": compact(value)}
    if isinstance(value, Lit):
        return {"@value": value.lex, "@type": compact(value.datatype)}
    if isinstance(value, (str, bool, int)):
        return value  # JSON-LD reads these as xsd:string, xsd:boolean, xsd:integer
    raise TypeError(f"not an RDF value: {type(value).__name__}")


def _jsonld_node(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if node.iri is not None:
        out["@id"] = node.iri
    if node.types:
        out["@type"] = [compact(t) for t in node.types]
    compacted = _COMPACT_CACHE.get
    for predicate, value in node.props:
        key = compacted(predicate) or compact(predicate)
        # The common kinds of value inline, by exact type (Iri is a str, bool an int);
        # anything else takes _jsonld_value, which says what it does with it.
        cls = type(value)
        if cls is str or cls is int or cls is bool:
            converted = value
        elif cls is Lit:
            converted = {"@value": value.lex, "@type": compacted(value.datatype) or compact(value.datatype)}
        elif cls is Iri:
            converted = {"@id": compacted(value) or compact(value)}
        else:
            converted = _jsonld_value(value)
        existing = out.get(key)
        if existing is None:
            out[key] = converted
        elif isinstance(existing, list):
            existing.append(converted)
        else:
            out[key] = [existing, converted]
    return out


# -- rdflib -------------------------------------------------------------------------------


def _rdflib_triples(resources: Sequence[Node]) -> Iterator[tuple[Any, Any, Any]]:
    from rdflib import BNode, Literal, URIRef  # noqa: PLC0415

    type_ref = URIRef(RDF_TYPE)
    refs: dict[str, URIRef] = {}

    def ref(iri: str) -> URIRef:
        r = refs.get(iri)
        if r is None:
            r = refs[iri] = URIRef(iri)
        return r

    def subject(node: Node, ids: dict[int, Any]) -> Any:
        s = ids.get(id(node))
        if s is None:
            s = ids[id(node)] = ref(node.iri) if node.iri is not None else BNode()
        return s

    ids: dict[int, Any] = {}
    stack = list(reversed(resources))
    while stack:
        node = stack.pop()
        s = subject(node, ids)
        for t in node.types:
            yield s, type_ref, ref(t)
        for predicate, value in node.props:
            if isinstance(value, Node):
                o: Any = subject(value, ids)
                stack.append(value)
            elif isinstance(value, Iri):
                o = ref(value)
            elif isinstance(value, Lit):
                o = Literal(value.lex, datatype=ref(value.datatype))
            elif isinstance(value, (str, bool, int)):
                o = Literal(value)
            else:
                raise TypeError(f"not an RDF value: {type(value).__name__}")
            yield s, ref(predicate), o


# -- N-Quads (the RDF store) ---------------------------------------------------------------

# Characters IRIREF excludes (N-Quads): an IRI holding one would fail the store's whole batch,
# so it is refused while the event can still be dead-lettered.
_BAD_IRI = re.compile(r'[\x00-\x20<>"{}|^`\\]')
_IRI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_NEEDS_ESCAPE = re.compile(r'["\\\n\r]')
_IRI_OK: dict[str, str] = {}


def _nq_iri(iri: str) -> str:
    """``<iri>``, checked once per distinct IRI (codes and namespaces repeat across events)."""
    cached = _IRI_OK.get(iri)
    if cached is not None:
        return cached
    if _BAD_IRI.search(iri) or not _IRI_SCHEME.match(iri):
        raise ValueError(f"not an absolute IRI that N-Quads can carry: {iri[:120]!r}")
    out = f"<{iri}>"
    if len(_IRI_OK) < 100_000:
        _IRI_OK[iri] = out
    return out


def _nq_literal(lex: str, datatype: str | None = None) -> str:
    if _NEEDS_ESCAPE.search(lex):
        lex = lex.translate(_LITERAL_ESCAPES)
    if datatype is None:
        return f'"{lex}"'
    return f'"{lex}"^^{_nq_iri(datatype)}'


_XSD_BOOLEAN = XSD + "boolean"
_XSD_INTEGER = XSD + "integer"


def _nquads(resources: Sequence[Node], end: str, bnode_open: str, bnode_close: str) -> str:
    """Lines ending in ``end`` (the graph and the dot, or the dot); blank node number n is
    written ``bnode_open + n + bnode_close``."""
    type_ref = _nq_iri(RDF_TYPE)
    checked = _IRI_OK.get  # IRIs seen before need no check (_nq_iri)
    lines: list[str] = []
    ids: dict[int, str] = {}

    def subject(node: Node) -> str:
        s = ids.get(id(node))
        if s is None:
            s = ids[id(node)] = _nq_iri(node.iri) if node.iri is not None else f"{bnode_open}{len(ids)}{bnode_close}"
        return s

    stack = list(reversed(resources))
    while stack:
        node = stack.pop()
        s = subject(node)
        for t in node.types:
            lines.append(f"{s} {type_ref} {checked(t) or _nq_iri(t)}{end}")
        for predicate, value in node.props:
            # The common kinds of value inline, by exact type (Iri is a str, bool an int);
            # anything else takes _nq_object, which says what it does with it.
            cls = type(value)
            if cls is str:
                o = f'"{value.translate(_LITERAL_ESCAPES)}"' if _NEEDS_ESCAPE.search(value) else f'"{value}"'
            elif cls is Lit:
                lex, datatype = value.lex, value.datatype
                if _NEEDS_ESCAPE.search(lex):
                    lex = lex.translate(_LITERAL_ESCAPES)
                o = f'"{lex}"^^{checked(datatype) or _nq_iri(datatype)}' if datatype is not None else f'"{lex}"'
            elif cls is Iri:
                o = checked(value) or _nq_iri(value)
            elif isinstance(value, Node):
                o = subject(value)
                stack.append(value)
            else:
                o = _nq_object(value)
            lines.append(f"{s} {checked(predicate) or _nq_iri(predicate)} {o}{end}")
    return "".join(lines)


def _nq_object(value: Value) -> str:
    """The N-Quads object of a value that is not a Node."""
    if isinstance(value, Iri):
        return _nq_iri(value)
    if isinstance(value, Lit):
        return _nq_literal(value.lex, value.datatype)
    if isinstance(value, bool):
        return _nq_literal("true" if value else "false", _XSD_BOOLEAN)
    if isinstance(value, int):
        return _nq_literal(str(value), _XSD_INTEGER)
    if isinstance(value, str):
        return _nq_literal(value)
    raise TypeError(f"not an RDF value: {type(value).__name__}")


# -- building from a normalized event -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where the event came from: the Kafka record it was read from."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ClaimCheckFacts:
    """A claim check as resolved: where it points and whether its bytes were verified."""

    uri: str
    sha256: str
    size: int
    format: str | None = None
    content: str | None = None
    verified: bool = False


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What the normalizer learnt from an event's files (stream.imaging): resolved claim checks
    and the measures derived from a segmentation or density map."""

    volume_ml: float | None = None  # from the segmentation (None: no segmentation read)
    centroid_mm: tuple[float, float, float] | None = None
    centroid_source: str | None = None  # "segmentation" or "density"
    dicom: ClaimCheckFacts | None = None
    segmentation: ClaimCheckFacts | None = None
    density_map: ClaimCheckFacts | None = None
    tissue_map: ClaimCheckFacts | None = None  # anatomy labels registered to the study
    resection_mask: ClaimCheckFacts | None = None
    # What each label of the segmentation means, as read (stream.imaging.segmentation_labels):
    # ((label, meaning), ...) by label, and how that was decided: "explicit" (the event's
    # segmentation_labels), "brats" (the BraTS convention), "binary" (one tumour label) or
    # "soft" (a soft mask, no labels); None when no segmentation was read.
    segmentation_labels: tuple[tuple[int, str], ...] | None = None
    label_convention: str | None = None


def unverified(claim: Mapping[str, Any] | None) -> ClaimCheckFacts | None:
    """A claim check of the event as it was sent, not resolved."""
    if claim is None:
        return None
    return ClaimCheckFacts(
        uri=claim["uri"], sha256=claim["sha256"], size=int(claim["size"]),
        format=claim.get("format"), content=claim.get("content"), verified=False,
    )


# Predicates and constant values of the builders below, spelled once rather than concatenated
# for every event.
_QUANTITY_TYPES = (FHIR + "Quantity",)
_FHIR_VALUE, _FHIR_UNIT, _FHIR_SYSTEM, _FHIR_CODE = FHIR + "value", FHIR + "unit", FHIR + "system", FHIR + "code"
_UCUM_IRI = Iri(UCUM)


def _quantity(value: float, unit: str, comparator: str | None = None) -> Node:
    node = Node(
        None,
        _QUANTITY_TYPES,
        [(_FHIR_VALUE, double(value)), (_FHIR_UNIT, unit), (_FHIR_SYSTEM, _UCUM_IRI), (_FHIR_CODE, unit)],
    )
    if comparator is not None:
        node.props.append((_FHIR_COMPARATOR, comparator))
    return node


_FHIR_COMPARATOR = FHIR + "comparator"
_EXTENSION_TYPES = (OT + "Extension",)
_OT_EXTENSION, _OT_FIELD, _OT_JSON_VALUE = OT + "extension", OT + "field", OT + "jsonValue"


def _extensions(node: Node, event: Mapping[str, Any]) -> None:
    """The event's extensions (path -> value, schemas.normalize_event) on its primary resource."""
    for path, value in (event.get("extensions") or {}).items():
        try:
            text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:  # an integer beyond 64 bits, which orjson does not write
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        node.add(_OT_EXTENSION, Node(None, _EXTENSION_TYPES, [(_OT_FIELD, path), (_OT_JSON_VALUE, Lit(text, RDF_JSON))]))


def _claim_check(facts: ClaimCheckFacts) -> Node:
    node = Node(None, (OT + "ClaimCheck",))
    node.add(OT + "uri", any_uri(facts.uri))
    node.add(OT + "sha256", facts.sha256.lower())
    node.add(OT + "byteSize", int(facts.size))
    node.add(OT + "format", facts.format)
    node.add(OT + "content", facts.content)
    node.add(OT + "verified", bool(facts.verified))
    return node


_PROVENANCE = (
    PROV + "wasDerivedFrom", OT + "eventKind", OT + "schemaVersion", OT + "feed",
    OT + "sourceTopic", OT + "sourcePartition", OT + "sourceOffset",
)


def _provenance(node: Node, event: Mapping[str, Any], source: Provenance) -> None:
    derived = Iri(event_iri(event["event_id"]))
    kind, version, feed, topic = event["kind"], event["schema_version"], event["source"], source.topic
    pairs = zip(_PROVENANCE, (derived, kind, version, feed, topic, int(source.partition), int(source.offset)))
    if kind is None or version is None or feed is None or topic is None:
        node.props.extend((p, v) for p, v in pairs if v is not None)  # as Node.add: None adds nothing
    else:
        node.props.extend(pairs)


_PATIENT_TYPES = (FHIR + "Patient",)
_PSEUDONYM = OT + "pseudonym"


def _patient(pseudonym: str) -> Node:
    return Node(patient_iri(pseudonym), _PATIENT_TYPES, [(_PSEUDONYM, pseudonym)])


def _reported(node: Node, quantity: Mapping[str, Any]) -> None:
    """Keep the value as reported when the canonical one differs from it."""
    if quantity["unit"] != quantity["canonical_unit"] or float(quantity["value"]) != float(quantity["canonical_value"]):
        reported = _quantity(float(quantity["value"]), quantity["unit"], quantity.get("comparator"))
        node.add(OT + "reportedQuantity", reported)


def _censoring(obs: Node, body: Mapping[str, Any]) -> None:
    """A result's limit of detection, whether nothing was detected at it, the assay's reading."""
    if body.get("below_lod") is True:
        obs.add(OT + "belowDetectionLimit", True)
    if "canonical_lod" in body:
        obs.add(OT + "detectionLimit", _quantity(float(body["canonical_lod"]), body["canonical_unit"]))
    if "canonical_reading" in body:
        obs.add(OT + "assayReading", _quantity(float(body["canonical_reading"]), body["canonical_unit"]))


def _observation(event: Mapping[str, Any], code_iri: str, category: str, source: Provenance) -> Node:
    obs = Node(resource_iri("Observation", event["event_id"]), (FHIR + "Observation",))
    obs.add(FHIR + "status", "final")
    obs.add(FHIR + "category", Iri(OBS_CATEGORY + category))
    obs.add(FHIR + "code", Iri(code_iri))
    obs.add(FHIR + "subject", Iri(patient_iri(event["patient_id"])))
    obs.add(FHIR + "effectiveDateTime", date_time(event["occurred_at"]))
    obs.add(FHIR + "issued", date_time(event["recorded_at"]))
    return obs


_OT_RECORDED_AT = OT + "recordedAt"


def build_event_graph(
    event: Mapping[str, Any],
    source: Provenance,
    files: FileFacts | None = None,
) -> EventGraph:
    """The graph of a validated event normalized by ``schemas.normalize_event``.

    ``files`` carries what was derived from the event's files; without it the volume is the
    one the event reports and its claim checks are recorded as sent, unverified.
    """
    files = files or FileFacts()
    kind = event["kind"]
    body = event["body"]
    patient = _patient(event["patient_id"])
    if kind in ("lab", "ctdna"):
        obs = _observation(event, body["term_iri"], "laboratory", source)
        obs.add(FHIR + "valueQuantity", _quantity(float(body["canonical_value"]), body["canonical_unit"], body.get("comparator")))
        _reported(obs, body)
        _censoring(obs, body)
        if kind == "lab":
            obs.add(OT + "specimen", body.get("specimen"))
            obs.add(FHIR + "method", body.get("method"))
        else:
            obs.add(OT + "ctdnaMeasure", body["measure"])
            if body.get("gene"):
                obs.add(FHIR + "component", Node(None, (OT + "Component",), [(FHIR + "code", Iri(GENE_STUDIED)), (FHIR + "valueString", body["gene"])]))
            if body.get("variant_hgvs"):
                obs.add(
                    FHIR + "component",
                    Node(None, (OT + "Component",), [(FHIR + "code", Iri(GENETIC_VARIANT)), (FHIR + "valueString", body["variant_hgvs"])]),
                )
            obs.add(FHIR + "method", body.get("assay"))
        _provenance(obs, event, source)
        _extensions(obs, event)
        return EventGraph(event["event_id"], event["patient_id"], kind, [obs, patient])
    if kind == "imaging":
        return _imaging_graph(event, source, files, patient)
    if kind == "treatment":
        node = _treatment(event, source, files)
        _extensions(node, event)
        return EventGraph(event["event_id"], event["patient_id"], kind, [node, patient])
    raise ValueError(f"unknown event kind {kind!r}")


def _imaging_graph(event: Mapping[str, Any], source: Provenance, facts: FileFacts, patient: Node) -> EventGraph:
    body = event["body"]
    eid = event["event_id"]
    study = Node(resource_iri("ImagingStudy", eid), (FHIR + "ImagingStudy",))
    study.add(FHIR + "status", "available")
    study.add(FHIR + "subject", Iri(patient_iri(event["patient_id"])))
    study.add(FHIR + "started", date_time(event["occurred_at"]))
    study.add(_OT_RECORDED_AT, date_time(event["recorded_at"]))
    study.add(FHIR + "modality", Iri(body["term_iri"]))
    study.add(OT + "dicomModality", body["modality"])
    study.add(OT + "studyInstanceUid", body["study_uid"])
    study.add(OT + "seriesInstanceUid", body.get("series_uid"))  # a study may come without one
    sx, sy, sz = (float(v) for v in body["voxel_spacing_mm"])
    study.add(OT + "voxelSpacingX", double(sx))
    study.add(OT + "voxelSpacingY", double(sy))
    study.add(OT + "voxelSpacingZ", double(sz))
    dicom = facts.dicom or unverified(body.get("dicom_uri"))
    if dicom is not None:
        study.add(OT + "dicom", _claim_check(dicom))
    _provenance(study, event, source)
    resources = [study]

    reported = body.get("measures", {}).get("tumor_volume")
    if facts.volume_ml is not None or reported is not None:
        obs = _observation(event, OTC + "tumor-volume", "imaging", source)
        obs.add(FHIR + "derivedFrom", Iri(study.iri or ""))
        if facts.volume_ml is not None:
            obs.add(FHIR + "valueQuantity", _quantity(facts.volume_ml, "mL"))
            obs.add(OT + "valueSource", "segmentation")
            if reported is not None:
                obs.add(OT + "reportedQuantity", _quantity(float(reported["value"]), reported["unit"]))
        else:
            assert reported is not None
            obs.add(FHIR + "valueQuantity", _quantity(float(reported["canonical_value"]), reported["canonical_unit"]))
            obs.add(OT + "valueSource", "reported")
            _reported(obs, reported)
        if facts.centroid_mm is not None:
            cx, cy, cz = facts.centroid_mm
            obs.add(OT + "centroidX", double(cx))
            obs.add(OT + "centroidY", double(cy))
            obs.add(OT + "centroidZ", double(cz))
            obs.add(OT + "centroidSource", facts.centroid_source)
        _provenance(obs, event, source)
        resources.insert(0, obs)
    segmentation = facts.segmentation or unverified(body.get("segmentation_uri"))
    if segmentation is not None:
        resources[0].add(OT + "segmentation", _claim_check(segmentation))
    labels, convention = facts.segmentation_labels, facts.label_convention
    if labels is None and body.get("segmentation_labels"):  # the file was not read: as sent
        labels, convention = tuple(sorted(body["segmentation_labels"].items())), "explicit"
    for label, meaning in labels or ():
        resources[0].add(OT + "segmentationLabel", Node(None, _LABEL_TYPES, [(_OT_LABEL_VALUE, int(label)), (_OT_LABEL_MEANING, meaning)]))
    resources[0].add(OT + "labelConvention", convention)
    density = facts.density_map or unverified(body.get("measures", {}).get("cellularity_map_uri"))
    if density is not None:
        resources[0].add(OT + "densityMap", _claim_check(density))
    tissue = facts.tissue_map or unverified(body.get("measures", {}).get("tissue_map_uri"))
    if tissue is not None:
        resources[0].add(OT + "tissueMap", _claim_check(tissue))
    _extensions(resources[0], event)
    resources.append(patient)
    return EventGraph(eid, event["patient_id"], "imaging", resources)


_LABEL_TYPES = (OT + "SegmentationLabel",)
_OT_LABEL_VALUE, _OT_LABEL_MEANING = OT + "labelValue", OT + "labelMeaning"


_TREATMENT_CLASS = {"radiotherapy": OT + "RadiotherapyFraction", "surgery": OT + "Surgery"}
_MEDICATION_TYPES = (FHIR + "MedicationAdministration",)
_PROCEDURE_TYPES = {kind: (FHIR + "Procedure", cls) for kind, cls in _TREATMENT_CLASS.items()}
_FHIR_STATUS, _FHIR_CATEGORY, _FHIR_SUBJECT = FHIR + "status", FHIR + "category", FHIR + "subject"
_FHIR_EFFECTIVE, _FHIR_PERFORMED = FHIR + "effectiveDateTime", FHIR + "performedDateTime"
_FHIR_MEDICATION, _FHIR_DOSE, _FHIR_ROUTE, _FHIR_DOSAGE = (
    FHIR + "medicationCodeableConcept", FHIR + "dose", FHIR + "route", FHIR + "dosage",
)
_OT_DRUG_NAME, _OT_DOSE, _OT_REPORTED, _OT_PLANNED = OT + "drugName", OT + "dose", OT + "reportedQuantity", OT + "planned"
_OT_FRACTION_NUMBER, _OT_FRACTIONS_PLANNED, _OT_TARGET = OT + "fractionNumber", OT + "fractionsPlanned", OT + "target"
# Course facts: body field -> predicate (integers, and the regimen's name; cycle_length_days,
# a number of days, is added as an xsd:double apart).
_COURSE = {
    "cycle": OT + "cycle", "cycles_planned": OT + "cyclesPlanned", "day_of_cycle": OT + "dayOfCycle",
    "line_of_therapy": OT + "lineOfTherapy", "regimen": OT + "regimen",
}


def _treatment(event: Mapping[str, Any], source: Provenance, facts: FileFacts) -> Node:
    body = event["body"]
    eid = event["event_id"]
    planned = bool(body.get("planned", False))
    kind = body["type"]
    dose = body.get("dose")
    if kind == "chemotherapy":
        node = Node(resource_iri("MedicationAdministration", eid), _MEDICATION_TYPES)
        node.add(_FHIR_STATUS, "in-progress" if planned else "completed")
        node.add(_FHIR_CATEGORY, Iri(body["term_iri"]))
        drug = body["drug"]
        # Like a CodeableConcept's codings: the code sent and the table's other codes of it.
        for code in drug.get("codes", ()):
            node.add(_FHIR_MEDICATION, Iri(code))
        node.add(_OT_DRUG_NAME, drug.get("name"))
        node.add(_FHIR_SUBJECT, Iri(patient_iri(event["patient_id"])))
        node.add(_FHIR_EFFECTIVE, date_time(event["occurred_at"]))
        dosage = Node(None, (), [(_FHIR_DOSE, _quantity(float(dose["canonical_value"]), dose["canonical_unit"]))])
        dosage.add(_FHIR_ROUTE, body.get("route"))
        node.add(_FHIR_DOSAGE, dosage)
        if dose["unit"] != dose["canonical_unit"]:
            node.add(_OT_REPORTED, _quantity(float(dose["value"]), dose["unit"]))
        if dose.get("mg") is not None:
            node.add(OT + "totalDose", _quantity(float(dose["mg"]), "mg"))
        if body.get("body_weight_kg") is not None:
            node.add(OT + "bodyWeight", _quantity(float(body["body_weight_kg"]), "kg"))
        if body.get("body_surface_area_m2") is not None:
            node.add(OT + "bodySurfaceArea", _quantity(float(body["body_surface_area_m2"]), "m2"))
        if body.get("cycle_length_days") is not None:
            node.add(OT + "cycleLengthDays", double(float(body["cycle_length_days"])))
    else:
        node = Node(resource_iri("Procedure", eid), _PROCEDURE_TYPES[kind])
        node.add(_FHIR_STATUS, "preparation" if planned else "completed")
        node.add(_FHIR_CODE, Iri(body["term_iri"]))
        node.add(_FHIR_SUBJECT, Iri(patient_iri(event["patient_id"])))
        node.add(_FHIR_PERFORMED, date_time(event["occurred_at"]))
        if kind == "radiotherapy":
            node.add(_OT_DOSE, _quantity(float(dose["canonical_value"]), dose["canonical_unit"]))
            if dose["unit"] != dose["canonical_unit"]:
                node.add(_OT_REPORTED, _quantity(float(dose["value"]), dose["unit"]))
            node.add(_OT_FRACTION_NUMBER, body.get("fraction_number"))
            node.add(_OT_FRACTIONS_PLANNED, body.get("fractions_planned"))
            node.add(_OT_TARGET, body.get("target"))
        else:
            node.add(OT + "extent", body.get("extent"))
            mask = facts.resection_mask or unverified(body.get("resection_mask_uri"))
            if mask is not None:
                node.add(OT + "resectionMask", _claim_check(mask))
    for field_name, predicate in _COURSE.items():
        node.add(predicate, body.get(field_name))
    node.add(_OT_PLANNED, planned)
    node.add(_OT_RECORDED_AT, date_time(event["recorded_at"]))
    _provenance(node, event, source)
    return node
