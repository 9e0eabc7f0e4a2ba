"""The sandbox's lead APIs over real HTTP: shapes, matching, update behaviours, bulk, failure modes."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from airflow_provider_lsq.sandbox import Sandbox, SandboxField

BASE = "/v2/LeadManagement.svc/"
REGISTER = "/api/Authentication/v2/Register"
PASSWORD = "Samplepassword@123"


class LeadClient:
    """A minimal, correct lead-API client: keys as query parameters (or headers), JSON bodies."""

    def __init__(self, sb: Sandbox, keys_in_headers: bool = False) -> None:
        self.sb = sb
        self.session = requests.Session()
        keys = {"accessKey": sb.access_key, "secretKey": sb.secret_key}
        self.params: dict[str, str] = {} if keys_in_headers else keys
        self.headers = (
            {"x-LSQ-AccessKey": sb.access_key, "x-LSQ-SecretKey": sb.secret_key} if keys_in_headers else {}
        )

    def post(self, endpoint: str, body: Any, **params: str) -> requests.Response:
        return self.session.post(
            self.sb.url + BASE + endpoint,
            params={**self.params, **params},
            json=body,
            headers=self.headers,
            timeout=10,
        )

    def get(self, endpoint: str, **params: str) -> requests.Response:
        return self.session.get(
            self.sb.url + BASE + endpoint, params={**self.params, **params}, headers=self.headers, timeout=10
        )

    def register(self, email: str, password: str = PASSWORD) -> str:
        fields = [
            {"Attribute": "EmailAddress", "Value": email},
            {"Attribute": "FirstName", "Value": "Asha"},
            {"Attribute": "mx_Portal_Password", "Value": password},
            {"Attribute": "mx_Portal_Confirm_Password", "Value": password},
        ]
        answer = self.session.post(
            self.sb.url + REGISTER,
            params={"accessKey": self.sb.access_key, "secretKey": self.sb.secret_key},
            json={"LeadFields": fields},
            headers={
                "Authorization": self.sb.public_auth_key,
                "x-lsq-registertoken": self.sb.registration_token,
                "x-lsq-portalid": self.sb.portal_id,
            },
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["LeadId"])


def body(**fields: str) -> list[dict[str, str]]:
    return [{"Attribute": a, "Value": v} for a, v in fields.items()]


@pytest.fixture
def client(leadsquared_sandbox: Sandbox) -> LeadClient:
    return LeadClient(leadsquared_sandbox)


def test_metadata_lists_the_fields_and_marks_the_unique_ones(client: LeadClient) -> None:
    answer = client.get("LeadsMetaData.Get")
    assert answer.status_code == 200
    fields = {f["SchemaName"]: f for f in answer.json()}
    assert {"EmailAddress", "Phone", "Mobile", "mx_PAN_Number", "FirstName"} <= set(fields)
    assert {name for name, f in fields.items() if f["IsLeadIdentifier"]} == {
        "EmailAddress",
        "Phone",
        "Mobile",
        "mx_PAN_Number",
    }
    intake = fields["mx_Intake"]
    assert intake["DataType"] == "Select"
    assert [o["Value"] for o in intake["Options"]] == ["2026-Fall", "2027-Spring", "2027-Fall"]
    assert fields["FirstName"]["MaxLength"] == "100" and fields["FirstName"]["Options"] is None
    for f in fields.values():
        assert set(f) >= {"DisplayName", "DataType", "IsMandatory", "MaxLength", "LockAfterCreate"}


def test_metadata_follows_the_configured_fields(leadsquared_sandbox_factory: Any) -> None:
    sb = leadsquared_sandbox_factory(
        lead_fields=(
            SandboxField("EmailAddress", "Email", "Email", is_lead_identifier=True),
            SandboxField("mx_Student_Id", "Student Id", "Number", is_mandatory=True, is_lead_identifier=True),
        )
    )
    fields = LeadClient(sb).get("LeadsMetaData.Get").json()
    assert [(f["SchemaName"], f["DataType"], f["IsMandatory"], f["IsLeadIdentifier"]) for f in fields] == [
        ("EmailAddress", "Email", False, True),
        ("mx_Student_Id", "Number", True, True),
    ]
    # The configured fields are the account's for the portal API too: Phone is no longer known.
    answer = LeadClient(sb).post("Lead.Capture", body(EmailAddress="a@example.com", Phone="1"))
    assert answer.json()["ExceptionMessage"] == "Attribute(s) does not exist - Phone"


def test_capture_creates_then_updates_the_lead_found_by_email(client: LeadClient) -> None:
    first = client.post("Lead.Capture", body(EmailAddress="asha@example.com", FirstName="Asha"))
    assert first.status_code == 200
    message = first.json()["Message"]
    assert first.json()["Status"] == "Success" and message["IsCreated"] is True
    second = client.post("Lead.Capture", body(EmailAddress="ASHA@example.com", mx_City="Pune"))
    assert second.json()["Message"] == {"Id": message["Id"], "IsCreated": False, "AffectedRows": 1}
    lead = client.sb.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.fields["mx_City"] == "Pune" and lead.fields["FirstName"] == "Asha"
    assert len(client.sb.leads) == 1


def test_capture_matches_prospect_id_first_and_search_by_takes_priority(client: LeadClient) -> None:
    one = client.sb.add_lead({"EmailAddress": "one@example.com", "Mobile": "900"})
    two = client.sb.add_lead({"EmailAddress": "two@example.com", "Mobile": "901"})
    by_id = client.post("Lead.Capture", body(ProspectId=two, FirstName="Two"))
    assert by_id.json()["Message"]["Id"] == two
    by_search = client.post(
        "Lead.Capture", body(EmailAddress="new@example.com", Mobile="900", SearchBy="Mobile", FirstName="One")
    )
    assert by_search.json()["Message"]["Id"] == one
    assert client.sb.find_lead("EmailAddress", "new@example.com") is not None  # its email was updated
    not_unique = client.post("Lead.Capture", body(EmailAddress="x@example.com", SearchBy="FirstName"))
    assert (
        not_unique.status_code == 500 and "not a unique lead field" in not_unique.json()["ExceptionMessage"]
    )


@pytest.mark.parametrize(
    ("behaviour", "expected_city", "expected_phone", "affected"),
    [
        ("DoNotUpdate", "Pune", "100", 0),
        ("UpdateOnlyEmptyFields", "Pune", "100", 1),  # the city had a value: kept; the name was empty
        ("DoNotUpdateUniqueFields", "Delhi", "100", 1),
    ],
)
def test_capture_update_behaviours(
    client: LeadClient, behaviour: str, expected_city: str, expected_phone: str, affected: int
) -> None:
    lead_id = client.sb.add_lead({"EmailAddress": "b@example.com", "mx_City": "Pune", "Phone": "100"})
    answer = client.post(
        "Lead.Capture",
        body(EmailAddress="b@example.com", mx_City="Delhi", Phone="200", FirstName="Bo"),
        LeadUpdateBehavior=behaviour,
    )
    assert answer.json()["Message"] == {"Id": lead_id, "IsCreated": False, "AffectedRows": affected}
    lead = client.sb.find_lead("EmailAddress", "b@example.com")
    assert lead is not None
    assert (lead.fields["mx_City"], lead.fields["Phone"]) == (expected_city, expected_phone)
    assert lead.fields.get("FirstName") == (None if behaviour == "DoNotUpdate" else "Bo")


def test_capture_do_not_update_still_creates_a_new_lead(client: LeadClient) -> None:
    answer = client.post(
        "Lead.Capture", body(EmailAddress="new@example.com"), LeadUpdateBehavior="DoNotUpdate"
    )
    assert answer.json()["Message"]["IsCreated"] is True
    bad = client.post("Lead.Capture", body(EmailAddress="n2@example.com"), LeadUpdateBehavior="Sometimes")
    assert bad.status_code == 500 and "LeadUpdateBehavior" in bad.json()["ExceptionMessage"]
    assert client.sb.find_lead("EmailAddress", "n2@example.com") is None


def test_a_registered_lead_updated_through_the_lead_api_keeps_its_password(client: LeadClient) -> None:
    lead_id = client.register("asha@example.com")
    before = client.sb.find_lead("EmailAddress", "asha@example.com")
    assert before is not None and before.password_sha256 is not None
    update = client.post("Lead.Update", body(mx_City="Pune", Phone="555"), leadId=lead_id)
    assert update.status_code == 200 and update.json() == {
        "Status": "Success",
        "Message": {"AffectedRows": 1},
    }
    upsert = client.post(
        "Lead.CreateOrUpdate",
        body(EmailAddress="asha@example.com", mx_Program="MBA"),
        postUpdatedLead="false",
    )
    assert upsert.json()["Message"]["Id"] == lead_id
    after = client.sb.find_lead("EmailAddress", "asha@example.com")
    assert after is not None
    assert after.fields["mx_City"] == "Pune" and after.fields["mx_Program"] == "MBA"
    assert (after.password_sha256, after.portal_user, after.registrations) == (
        before.password_sha256,
        True,
        1,
    )


@pytest.mark.parametrize("endpoint", ["Lead.Capture", "Lead.CreateOrUpdate", "Lead.Update"])
def test_portal_fields_are_refused_through_the_lead_api(client: LeadClient, endpoint: str) -> None:
    lead_id = client.register("asha@example.com")
    before = client.sb.find_lead("EmailAddress", "asha@example.com")
    answer = client.post(
        endpoint,
        body(EmailAddress="asha@example.com", mx_City="Pune", mx_Portal_Password="Other@123"),
        leadId=lead_id,
    )
    assert answer.status_code == 500
    assert "mx_Portal_Password" in answer.json()["ExceptionMessage"]
    after = client.sb.find_lead("EmailAddress", "asha@example.com")
    assert after == before  # nothing changed: not the city, not the password hash


def test_unknown_attributes_are_named_all_at_once(client: LeadClient) -> None:
    answer = client.post("Lead.Capture", body(EmailAddress="a@example.com", mx_Progam="MBA", mx_Cty="X"))
    assert answer.status_code == 500
    assert answer.json() == {
        "Status": "Error",
        "ExceptionType": "MXInvalidAttributeException",
        "ExceptionMessage": "Attribute(s) does not exist - mx_Progam,mx_Cty",
    }
    assert client.sb.leads == []


def test_another_leads_unique_value_is_a_duplicate(client: LeadClient) -> None:
    client.sb.add_lead({"EmailAddress": "sibling@example.com", "Mobile": "900"})
    mine = client.sb.add_lead({"EmailAddress": "me@example.com"})
    for answer in (
        client.post("Lead.Capture", body(EmailAddress="new@example.com", Mobile="900")),
        client.post("Lead.Update", body(Mobile="900"), leadId=mine),
    ):
        assert answer.status_code == 500
        assert answer.json()["ExceptionType"] == "MXDuplicateEntryException"
        assert "Mobile" in answer.json()["ExceptionMessage"]
    assert client.sb.find_lead("EmailAddress", "new@example.com") is None
    me = client.sb.find_lead("EmailAddress", "me@example.com")
    assert me is not None and "Mobile" not in me.fields


def test_values_are_checked_against_their_field(client: LeadClient) -> None:
    bad_option = client.post("Lead.Capture", body(EmailAddress="a@example.com", mx_Intake="2031-Summer"))
    too_long = client.post("Lead.Capture", body(EmailAddress="a@example.com", mx_PAN_Number="ABCDE12345X"))
    not_email = client.post("Lead.Capture", body(EmailAddress="not-an-address"))
    for answer, field in (
        (bad_option, "mx_Intake"),
        (too_long, "mx_PAN_Number"),
        (not_email, "EmailAddress"),
    ):
        assert answer.status_code == 500 and field in answer.json()["ExceptionMessage"]
    assert client.sb.leads == []


def test_mandatory_fields_are_needed_to_create_not_to_update(leadsquared_sandbox_factory: Any) -> None:
    sb = leadsquared_sandbox_factory(
        lead_fields=(
            SandboxField("EmailAddress", data_type="Email", is_lead_identifier=True),
            SandboxField("LastName", is_mandatory=True),
            SandboxField("mx_City"),
        )
    )
    client = LeadClient(sb)
    missing = client.post("Lead.Capture", body(EmailAddress="a@example.com"))
    assert missing.json()["ExceptionType"] == "MXMandatoryAttributeMissingException"
    assert "LastName" in missing.json()["ExceptionMessage"]
    sb.add_lead({"EmailAddress": "old@example.com", "LastName": "Rao"})
    assert client.post("Lead.Capture", body(EmailAddress="old@example.com", mx_City="Goa")).status_code == 200


def test_update_never_creates(client: LeadClient) -> None:
    answer = client.post(
        "Lead.Update", body(FirstName="Nobody"), leadId="00000000-0000-0000-0000-000000000000"
    )
    assert answer.status_code == 500 and answer.json()["Status"] == "Error"
    assert client.sb.leads == []
    assert client.post("Lead.Update", body(FirstName="Nobody")).status_code == 400  # no leadId


def test_get_by_email(client: LeadClient) -> None:
    assert client.get("Leads.GetByEmailaddress", emailaddress="nobody@example.com").json() == []
    lead_id = client.register("asha@example.com")
    found = client.get("Leads.GetByEmailaddress", emailaddress="ASHA@example.com").json()
    assert found == [{"ProspectID": lead_id, "EmailAddress": "asha@example.com", "FirstName": "Asha"}]


def test_bulk_gives_a_result_per_record(client: LeadClient) -> None:
    existing = client.register("asha@example.com")
    client.sb.add_lead({"EmailAddress": "sibling@example.com", "Mobile": "900"})
    before = client.sb.find_lead("EmailAddress", "asha@example.com")
    records = [
        body(EmailAddress="asha@example.com", mx_City="Pune", SearchBy="EmailAddress"),
        body(EmailAddress="new@example.com", FirstName="New", SearchBy="EmailAddress"),
        body(EmailAddress="dup@example.com", Mobile="900", SearchBy="EmailAddress"),
        body(EmailAddress="typo@example.com", mx_Cty="X", SearchBy="EmailAddress"),
    ]
    answer = client.post("Lead/Bulk/CreateOrUpdate", records)
    assert answer.status_code == 200
    results = answer.json()
    assert [r["RowNumber"] for r in results] == [1, 2, 3, 4]
    assert results[0] == {"RowNumber": 1, "LeadId": existing, "LeadCreated": False, "LeadUpdated": True}
    assert results[1]["LeadCreated"] is True and results[1]["LeadId"]
    assert results[2]["ExceptionType"] == "MXDuplicateEntryException" and results[2]["LeadId"] is None
    assert results[3]["ExceptionMessage"] == "Attribute(s) does not exist - mx_Cty"
    after = client.sb.find_lead("EmailAddress", "asha@example.com")
    assert after is not None and after.fields["mx_City"] == "Pune"
    assert before is not None and after.password_sha256 == before.password_sha256
    assert client.sb.find_lead("EmailAddress", "dup@example.com") is None


def test_bulk_of_more_than_25_records_is_refused_whole(client: LeadClient) -> None:
    records = [body(EmailAddress=f"s{i}@example.com", SearchBy="EmailAddress") for i in range(26)]
    answer = client.post("Lead/Bulk/CreateOrUpdate", records)
    assert answer.status_code == 500 and "at most 25" in answer.json()["ExceptionMessage"]
    assert client.sb.leads == []
    assert client.post("Lead/Bulk/CreateOrUpdate", records[:25]).status_code == 200
    assert len(client.sb.leads) == 25


@pytest.mark.leadsquared_sandbox(bulk_rate_limit_calls=1, bulk_rate_limit_period=60.0, refusal_form="200")
def test_bulk_has_its_own_lower_rate_limit(client: LeadClient) -> None:
    record = [body(EmailAddress="a@example.com", SearchBy="EmailAddress")]
    assert client.post("Lead/Bulk/CreateOrUpdate", record).status_code == 200
    refused = client.post("Lead/Bulk/CreateOrUpdate", record)
    # Refused in the account's chosen form (200 with the envelope), within the 60 s window.
    assert refused.status_code == 200
    assert refused.json()["ExceptionType"] == "MXAPIRateLimitExceededException"
    assert refused.json()["ExceptionMessage"] == "API calls exceeded the limit of 1 in 60 second(s)"
    # The account's own window is another one: single lead calls still go through.
    assert client.post("Lead.Capture", body(EmailAddress="b@example.com")).json()["Status"] == "Success"
    assert client.sb.bulk_refusals == 1 and client.sb.refusals == 0
    assert [c.outcome for c in client.sb.calls_to("Lead/Bulk/CreateOrUpdate")] == ["ok", "refused"]


@pytest.mark.leadsquared_sandbox(rate_limit_calls=2, rate_limit_period=60.0)
def test_lead_calls_spend_the_accounts_window(client: LeadClient) -> None:
    client.register("asha@example.com")
    assert client.get("LeadsMetaData.Get").status_code == 200
    refused = client.get("Leads.GetByEmailaddress", emailaddress="asha@example.com")
    assert refused.status_code == 429
    assert refused.json()["ExceptionType"] == "MXAPIRateLimitExceededException"


def test_keys_in_headers_and_wrong_keys(leadsquared_sandbox: Sandbox) -> None:
    headers_client = LeadClient(leadsquared_sandbox, keys_in_headers=True)
    assert headers_client.get("LeadsMetaData.Get").status_code == 200
    wrong = requests.get(
        leadsquared_sandbox.url + BASE + "LeadsMetaData.Get",
        params={"accessKey": "nope", "secretKey": "nope"},
        timeout=10,
    )
    assert wrong.status_code == 401 and wrong.json()["ExceptionType"] == "MXUnAuthorisedException"
    leadsquared_sandbox.set_wrong_region("api-us11.leadsquared.com")
    answer = headers_client.get("LeadsMetaData.Get")
    assert answer.status_code == 401 and "api-us11.leadsquared.com" in answer.json()["ExceptionMessage"]


def test_gateway_faults_and_lost_answers_on_lead_paths(client: LeadClient) -> None:
    client.sb.inject(503, "lost", path=BASE + "Lead.Capture")
    fault = client.post("Lead.Capture", body(EmailAddress="a@example.com"))
    assert fault.status_code == 503 and fault.headers["Content-Type"].startswith("text/html")
    assert client.sb.leads == []  # a gateway fault: not processed
    lost = client.post("Lead.Capture", body(EmailAddress="a@example.com"))
    assert lost.status_code == 502
    assert client.sb.find_lead("EmailAddress", "a@example.com") is not None  # processed, answer lost


def test_bad_bodies_are_400(client: LeadClient) -> None:
    assert client.post("Lead.Capture", {"EmailAddress": "a@example.com"}).status_code == 400
    assert client.post("Lead/Bulk/CreateOrUpdate", body(EmailAddress="a@example.com")).status_code == 400
    raw = client.session.post(
        client.sb.url + BASE + "Lead.Capture",
        params=client.params,
        data=b"[]",
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    assert raw.status_code == 400
    wrong_method = client.get("Lead.Capture")
    assert wrong_method.status_code == 405
