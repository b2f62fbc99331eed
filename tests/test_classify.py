"""Outcome classification and Retry-After parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstream_guard._classify import (
    MAX_RETRY_AFTER_S,
    Outcome,
    classify_status,
    parse_retry_after,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("status", "body", "outcome", "reason"),
    [
        (200, b"", Outcome.SUCCESS, "ok"),
        (204, b"", Outcome.SUCCESS, "ok"),
        (503, b"no healthy upstream", Outcome.FAILURE, "no_healthy_upstream"),
        (
            503,
            b"No server is available to handle this request.",
            Outcome.FAILURE,
            "no_server_available",
        ),
        (
            503,
            b"upstream connect error or disconnect/reset before headers",
            Outcome.FAILURE,
            "upstream_connect_error",
        ),
        (503, b"", Outcome.FAILURE, "status_503"),
        (500, b'{"error":{"status":500}}', Outcome.FAILURE, "status_500"),
        (502, b"<html>bad gateway</html>", Outcome.FAILURE, "status_502"),
        (504, b"", Outcome.FAILURE, "status_504"),
        (429, b"Too many requests", Outcome.THROTTLED, "throttled"),
        (
            401,
            b'{"error":{"status":401,"message":"no healthy upstream"}}',
            Outcome.CLIENT_ERROR,
            "status_401",
        ),
        (403, b"", Outcome.CLIENT_ERROR, "status_403"),
        (404, b"", Outcome.CLIENT_ERROR, "status_404"),
        (400, b'{"error":"invalid_grant"}', Outcome.CLIENT_ERROR, "status_400"),
        (501, b"", Outcome.CLIENT_ERROR, "status_501"),
    ],
)
def test_classification(status, body, outcome, reason):
    """Statuses and proxy bodies map to the outcome classes of DESIGN.md; 4xx never fail."""
    assert classify_status(status, body) == (outcome, reason)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (b"12", 12.0),
        ("86400", 86400.0),
        ("999999999", MAX_RETRY_AFTER_S),
        ("1e400", None),
        ("-5", None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_retry_after_examples(value, expected):
    """Seconds, dates, and garbage: numbers or None, never an exception."""
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date_in_future():
    """An HTTP-date is turned into seconds from now."""
    when = datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=90)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(90.0)


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_retry_after_never_raises_and_stays_bounded(value):
    """Any header text yields None or a finite wait between 0 and a day."""
    result = parse_retry_after(value, NOW)
    assert result is None or 0.0 <= result <= MAX_RETRY_AFTER_S


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_integers(seconds):
    """Whole seconds are read exactly, capped at a day."""
    assert parse_retry_after(str(seconds), NOW) == min(float(seconds), MAX_RETRY_AFTER_S)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1)))
def test_retry_after_dates(moment):
    """Any HTTP-date gives a wait in [0, a day], 0 for dates already past."""
    text = format_datetime(moment.replace(tzinfo=UTC), usegmt=True)
    result = parse_retry_after(text, NOW)
    assert result is not None
    expected = min(max(0.0, moment.replace(tzinfo=UTC).timestamp() - NOW), MAX_RETRY_AFTER_S)
    assert result == pytest.approx(expected)
