from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.election.record import LeaderRecord, format_microtime, parse_microtime


def test_microtime_keeps_six_digits_when_microseconds_are_zero() -> None:
    assert format_microtime(datetime(2024, 1, 1, tzinfo=UTC)) == "2024-01-01T00:00:00.000000Z"


def test_microtime_converts_to_utc() -> None:
    moment = datetime(2023, 7, 4, 23, 58, 48, 65888, tzinfo=timezone(timedelta(hours=2)))
    assert format_microtime(moment) == "2023-07-04T21:58:48.065888Z"


def test_microtime_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="aware"):
        format_microtime(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-07-04T21:58:48.065888Z", datetime(2023, 7, 4, 21, 58, 48, 65888, tzinfo=UTC)),
        ("2023-07-04T21:58:48Z", datetime(2023, 7, 4, 21, 58, 48, tzinfo=UTC)),
        ("2023-07-04T21:58:48.1Z", datetime(2023, 7, 4, 21, 58, 48, 100000, tzinfo=UTC)),
        ("2023-07-04T21:58:48.123456789Z", datetime(2023, 7, 4, 21, 58, 48, 123456, tzinfo=UTC)),
        ("2023-07-04T23:58:48.000001+02:00", datetime(2023, 7, 4, 21, 58, 48, 1, tzinfo=UTC)),
    ],
)
def test_microtime_parses_what_the_api_server_and_client_go_write(
    text: str, expected: datetime
) -> None:
    assert parse_microtime(text) == expected


@pytest.mark.parametrize("text", ["", "2023-07-04", "2023-07-04 21:58:48Z", "yesterday"])
def test_microtime_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_microtime(text)


@given(st.datetimes(timezones=st.just(UTC), min_value=datetime(1970, 1, 1)))
def test_microtime_round_trips(moment: datetime) -> None:
    text = format_microtime(moment)
    assert len(text.split(".")[1]) == 7  # six digits and the Z
    assert parse_microtime(text) == moment


def test_record_round_trips_through_a_lease_spec() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    record = LeaderRecord("pod-a", 15, now, now + timedelta(seconds=2), 3)
    spec = record.to_spec()
    assert spec == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-01-01T00:00:00.000000Z",
        "renewTime": "2024-01-01T00:00:02.000000Z",
        "leaseTransitions": 3,
    }
    assert LeaderRecord.from_spec(spec) == record


def test_record_reads_missing_fields_as_client_go_does() -> None:
    assert LeaderRecord.from_spec({}) == LeaderRecord()
    assert LeaderRecord.from_spec(None) == LeaderRecord()


def test_release_clears_the_holder_and_keeps_transitions() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    released = LeaderRecord("pod-a", 15, now, now, 7).released(now + timedelta(seconds=5))
    assert released.holder_identity == ""
    assert released.lease_duration_seconds == 1
    assert released.lease_transitions == 7
    assert released.renew_time == now + timedelta(seconds=5)
