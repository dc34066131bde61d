"""Building events (make_event), reading timestamps, and normalizing to canonical units."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    TERMS,
    ContractError,
    EventValidationError,
    example,
    format_time,
    make_event,
    normalize_event,
    parse_time,
    validate,
)
from schemas.times import EARLIEST_TIME

CET = timezone(timedelta(hours=1))
PSA = {"code": "2857-1", "value": 6.8, "unit": "ng/mL"}


def test_make_event_builds_a_valid_event_with_zoned_times() -> None:
    occurred = datetime(2024, 3, 4, 9, 15, tzinfo=CET)
    recorded = datetime(2024, 3, 4, 10, 0, tzinfo=timezone.utc)
    event = make_event("lab", "VP-0042", occurred, PSA, source="lis-feed", recorded_at=recorded)
    assert validate(event) == []
    assert event["occurred_at"] == "2024-03-04T09:15:00+01:00"
    assert parse_time(event["occurred_at"]) == occurred
    assert parse_time(event["recorded_at"]) == recorded
    assert uuid.UUID(event["event_id"]).version == 4
    assert event["schema_version"] == "1.1" and event["kind"] == "lab"  # the contract's current minor version


def test_make_event_is_deterministic_given_a_uuid5_and_recorded_at() -> None:
    moment = datetime(2024, 3, 4, 9, 15, tzinfo=timezone.utc)
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, "lis-feed/VP-0042/accession-17")
    build = lambda: make_event(  # noqa: E731
        "lab", "VP-0042", moment, PSA, source="lis-feed", recorded_at=moment, event_id=event_id
    )
    assert build() == build()
    assert build()["event_id"] == str(event_id)


def test_make_event_copies_the_body() -> None:
    body = copy.deepcopy(PSA)
    event = make_event("lab", "VP-0042", datetime.now(timezone.utc), body, source="lis-feed")
    body["value"] = -1
    assert event["body"]["value"] == 6.8


def test_make_event_refuses_naive_times_and_invalid_bodies() -> None:
    with pytest.raises(ContractError, match="no time zone"):
        make_event("lab", "VP-0042", datetime(2024, 3, 4, 9, 15), PSA, source="lis-feed")
    with pytest.raises(EventValidationError) as caught:
        make_event(
            "lab", "VP-0042", datetime.now(timezone.utc), {**PSA, "unit": "NG/ML"}, source="x"
        )
    assert [issue.path for issue in caught.value.issues] == ["body.unit"]


def test_parse_time_requires_a_zone() -> None:
    assert parse_time("2024-03-04T08:15:00Z") == datetime(2024, 3, 4, 8, 15, tzinfo=timezone.utc)
    assert parse_time("2024-03-04T09:15:00.250+01:00").utcoffset() == timedelta(hours=1)
    for text in ["2024-03-04T08:15:00", "2024-03-04", "20240304T081500Z", "2024-03-04T08:15:00Z\n"]:
        with pytest.raises(ContractError):
            parse_time(text)


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999Z",
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00.000999999Z",  # digits beyond the microsecond are dropped
        "1970-01-01T01:00:00.0005+01:00",
    ],
)
def test_times_before_the_first_millisecond_of_the_epoch_are_refused(text: str) -> None:
    # A Kafka record timestamp (the event time) must be positive: 0 ms and earlier cannot be sent.
    with pytest.raises(ContractError, match=r"before 1970-01-01T00:00:00\.001Z.*Kafka record timestamps"):
        parse_time(text)
    with pytest.raises(EventValidationError) as caught:
        make_event("lab", "VP-0042", datetime.fromisoformat(text), PSA, source="lis-feed")
    assert [issue.path for issue in caught.value.issues] == ["occurred_at"]


def test_the_first_millisecond_of_the_epoch_is_accepted() -> None:
    assert parse_time("1970-01-01T00:00:00.001Z") == EARLIEST_TIME
    assert parse_time("1970-01-01T01:00:00.001+01:00") == EARLIEST_TIME
    assert round(EARLIEST_TIME.timestamp() * 1000) == 1


@given(
    # from a day after the epoch, so that no zone offset (up to 14 h) reaches before it
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_format_and_parse_round_trip(moment: datetime, offset_minutes: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = format_time(aware)
    assert parse_time(text) == aware
    assert parse_time(text).utcoffset() == aware.utcoffset()


def test_normalize_converts_vaf_percent_to_a_fraction() -> None:
    event = example("ctdna")
    assert (event["body"]["value"], event["body"]["unit"]) == (12.5, "%")
    body = normalize_event(event)["body"]
    assert body["canonical_value"] == 0.125 and body["canonical_unit"] == "1"
    assert body["term_iri"] == "http://loinc.org/rdf#81258-6"
    assert (body["value"], body["unit"]) == (12.5, "%")  # the original is kept
    assert "canonical_value" not in event["body"]  # the input is not modified


def test_normalize_converts_centigray_to_gray() -> None:
    event = example("treatment")
    event["body"]["dose"] = {"value": 250, "unit": "cGy"}
    body = normalize_event(event)["body"]
    assert body["dose"]["canonical_value"] == 2.5 and body["dose"]["canonical_unit"] == "Gy"
    assert body["term_iri"] == TERMS.for_treatment("radiotherapy").iri


def test_normalize_converts_volume_and_lab_units_and_tags_terms() -> None:
    imaging = example("imaging")
    imaging["body"]["measures"]["tumor_volume"] = {"value": 12400, "unit": "mm3"}
    body = normalize_event(imaging)["body"]
    assert body["measures"]["tumor_volume"]["canonical_value"] == 12.4
    assert body["term_iri"] == "http://snomed.info/id/113091000"
    lab = example("lab")
    lab["body"].update(value=4200, unit="pg/mL")
    body = normalize_event(lab)["body"]
    assert (body["canonical_value"], body["canonical_unit"]) == (4.2, "ng/mL")
    assert body["term_iri"] == "http://loinc.org/rdf#2857-1"


def test_integral_fraction_counts_become_ints() -> None:
    # JSON Schema's "integer" admits 30.0; the RDF of a count is an xsd:integer.
    event = example("treatment")
    event["body"].update(fraction_number=3.0, fractions_planned=30.0)
    body = normalize_event(event)["body"]
    assert (body["fraction_number"], body["fractions_planned"]) == (3, 30)
    assert type(body["fraction_number"]) is int and type(body["fractions_planned"]) is int


def test_normalize_refuses_invalid_events() -> None:
    event = example("ctdna")
    event["body"]["value"] = 150
    with pytest.raises(EventValidationError, match="within \\[0, 1\\]"):
        normalize_event(event)
