"""Client-side checks and value formatting, and the redaction of secrets from text."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from uuid import UUID

import pendulum
import pytest

from airflow_provider_lsq.exceptions import LeadSquaredValidationError
from airflow_provider_lsq.hooks.payload import build_lead_fields, format_value
from airflow_provider_lsq.hooks.responses import redact
from airflow_provider_lsq.passwords import generate_password


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("Zoë", "Zoë"),
        ("", None),
        ("   ", None),
        (None, None),
        (True, "true"),
        (42, "42"),
        (3.0, "3"),
        (2.5, "2.5"),
        (Decimal("1E+2"), "100"),
        # Written out, as a number field reads it: repr() gave 1e-05 and -2.5e-07.
        (0.00001, "0.00001"),
        (-2.5e-7, "-0.00000025"),
        (Decimal("1E-7"), "0.0000001"),
        (1.5e16, "15000000000000000"),
        (dt.date(2026, 1, 2), "2026-01-02 00:00:00"),
        (dt.datetime(2026, 1, 2, 3, 4, 5), "2026-01-02 03:04:05"),
        (pendulum.datetime(2026, 1, 2, 8, 34, 5, tz="Asia/Kolkata"), "2026-01-02 03:04:05"),
        (UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    ],
)
def test_format_value(value: object, sent: str | None) -> None:
    assert format_value("Field", value) == sent


@pytest.mark.parametrize("value", [b"bytes", [1], {"a": 1}, float("inf"), Decimal("-Infinity"), "bad\x00nul"])
def test_values_that_cannot_be_sent_name_the_field(value: object) -> None:
    with pytest.raises(LeadSquaredValidationError) as err:
        format_value("mx_Field", value)
    assert err.value.field == "mx_Field"
    assert "'mx_Field'" in err.value.message


def test_fields_keep_the_callers_order_with_the_identifier_moved_first() -> None:
    lead = {"FirstName": "Asha", "Mobile": "98", "mx_PAN_Number": "P1", "EmailAddress": "a@x.org"}
    names = [
        f["Attribute"] for f in build_lead_fields(lead, "Pw@123456789", identifier_attribute="mx_PAN_Number")
    ]
    assert names == [
        "mx_PAN_Number",
        "FirstName",
        "Mobile",
        "EmailAddress",
        "mx_Portal_Password",
        "mx_Portal_Confirm_Password",
    ]
    names = [f["Attribute"] for f in build_lead_fields(lead, "Pw@123456789")]
    assert names[:4] == ["FirstName", "Mobile", "mx_PAN_Number", "EmailAddress"]


def test_custom_identifier_must_have_a_value() -> None:
    with pytest.raises(LeadSquaredValidationError) as err:
        build_lead_fields(
            {"EmailAddress": "a@x.org", "mx_PAN_Number": ""}, "pw", identifier_attribute="mx_PAN_Number"
        )
    assert err.value.field == "mx_PAN_Number"


def test_redact_removes_every_form_of_a_secret_and_key_parameters() -> None:
    secret = "s3c$+/=&"
    text = (
        f"raw {secret} quoted s3c%24%2B%2F%3D%26 plus-quoted s3c%24%2B%2F%3D%26 "
        "url http://h/api?accessKey=unknown%24&secretKey=other&x=1"
    )
    cleaned = redact(text, [secret])
    assert "s3c" not in cleaned
    assert "accessKey=***&secretKey=***&x=1" in cleaned


def test_generated_passwords_are_strong_and_fresh() -> None:
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    for password in passwords:
        assert len(password) >= 12
        assert any(c.isupper() for c in password) and any(c.islower() for c in password)
        assert any(c.isdigit() for c in password) and any(not c.isalnum() for c in password)
    with pytest.raises(ValueError):
        generate_password(8)


# -- dataframe values ----------------------------------------------------------------------------------


def test_dataframe_no_value_markers_are_left_out() -> None:
    """NaN (an empty cell in ``to_dict("records")``), pandas.NA and NaT mean "no value", as None does."""
    import pandas as pd  # a dev dependency: what users hand over from dataframes

    frame = pd.DataFrame(
        {
            "EmailAddress": ["a@example.com", "b@example.com"],
            "mx_Score": [1.5, None],
            "mx_Grade": pd.array([3, None], dtype="Int64"),
            "mx_Applied": pd.to_datetime(["2026-11-20 10:00:00", None]),
        }
    )
    first, second = frame.to_dict("records")
    assert build_lead_fields(second, "Passw0rd!")[:1] == [
        {"Attribute": "EmailAddress", "Value": "b@example.com"}
    ]
    assert [f["Attribute"] for f in build_lead_fields(second, "Passw0rd!")] == [
        "EmailAddress",
        "mx_Portal_Password",
        "mx_Portal_Confirm_Password",
    ]
    assert [f["Attribute"] for f in build_lead_fields(first, "Passw0rd!")][:4] == [
        "EmailAddress",
        "mx_Score",
        "mx_Grade",
        "mx_Applied",
    ]
    for marker in (float("nan"), pd.NA, pd.NaT, Decimal("NaN")):
        assert format_value("mx_Any", marker) is None


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), Decimal("Infinity")])
def test_infinities_stay_invalid_naming_the_field(value: object) -> None:
    with pytest.raises(LeadSquaredValidationError, match="field 'mx_Score'") as err:
        build_lead_fields({"EmailAddress": "a@example.com", "mx_Score": value}, "Passw0rd!")
    assert err.value.field == "mx_Score"


def test_numpy_scalars_from_dataframe_rows_go_as_their_python_values() -> None:
    """Rows taken from a dataframe carry numpy scalars: each is sent as the Python value it holds,
    and numpy's "no value" markers are left out like pandas' are."""
    import numpy as np
    import pandas as pd

    assert format_value("mx_Grade", np.int64(3)) == "3"
    assert format_value("mx_Score", np.float32(2.5)) == "2.5"
    assert format_value("mx_Score", np.float32(0.1)) == "0.1"  # not 0.10000000149011612
    assert format_value("mx_Score", np.float16(3.3)) == "3.3"
    assert format_value("mx_Score", np.float64(3.0)) == "3"
    assert format_value("mx_Agreed", np.bool_(True)) == "true"
    assert format_value("EmailAddress", np.str_("a@example.com")) == "a@example.com"
    assert format_value("mx_Applied", np.datetime64("2026-01-02T03:04:05.123456789")) == "2026-01-02 03:04:05"
    for marker in (np.float32("nan"), np.datetime64("NaT")):
        assert format_value("mx_Any", marker) is None
    with pytest.raises(LeadSquaredValidationError, match="field 'mx_Score'"):
        format_value("mx_Score", np.float64("inf"))

    frame = pd.DataFrame({"EmailAddress": ["a@example.com"], "mx_Grade": [7], "mx_Agreed": [False]})
    row = {column: frame[column].iloc[0] for column in frame.columns}
    assert type(row["mx_Grade"]).__module__ == "numpy"  # what a column's cell is
    assert build_lead_fields(row, "Passw0rd!")[:3] == [
        {"Attribute": "EmailAddress", "Value": "a@example.com"},
        {"Attribute": "mx_Grade", "Value": "7"},
        {"Attribute": "mx_Agreed", "Value": "false"},
    ]


def test_numpy_arrays_and_out_of_range_dates_are_refused_naming_the_field() -> None:
    """A dataframe cell holding an array raised numpy's own ValueError, which stopped the whole run;
    a one-element array went as its element, and a datetime64 past year 9999 as a bare integer."""
    import numpy as np

    for value in (np.array([1, 2]), np.array([5]), np.array(5), np.datetime64("20000-01-01")):
        with pytest.raises(LeadSquaredValidationError, match="field 'mx_Courses'") as err:
            build_lead_fields({"EmailAddress": "a@example.com", "mx_Courses": value}, "Passw0rd!")
        assert err.value.field == "mx_Courses"


def test_a_value_whose_reading_raises_is_refused_naming_the_field() -> None:
    class BrokenZone(dt.tzinfo):
        def utcoffset(self, _: dt.datetime | None) -> dt.timedelta:
            raise RuntimeError("secret-ish detail")

    with pytest.raises(LeadSquaredValidationError, match="field 'mx_Applied'") as err:
        format_value("mx_Applied", dt.datetime(2026, 1, 2, tzinfo=BrokenZone()))
    assert err.value.field == "mx_Applied" and "secret-ish" not in err.value.message
