"""Event -> RDF -> JSON-LD -> decode, for every event kind."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from rdflib import Graph
from rdflib.compare import isomorphic

from schemas import EVENT_KINDS, TERMS, example, example_names, normalize_event, parse_time
from stream.decode import decode_graph, decode_jsonld
from stream.rdf import CONTEXT, Provenance, build_event_graph

SOURCE = Provenance("oncotwin.events.lab.v1", 2, 41)


def _events(cohort_events: list[dict]) -> list[dict]:
    # The contract's examples (every native variant) plus events of each kind from a virtual cohort.
    events = [example(name) for name in example_names() if name != "forecast" and ".fhir-" not in name]
    for kind in EVENT_KINDS:
        events.extend([e for e in cohort_events if e["kind"] == kind][:2])
    return events


def _graph(triples: Any) -> Graph:
    g = Graph()
    for t in triples:
        g.add(t)
    return g


def test_jsonld_is_isomorphic_to_the_validated_graph(cohort_events: list[dict]) -> None:
    for event in _events(cohort_events):
        graph = build_event_graph(normalize_event(event), SOURCE)
        published = graph.jsonld_bytes()
        parsed = Graph().parse(data=published, format="json-ld")
        assert isomorphic(parsed, _graph(graph.triples())), event["kind"]
        assert published == json.dumps(graph.jsonld(), separators=(",", ":"), ensure_ascii=False).encode()
        # The context is inline: a reader never fetches one.
        assert json.loads(published)["@context"] == CONTEXT


def test_nquads_and_stored_ntriples_are_isomorphic_to_the_validated_graph(cohort_events: list[dict]) -> None:
    import re

    from rdflib import Dataset, URIRef

    from stream.rdf import GENID_BASE

    for event in _events(cohort_events):
        graph = build_event_graph(normalize_event(event), SOURCE)
        dataset = Dataset()
        dataset.parse(data=graph.nquads(), format="nquads")
        named = dataset.graph(URIRef(graph.graph_iri))
        assert isomorphic(_graph(named), _graph(graph.triples())), event["kind"]
        # The store's form: skolem IRIs where the graph has blank nodes, one per blank node.
        stored = graph.ntriples()
        skolems = set(re.findall(f"<{re.escape(GENID_BASE)}{graph.event_id}/(b\\d+)>", stored))
        assert len(skolems) == sum(1 for n in graph.nodes() if n.iri is None)
        unskolemized = re.sub(f"<{re.escape(GENID_BASE)}[^/>]+/(b\\d+)>", r"_:\1", stored)
        assert isomorphic(Graph().parse(data=unskolemized, format="nt"), _graph(graph.triples())), event["kind"]


def test_nquads_escape_literals_and_refuse_iris_they_cannot_carry() -> None:
    from rdflib import Dataset, Literal

    from stream.rdf import EventGraph, Iri, Node

    text = 'a "quoted" back\\slash\nnew line\r'
    node = Node("https://example.org/r/1", (), [("https://example.org/p", text)])
    dataset = Dataset()
    dataset.parse(data=EventGraph("0" * 8, "PSN-1", "lab", [node]).nquads(), format="nquads")
    assert [o for _, _, o, _ in dataset.quads()] == [Literal(text)]
    for bad in ("https://example.org/a b", "https://example.org/<x>", "no-scheme"):
        broken = Node("https://example.org/r/1", (), [("https://example.org/p", Iri(bad))])
        with pytest.raises(ValueError, match="IRI"):
            EventGraph("0" * 8, "PSN-1", "lab", [broken]).nquads()


def _expected_code(event: dict) -> str:
    body = event["body"]
    if event["kind"] == "lab":
        return TERMS.lookup("loinc", body["code"]).iri
    if event["kind"] == "ctdna":
        return TERMS.for_ctdna_measure(body["measure"]).iri
    if event["kind"] == "imaging":
        if "tumor_volume" not in body.get("measures", {}):  # no volume: the study is the resource
            return TERMS.for_modality(body["modality"]).iri
        return TERMS.lookup("local", "tumor-volume").iri
    return TERMS.for_treatment(body["type"]).iri


@pytest.mark.parametrize("decoder", ["jsonld", "rdflib"])
def test_decode_gives_back_id_patient_time_code_value_unit(cohort_events: list[dict], decoder: str) -> None:
    for event in _events(cohort_events):
        normalized = normalize_event(event)
        graph = build_event_graph(normalized, SOURCE)
        if decoder == "jsonld":
            decoded = decode_jsonld(graph.jsonld_bytes())
        else:
            decoded = decode_graph(Graph().parse(data=graph.jsonld_bytes(), format="json-ld"))
        body = normalized["body"]
        assert decoded.event_id == event["event_id"]
        assert decoded.patient_id == event["patient_id"]
        assert decoded.kind == event["kind"]
        assert decoded.time == parse_time(event["occurred_at"])
        assert decoded.code == _expected_code(event)
        assert (decoded.source_topic, decoded.source_partition, decoded.source_offset) == ("oncotwin.events.lab.v1", 2, 41)
        if event["kind"] in ("lab", "ctdna"):
            assert math.isclose(decoded.value, body["canonical_value"], rel_tol=0, abs_tol=0)
            assert decoded.unit == body["canonical_unit"]
        elif event["kind"] == "imaging":
            volume = body.get("measures", {}).get("tumor_volume")
            if volume is not None:
                assert decoded.value == volume["canonical_value"] and decoded.unit == "mL"
            assert decoded.study_uid == body["study_uid"] and decoded.modality == body["modality"]
            assert decoded.series_uid == body.get("series_uid")
            assert decoded.voxel_spacing_mm == tuple(body["voxel_spacing_mm"])
            if "segmentation_uri" in body:
                assert decoded.segmentation is not None
                assert decoded.segmentation.sha256 == body["segmentation_uri"]["sha256"].lower()
                assert decoded.segmentation.verified is False  # not resolved here
        else:
            assert decoded.treatment_type == body["type"]
            if "dose" in body:  # not a surgery
                assert decoded.value == body["dose"]["canonical_value"] and decoded.unit == body["dose"]["canonical_unit"]
            if body["type"] == "chemotherapy":
                assert decoded.drug_name == body["drug"]["name"]
                assert decoded.drug_codes == tuple(sorted(body["drug"]["codes"]))
                rxnorm = [c.rsplit("/", 1)[-1] for c in body["drug"]["codes"] if "/RXNORM/" in c]
                assert decoded.rxnorm == (rxnorm[0] if rxnorm else None)
        assert decoded.recorded_at == parse_time(event["recorded_at"])
        assert dict(decoded.extensions) == {p: json.dumps(v, sort_keys=True, separators=(",", ":"))
                                            for p, v in normalized["extensions"].items()}


def test_both_decoders_give_back_every_fact_alike(cohort_events: list[dict]) -> None:
    for event in _events(cohort_events):
        graph = build_event_graph(normalize_event(event), SOURCE)
        fast = decode_jsonld(graph.jsonld_bytes())
        assert fast == decode_graph(Graph().parse(data=graph.jsonld_bytes(), format="json-ld")), event["event_id"]


def test_the_variants_facts_are_decoded() -> None:
    def decoded(name: str):
        return decode_jsonld(build_event_graph(normalize_event(example(name)), SOURCE).jsonld_bytes())

    below = decoded("ctdna.below-lod")
    assert (below.comparator, below.value, below.below_lod, below.detection_limit) == ("<", 0.001, True, 0.001)
    censored = decoded("lab.censored")
    assert (censored.comparator, censored.value, censored.below_lod) == ("<", 0.1, False)
    bevacizumab = decoded("treatment.chemotherapy-mg-kg")
    assert (bevacizumab.reported_value, bevacizumab.reported_unit, bevacizumab.dose_unit) == (10.0, "mg/kg", "mg/m2")
    assert (bevacizumab.body_weight_kg, bevacizumab.body_surface_area_m2, bevacizumab.total_dose_mg) == (78.5, 1.95, 785.0)
    assert (bevacizumab.cycle, bevacizumab.day_of_cycle, bevacizumab.cycle_length_days, bevacizumab.line_of_therapy) == (3, 1, 14.0, 2)
    assert bevacizumab.regimen == "lomustine + bevacizumab" and dict(bevacizumab.extensions) == {"body.phase": '"recurrence"'}
    labelled = decoded("imaging.labelled")
    # Not read here (no files): the mapping as sent (the normalizer adds 0 once it read the map).
    assert labelled.segmentation_labels == ((1, "necrosis"), (2, "edema"), (4, "enhancing"))
    assert labelled.label_convention == "explicit" and labelled.tissue_map is not None
    study = decoded("imaging.study-only")
    assert study.series_uid is None and study.segmentation is not None


def test_ctdna_keeps_gene_variant_and_reported_percent() -> None:
    decoded = decode_jsonld(build_event_graph(normalize_event(example("ctdna")), SOURCE).jsonld_bytes())
    assert decoded.value == pytest.approx(0.125) and decoded.unit == "1"
    assert (decoded.reported_value, decoded.reported_unit) == (12.5, "%")
    assert decoded.gene == "TP53" and decoded.variant_hgvs == "NM_000546.6:c.524G>A"


def test_decoders_agree_on_a_foreign_context() -> None:
    # A JSON-LD re-serialized by another tool (expanded, no context) decodes the same way.
    graph = build_event_graph(normalize_event(example("lab")), SOURCE)
    expanded = Graph().parse(data=graph.jsonld_bytes(), format="json-ld").serialize(format="json-ld")
    assert decode_jsonld(expanded) == decode_jsonld(graph.jsonld_bytes())


@pytest.mark.parametrize("document", [
    {"@context": "http://127.0.0.1:9/never-answers.jsonld", "@id": "urn:x"},
    {"@context": ["file:///etc/passwd", {"a": "http://example.org/a"}], "@id": "urn:x"},
    {"@context": {"@import": "http://127.0.0.1:9/ctx"}, "@id": "urn:x"},
    {"@graph": [{"@context": "file:///etc/hostname", "@id": "urn:y"}]},
])
def test_a_jsonld_context_by_url_is_refused_not_fetched(document):
    # rdflib would load the context: a URL that never answers stalls the worker, a file: URL
    # reads a local file. Only inline contexts are read.
    from stream.decode import DecodeError, decode_jsonld

    with pytest.raises(DecodeError, match="context by URL"):
        decode_jsonld(document)
