#!/usr/bin/env python3
"""Build catalog/error-catalog.json, the fault-code catalog, from the seed documents.

Run from anywhere:  python3 scripts/extract_catalog.py [--seeds DIR] [--output FILE]
Defaults: seeds in ../shared/seeds/ relative to the repository root, output catalog/error-catalog.json.
Python 3.11 standard library only. The output is deterministic: entries sorted by (source, code) with
numbers in codes compared as numbers, two-space indentation, UTF-8, trailing newline. Re-running on the
same seeds gives a byte-identical file, so a diff in review means the seeds or this script changed.

Every entry is {code, message, cause, resolution, class, retryable, source}.

Sources
-------
- thingspace_sync_errors (seed 000): one entry per code row of the "Error Code Error Message Occurs
  When Resolution" tables. The rows are four columns run together with spaces, so they are split by
  sentence: the first sentence (plus continuations such as "Valid values are ...") is the message, the
  cause starts at the first sentence that is not a continuation, the resolution at the first imperative
  sentence ("Verify ...", "Retry ...", ...). Rows the heuristic gets wrong are in SEED_000_SPLIT_OVERRIDES.
- thingspace_upload_devices (seed 001): the UploadDevices package- and line-level texts. Codes are
  synthesized (UPLOAD_PACKAGE.*, UPLOAD_LINE.*) from SEED_001_CODES; message is the exact seed text with
  its "(placeholder)"; cause is the Notes column; resolutions are written here (the seed has none).
  The two success texts the seed mentions outside the table ("Device upload successful" in the LineStatus
  description, "Line has been uploaded successfully" in the callback example) are added as UPLOAD_LINE
  entries so a callback's line status can be explained whichever of them arrives.
- imiconnect_status (seed 002): numeric status codes from the Messaging, Transaction Status, Event and
  Profile tables.
- provisioning_api_errors (seed 003): the "Error Code Listing" (code and description run together).

One code, several rows
----------------------
Seed 000 repeats some codes with different messages (REQUEST_FAILED.UnexpectedError is used for seven
trigger problems), and seed 002 lists several messages under one number (rows without their own code
belong to the code above them; the same number also appears in several tables). Codes in the catalog
are unique, so:
- the first row of a code (in document order; for seed 002 the Transaction Status table first, because
  that is the delivery-status vocabulary, then Messaging, Event, Profile) keeps the bare code;
- every further row with a different message becomes a variant entry `CODE~TAG`: a descriptive tag
  from SEED_000_VARIANT_TAGS for seed 000, an ordinal (`7003~2`, `7003~3`, ...) for seed 002.
  `~` is unreserved in URLs, so `GET /api/v1/errors/{code}` needs no escaping;
- rows that only respell a message already listed for the code (seed 002 lists "Submited" and
  "Submitted", "Span" and "Spam") are folded into it, as are exact repeats.

class
-----
- seed 000: the code's first segment lower-cased (input_invalid, request_failed, input_missing), with
  the seed's "INVALID_INPUT" spelling normalised to input_invalid and DeserializationFailed as
  deserialization.
- seed 001: upload_package (fails the whole upload) or upload_line (one device line).
- seed 002: success, submitted, partial_success, delivered, delivery_failed, expired, message_rejected,
  request_invalid, authentication, configuration, not_found, conflict, rate_limited, internal_error,
  unknown.
- seed 003: authentication, permission_denied, not_found, request_invalid, state_conflict,
  configuration, provider_unavailable, internal_error.

retryable
---------
True when sending the same request again later can succeed without changing it: unexpected/internal
errors, session expiry (log in again, then resend), rate limits, unavailable providers, transient delivery
failures (7201/7202 delivery failed at operator/platform, 7206 SIM full, 7207 out of coverage, 7208 and
other expiries, 7209 multipart, busy/no answer, push server errors). False for input errors, missing or
unknown objects, configuration and authentication problems, permanent delivery failures (7203 unknown
subscriber, 7205 binary error, 7213 unregistered, ...), and for non-errors (delivered, submitted,
successful upload lines). The trigger variants of REQUEST_FAILED.UnexpectedError are deterministic input
problems and so are not retryable, although the bare REQUEST_FAILED.UnexpectedError is.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS_DIRECTORY = REPOSITORY_ROOT.parent / "shared" / "seeds"
DEFAULT_OUTPUT_FILE = REPOSITORY_ROOT / "catalog" / "error-catalog.json"

SOURCE_SYNC_ERRORS = "thingspace_sync_errors"
SOURCE_UPLOAD_DEVICES = "thingspace_upload_devices"
SOURCE_IMICONNECT = "imiconnect_status"
SOURCE_PROVISIONING = "provisioning_api_errors"

# Counted independently of the parsers below (grep for row starts in the seed text) and asserted, so a
# parser that silently drops or merges rows fails the build of the catalog instead of shipping a gap.
EXPECTED_SEED_000_CODE_ROWS = 155
EXPECTED_SEED_000_EXACT_REPEATS = 1
EXPECTED_SEED_001_PACKAGE_ROWS = 15
EXPECTED_SEED_001_LINE_ROWS = 13
EXPECTED_SEED_002_CODED_ROWS = 266
EXPECTED_SEED_002_CONTINUATION_ROWS = 62
EXPECTED_SEED_003_CODE_ROWS = 56

EXPECTED_ENTRIES_PER_SOURCE = {
    SOURCE_SYNC_ERRORS: 154,
    SOURCE_UPLOAD_DEVICES: 30,
    SOURCE_IMICONNECT: 201,
    SOURCE_PROVISIONING: 56,
}


class SeedFormatError(Exception):
    """The seed text does not look the way this script expects; fix the script, not the output."""


def check(condition: bool, message: str) -> None:
    # Real exceptions rather than `assert`, so `python3 -O` cannot skip the checks.
    if not condition:
        raise SeedFormatError(message)


def collapse_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def seed_file(seeds_directory: Path, number: str) -> Path:
    matches = sorted(seeds_directory.glob(f"{number}_*.txt"))
    check(len(matches) == 1, f"expected exactly one {number}_*.txt in {seeds_directory}, found {matches}")
    return matches[0]


def make_entry(code, message, cause, resolution, entry_class, retryable, source) -> dict:
    # Fixed key order: json.dumps keeps insertion order, which keeps the file stable and readable.
    return {
        "code": code,
        "message": message,
        "cause": cause or None,
        "resolution": resolution or None,
        "class": entry_class,
        "retryable": retryable,
        "source": source,
    }


# --------------------------------------------------------------------------------------------------
# Seed 000: ThingSpace synchronous errors
# --------------------------------------------------------------------------------------------------

SEED_000_TABLE_HEADER = "Error Code Error Message Occurs When Resolution"
SEED_000_ROW_START = re.compile(
    r"^(?:INPUT_INVALID|REQUEST_FAILED|INVALID_INPUT|INPUT_MISSING|DeserializationFailed)\b"
)
SEED_000_CODE_TOKEN = re.compile(
    r"^(?:[A-Z]+(?:_[A-Z]+)+(?:\.[A-Za-z0-9_]*)*|DeserializationFailed)$"
)

# A sentence ends at . ! ? or an ellipsis (optionally followed by closing quotes or brackets) when the
# next sentence starts with a capital, a quote, an opening bracket or a {placeholder}.
SENTENCE_BREAK_AFTER_PUNCTUATION = re.compile(r"(?<=[.!?…])([\"')]*)\s+(?=[A-Z\"({])")
# Several rows have no full stop between the message and the cause ("... Active.Test A Deactivate or
# Suspend request ...", '... "service_name" The service name ...'). In this document a capitalised
# article or "You" in the middle of a sentence only happens at such a column boundary.
SENTENCE_BREAK_WITHOUT_PUNCTUATION = re.compile(r"(?<=[^\s.!?…])\s+(?=(?:The|A|An|You|Your) )")

# Second sentences of a message: they qualify the first one rather than describing the request.
MESSAGE_CONTINUATION = re.compile(
    r"^(?:Please|Valid|Could not complete|Can only|One and only|Expecting|A valid|Only valid)\b"
)
# First sentence of a resolution: an instruction.
RESOLUTION_START = re.compile(
    r"^(?:Verify|Retry|Set|Include|Log in|Use|Resend|Remove|Do not|Most requests|Create|Add|Provide"
    r"|Send|Shorten|Convert|Leave|Resubmit|Specify|Put|Talk|For|Follow|Modify|If you|Determine"
    r"|Only use|Contact)\b|^\{\{Contact Support\}\}"
)

# The seed's "{{Contact Support}}" is an unexpanded documentation macro. It is replaced by the contact
# sentence the same document uses for REQUEST_FAILED.UnexpectedError, so the resolution is readable.
CONTACT_SUPPORT_MACRO = "{{Contact Support}}"
CONTACT_SUPPORT_TEXT = "Contact Customer Support at 800.922.0204 for assistance."

# Rows the sentence heuristic splits wrongly: (code, start of the row text after the code) ->
# where the cause and the resolution start (None: the column is empty in the seed).
SEED_000_SPLIT_OVERRIDES = {
    # No full stops at all between the three columns.
    ("INPUT_INVALID.Account.MoveDeviceUnavailable", "This account"): {
        "cause": "The account that you are logged into",
        "resolution": "Talk to your Verizon account representative",
    },
    # The bullet list of missing fields runs straight into the resolution.
    ("INPUT_INVALID.AddressIncomplete", "AddressLine1"): {
        "cause": "One or more of the following required values",
        "resolution": "Resubmit the request",
    },
    ("INPUT_INVALID.MissingCustomerName", "Both FirstName"): {
        "cause": "One or more of the following required values",
        "resolution": "Resubmit the request",
    },
    # Message and resolution only; the "Occurs When" column is empty.
    ("REQUEST_FAILED.CarrierRequestUnsuccessful", "IP Address: xxx.xxx.xxx.xxx is invalid"): {
        "cause": None,
        "resolution": "Verify the IP address",
    },
    ("REQUEST_FAILED.CarrierRequestUnsuccessful", "IP Address: xxx.xxx.xxx.xxx should not"): {
        "cause": None,
        "resolution": "Verify the service plan",
    },
    # Two-sentence message whose second sentence does not look like a continuation.
    ("REQUEST_FAILED.InvalidDeviceIdentifier", "InValid device identifier(s)"): {
        "cause": "The request included some device identifiers",
        "resolution": "Verify the list of device identifiers",
    },
    # Resolutions that open with an explanation instead of an instruction.
    ("INPUT_INVALID.DeviceGroup.DeleteDefault", "Cannot delete"): {
        "cause": "You attempted to delete",
        "resolution": "The default device group automatically contains",
    },
    ("INPUT_INVALID.CycleType.Invalid", "The cycle type"): {
        "cause": "The cycle time in the request",
        "resolution": "DeviceSmsUsage and DeviceDataUsage triggers",
    },
    ("REQUEST_FAILED.UnexpectedError", "Category cannot be changed"): {
        "cause": "The UpdateTrigger request contained",
        "resolution": "You cannot change the TriggerCategory",
    },
    ("INPUT_INVALID.UpdateDeviceInformation.DeviceId", "A new ESN"): {
        "cause": "The request did not include the required fields",
        "resolution": "The request must include a new ESN",
    },
    ("INPUT_INVALID.Lte.ChangeDeviceId", "Cannot set MEID"): {
        "cause": "A ChangeDeviceIdentifier request was sent",
        "resolution": "ChangeDeviceIdentifier can only be used",
    },
    ("INPUT_INVALID.PrimaryPlaceOfUse.NotDefined", "PrimaryPlaceOfUse is required"): {
        "cause": "The goToState request",
        "resolution": "Some state changes required values",
    },
    ("INVALID_INPUT.CarrierPoolNameOnNonB2BCarrier", "Carrier IP pool name"): {
        "cause": "The request contained a value",
        "resolution": "The CarrierIpPoolName parameter is only used",
    },
    ("REQUEST_FAILED.CallbackNotExists", "No DeviceUsage callback"): {
        "cause": "You sent a GetAggregateDeviceUsage",
        "resolution": "Device usage information is only returned",
    },
}

# Rows that repeat an earlier code with a different message: (code, start of the message) -> tag.
# The first row of each code (document order) keeps the bare code.
SEED_000_VARIANT_TAGS = {
    ("REQUEST_FAILED.UnexpectedError", "AccountName cannot be changed"): "AccountNameCannotBeChanged",
    ("REQUEST_FAILED.UnexpectedError", "Category cannot be changed"): "CategoryCannotBeChanged",
    ("REQUEST_FAILED.UnexpectedError", "Can not find the trigger"): "TriggerNotFound",
    ("REQUEST_FAILED.UnexpectedError", "triggerName is already in use"): "TriggerNameInUse",
    ("REQUEST_FAILED.UnexpectedError", "No triggers found"): "NoTriggersFound",
    ("REQUEST_FAILED.UnexpectedError", "TriggerId is invalid"): "TriggerIdInvalid",
    ("REQUEST_FAILED.UnexpectedError", "threshold must be greater than zero"): "ThresholdNotPositive",
    ("REQUEST_FAILED.CarrierRequestUnsuccessful", "IP Address: xxx.xxx.xxx.xxx should not"): (
        "IpAddressNotAllowedForServicePlan"
    ),
    ("INPUT_INVALID.Device.OnlyOneProvidedOfImeiOrIccid", "Cannot provide IMEI without ICCID, or vice versa, for adding"): (
        "AddDevices"
    ),
    ("INPUT_INVALID.DeviceStateFilter", "Invalid device state filter"): "GetDeviceList",
    ("INPUT_INVALID.SmsMessage.TooLong", "A 7-bit SMS message"): "SevenBit",
}

# Retrying the identical request later can succeed only for these (see the module docstring).
SEED_000_RETRYABLE_CODES = {
    "REQUEST_FAILED.UnexpectedError",
    "REQUEST_FAILED.SessionToken.Expired",
}


def read_seed_000_rows(text: str) -> list[tuple[str, str]]:
    """Every (code, rest of row) in the error tables, wrapped rows joined, in document order."""
    rows: list[list[str]] = []
    inside_table = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == SEED_000_TABLE_HEADER:
            inside_table = True
            continue
        if not stripped:
            inside_table = False
            continue
        if not inside_table:
            continue
        if SEED_000_ROW_START.match(stripped):
            rows.append([stripped])
            continue
        check(bool(rows), f"seed 000: table text before the first code row: {stripped!r}")
        # A wrapped row. The one wrapped code in the seed breaks after a dot
        # ("INPUT_INVALID.UpdateDeviceInformation." / "MdnInfoProvidedWithOtherDeviceIdentifier"),
        # and must be glued back without a space.
        previous = rows[-1]
        if len(previous) == 1 and " " not in previous[0] and previous[0].endswith("."):
            previous[0] += stripped
        else:
            previous.append(stripped)
    result = []
    for parts in rows:
        joined = " ".join(parts)
        code, _, rest = joined.partition(" ")
        check(bool(SEED_000_CODE_TOKEN.match(code)), f"seed 000: not a code: {code!r}")
        result.append((code, collapse_whitespace(rest)))
    return result


def split_sentences(text: str) -> list[str]:
    text = SENTENCE_BREAK_AFTER_PUNCTUATION.sub(lambda match: match.group(1) + "\n", text)
    text = SENTENCE_BREAK_WITHOUT_PUNCTUATION.sub("\n", text)
    return [sentence.strip() for sentence in text.split("\n") if sentence.strip()]


def split_seed_000_row(code: str, rest: str, used_overrides: set) -> tuple[str, str | None, str | None]:
    for (override_code, override_start), boundaries in SEED_000_SPLIT_OVERRIDES.items():
        if override_code == code and rest.startswith(override_start):
            used_overrides.add((override_code, override_start))
            return split_at_markers(code, rest, boundaries["cause"], boundaries["resolution"])

    sentences = split_sentences(rest)
    cause_index = 1
    while cause_index < len(sentences) and MESSAGE_CONTINUATION.match(sentences[cause_index]):
        cause_index += 1
    resolution_index = len(sentences)
    for index in range(cause_index + 1, len(sentences)):
        if RESOLUTION_START.match(sentences[index]):
            resolution_index = index
            break
    message = " ".join(sentences[:cause_index])
    cause = " ".join(sentences[cause_index:resolution_index]) or None
    resolution = " ".join(sentences[resolution_index:]) or None
    return message, cause, resolution


def split_at_markers(code, rest, cause_marker, resolution_marker):
    cause_at = rest.find(cause_marker) if cause_marker else None
    resolution_at = rest.find(resolution_marker) if resolution_marker else None
    check(cause_at != -1, f"seed 000 override for {code}: cause marker {cause_marker!r} not found")
    check(resolution_at != -1, f"seed 000 override for {code}: resolution marker not found")
    message_end = cause_at if cause_at is not None else resolution_at
    message = rest[:message_end].strip() if message_end is not None else rest
    cause = rest[cause_at:resolution_at].strip() if cause_at is not None else None
    resolution = rest[resolution_at:].strip() if resolution_at is not None else None
    return message, cause, resolution


def seed_000_class(code: str) -> str:
    first_segment = code.split(".", 1)[0]
    if first_segment == "DeserializationFailed":
        return "deserialization"
    if first_segment == "INVALID_INPUT":
        # The seed spells two codes INVALID_INPUT.*; they are the same kind of error as INPUT_INVALID.*.
        return "input_invalid"
    return first_segment.lower()


def extract_seed_000(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    independent_row_count = sum(1 for line in text.splitlines() if SEED_000_ROW_START.match(line))
    check(
        independent_row_count == EXPECTED_SEED_000_CODE_ROWS,
        f"seed 000: {independent_row_count} lines start with a code, expected {EXPECTED_SEED_000_CODE_ROWS}",
    )
    rows = read_seed_000_rows(text)
    check(
        len(rows) == EXPECTED_SEED_000_CODE_ROWS,
        f"seed 000: parsed {len(rows)} code rows, expected {EXPECTED_SEED_000_CODE_ROWS}",
    )

    used_overrides: set = set()
    used_variant_tags: set = set()
    seen_row_texts: set = set()
    exact_repeats = 0
    entries = []
    codes_seen: set = set()
    for code, rest in rows:
        # A stray table pipe in one row ("... more than once. |A request to remove ...").
        rest = re.sub(r"\s\|(?=\S)", " ", rest)
        if (code, rest) in seen_row_texts:
            exact_repeats += 1
            continue
        seen_row_texts.add((code, rest))

        message, cause, resolution = split_seed_000_row(code, rest, used_overrides)
        if resolution is not None:
            resolution = resolution.replace(CONTACT_SUPPORT_MACRO, CONTACT_SUPPORT_TEXT)
        check(bool(message), f"seed 000: empty message for {code}")

        catalog_code = code
        if code in codes_seen:
            tags = [
                tag
                for (tag_code, message_start), tag in SEED_000_VARIANT_TAGS.items()
                if tag_code == code and message.startswith(message_start)
            ]
            check(len(tags) == 1, f"seed 000: repeated code {code} ({message!r}) needs one variant tag")
            used_variant_tags.add((code, tags[0]))
            catalog_code = f"{code}~{tags[0]}"
        codes_seen.add(code)

        retryable = catalog_code in SEED_000_RETRYABLE_CODES
        entries.append(
            make_entry(catalog_code, message, cause, resolution, seed_000_class(code), retryable, SOURCE_SYNC_ERRORS)
        )

    check(
        exact_repeats == EXPECTED_SEED_000_EXACT_REPEATS,
        f"seed 000: {exact_repeats} rows repeat an earlier row word for word, expected "
        f"{EXPECTED_SEED_000_EXACT_REPEATS}",
    )
    unused_overrides = set(SEED_000_SPLIT_OVERRIDES) - used_overrides
    check(not unused_overrides, f"seed 000: split overrides matched no row: {unused_overrides}")
    check(
        len(used_variant_tags) == len(SEED_000_VARIANT_TAGS),
        "seed 000: some variant tags matched no row",
    )
    return entries


# --------------------------------------------------------------------------------------------------
# Seed 001: UploadDevices package- and line-level texts
# --------------------------------------------------------------------------------------------------

# Exact seed text -> (synthesized code, resolution written for this catalog, retryable).
SEED_001_CODES = {
    # Package level: the whole upload was rejected and nothing was uploaded.
    "Device SKU is not present in ODI": (
        "UPLOAD_PACKAGE.DeviceSkuNotPresentInOdi",
        "Verify the DeviceSku value against the SKUs registered on the Open Development portal, then resubmit the upload.",
        False,
    ),
    "Device SKU is not present in DMD": (
        "UPLOAD_PACKAGE.DeviceSkuNotPresentInDmd",
        "Verify the DeviceSku value; if it is correct, ask your Verizon representative to have the SKU added, then resubmit the upload.",
        False,
    ),
    "Device SKU is not Certified": (
        "UPLOAD_PACKAGE.DeviceSkuNotCertified",
        "Upload devices of a certified SKU, or resubmit once this SKU has completed Verizon certification.",
        False,
    ),
    "Device SKU is CDMA Type and only exception request is supported": (
        "UPLOAD_PACKAGE.DeviceSkuCdmaExceptionOnly",
        "Do not upload CDMA devices; use a SKU for a device type that can still be activated, or contact your Verizon representative about an exception request.",
        False,
    ),
    "Device SKU is missing status in DMD": (
        "UPLOAD_PACKAGE.DeviceSkuMissingStatusInDmd",
        "Contact your Verizon representative to complete the SKU's configuration, then resubmit the upload.",
        False,
    ),
    "Device SKU is certified but not present in DMD": (
        "UPLOAD_PACKAGE.DeviceSkuCertifiedNotInDmd",
        "Contact your Verizon representative to complete the SKU's configuration, then resubmit the upload.",
        False,
    ),
    "No Profile found for email address (odiPortalEmailAddress)": (
        "UPLOAD_PACKAGE.NoProfileForEmailAddress",
        "Use an EmailAddress registered to your Open Development account profile, or register it there, then resubmit the upload.",
        False,
    ),
    "There are no active/approved devices": (
        "UPLOAD_PACKAGE.NoActiveApprovedDevices",
        "Include the devices to upload in DeviceList and resubmit the upload.",
        False,
    ),
    "Device SKU (deviceSku) not provided": (
        "UPLOAD_PACKAGE.DeviceSkuNotProvided",
        "Set DeviceSku to the SKU of the devices and resubmit the upload.",
        False,
    ),
    "Upload Type (uploadType) not provided": (
        "UPLOAD_PACKAGE.UploadTypeNotProvided",
        "Set UploadType to one of the valid upload types and resubmit the upload.",
        False,
    ),
    "Upload Type (uploadType) is invalid. (Must be one of ESN HEX, MEID, IMEI, IMEI ICCID Pair, IMEI ICCID Embedded SIM Pair or IMEI EID Pair)": (
        "UPLOAD_PACKAGE.UploadTypeInvalid",
        "Set UploadType to one of the listed values and resubmit the upload.",
        False,
    ),
    "Email Address (odiPortalEmailAddress) not provided": (
        "UPLOAD_PACKAGE.EmailAddressNotProvided",
        "Set EmailAddress to the address registered on the Open Development portal and resubmit the upload.",
        False,
    ),
    "Email Address (odiPortalEmailAddress) is invalid": (
        "UPLOAD_PACKAGE.EmailAddressInvalid",
        "Correct the EmailAddress format and resubmit the upload.",
        False,
    ),
    "Number of upload lines exceeds threshold of 10,000": (
        "UPLOAD_PACKAGE.UploadLinesExceedThreshold",
        "Split the devices into several uploads of no more than 10,000 devices each.",
        False,
    ),
    "Processing failed due to an unknown error": (
        "UPLOAD_PACKAGE.ProcessingFailedUnknownError",
        "Resubmit the upload later; if it fails again, contact Customer Support.",
        True,
    ),
    # Line level: one device line; the rest of the upload is unaffected.
    "Device upload request submitted": (
        "UPLOAD_LINE.DeviceUploadRequestSubmitted",
        "No action needed; the email report says whether the device was added.",
        False,
    ),
    "Duplicate Device ID (deviceId) found in the request": (
        "UPLOAD_LINE.DuplicateDeviceId",
        "List each device ID only once in the upload.",
        False,
    ),
    "Duplicate EID (eid) found in the request": (
        "UPLOAD_LINE.DuplicateEid",
        "List each EID only once in the upload.",
        False,
    ),
    "Duplicate Device ICCID (iccid) found in the request": (
        "UPLOAD_LINE.DuplicateIccid",
        "List each ICCID only once in the upload.",
        False,
    ),
    "IMEI (deviceId) is invalid": (
        "UPLOAD_LINE.ImeiInvalid",
        "Correct the IMEI and upload the device again.",
        False,
    ),
    "IMEI (deviceId) not provided": (
        "UPLOAD_LINE.ImeiNotProvided",
        "Include the device's IMEI and upload the device again.",
        False,
    ),
    "EID (eId) is invalid": (
        "UPLOAD_LINE.EidInvalid",
        "Correct the EID and upload the device again.",
        False,
    ),
    "EID (eId) not provided": (
        "UPLOAD_LINE.EidNotProvided",
        "Include the device's EID and upload the device again.",
        False,
    ),
    "SIM Id (iccId) is invalid": (
        "UPLOAD_LINE.SimIdInvalid",
        "Correct the ICCID and upload the device again.",
        False,
    ),
    "SIM Id (iccId) not provided": (
        "UPLOAD_LINE.SimIdNotProvided",
        "Include the device's ICCID and upload the device again.",
        False,
    ),
    "Service Plan Missing": (
        "UPLOAD_LINE.ServicePlanMissing",
        "Include a ServicePlan in the Activate element and upload the device again.",
        False,
    ),
    "Service Plan Not Found": (
        "UPLOAD_LINE.ServicePlanNotFound",
        "Use a service plan code that exists in the account and upload the device again.",
        False,
    ),
    "Mdn Zip Code Missing": (
        "UPLOAD_LINE.MdnZipCodeMissing",
        "Include an MdnZipCode in the Activate element and upload the device again.",
        False,
    ),
}

# Success texts found outside the error table: (text, code, cause, where the seed shows it).
SEED_001_EXTRA_SUCCESS_TEXTS = [
    (
        "Device upload successful",
        "UPLOAD_LINE.DeviceUploadSuccessful",
        "The device was uploaded.",
        'LineStatus | string | Either "Device upload successful"',
    ),
    (
        "Line has been uploaded successfully",
        "UPLOAD_LINE.LineUploadedSuccessfully",
        "The device was uploaded (the wording seen in the upload callback example).",
        "<LineStatus>Line has been uploaded successfully",
    ),
]
SEED_001_SUCCESS_RESOLUTION = "No action needed."


def extract_seed_001(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    entries = []
    counts = {"Package": 0, "Line": 0}
    for line in text.splitlines():
        match = re.match(r"^(Package|Line) \|", line)
        if not match:
            continue
        fields = [field.strip() for field in line.rstrip().rstrip("|").split("|")]
        check(len(fields) == 3, f"seed 001: expected 'level | text | notes', got {line!r}")
        level, error_text, notes = fields
        check(error_text in SEED_001_CODES, f"seed 001: no synthesized code for {error_text!r}")
        code, resolution, retryable = SEED_001_CODES[error_text]
        entry_class = "upload_package" if level == "Package" else "upload_line"
        check(code.lower().startswith(entry_class), f"seed 001: {code} is not {entry_class}")
        counts[level] += 1
        entries.append(make_entry(code, error_text, notes, resolution, entry_class, retryable, SOURCE_UPLOAD_DEVICES))

    check(counts["Package"] == EXPECTED_SEED_001_PACKAGE_ROWS, f"seed 001: {counts['Package']} package rows")
    check(counts["Line"] == EXPECTED_SEED_001_LINE_ROWS, f"seed 001: {counts['Line']} line rows")
    check(len(entries) == len(SEED_001_CODES), "seed 001: some synthesized codes matched no row")

    for success_text, code, cause, evidence in SEED_001_EXTRA_SUCCESS_TEXTS:
        check(evidence in text, f"seed 001 no longer shows {success_text!r}")
        entries.append(
            make_entry(code, success_text, cause, SEED_001_SUCCESS_RESOLUTION, "upload_line", False, SOURCE_UPLOAD_DEVICES)
        )
    return entries


# --------------------------------------------------------------------------------------------------
# Seed 002: IMIconnect API status codes
# --------------------------------------------------------------------------------------------------

# Which table's wording wins when a number appears in several: delivery statuses first.
SEED_002_SECTION_PRECEDENCE = ["Transaction Status", "Messaging", "Event", "Profile"]
SEED_002_SECTION_TITLES = set(SEED_002_SECTION_PRECEDENCE)
# Messages the seed spells differently in different tables for the same code. Folded into one entry
# with the preferred spelling; any other difference in wording makes a separate variant entry.
SEED_002_RESPELLINGS = {
    7010: ("Service provider exception", ["Service provider exceptioni"]),
    7111: ("Spam content detected", ["Span content detected"]),
    7120: ("Voice parameters length exceeded", ["Voice params length exceeded"]),
    7121: ("Replaceable parameters could not be fetched.", ["Replaceable params could not be fetched."]),
    7501: ("Submitted", ["Submited"]),
}
# A second description of the same message is kept only when it says something else; the seed also
# repeats descriptions with small slips ("Returned when an occur occurs in server.").
SEED_002_SAME_DESCRIPTION_SIMILARITY = 0.8

# Transient delivery failures: the same message sent again later can be delivered.
SEED_002_TRANSIENT_DELIVERY_FAILURES = {
    7201, 7202, 7206, 7207, 7209, 7211, 7214, 7307, 7401, 7402, 7508, 7517,
}
# (code, start of message, lower-cased) -> class, where neither the keywords nor the ranges fit.
SEED_002_CLASS_OVERRIDES = {
    (7602, "user presence failure"): "delivery_failed",
    (7011, "invalid attribute value"): "request_invalid",
    (7639, ""): "rate_limited",
    (7641, ""): "rate_limited",
}


def seed_002_class(code: int, message: str) -> str:
    lowered = message.lower()
    for (override_code, message_start), entry_class in SEED_002_CLASS_OVERRIDES.items():
        if override_code == code and lowered.startswith(message_start):
            return entry_class
    if code == 1000:
        return "success"
    if code == 1002:
        return "submitted" if "queue" in lowered else "partial_success"
    if code in (7500, 7502):
        return "delivered"
    if code == 7501:
        return "submitted"
    if code == 7200:
        return "unknown"
    if "expired" in lowered:
        return "expired"
    if "whitelisted" in lowered or "white listed" in lowered or "configuration error" in lowered:
        return "configuration"
    if code == 7002 or any(word in lowered for word in ("authentication", "credentials", "access token")):
        return "authentication" if not lowered.startswith("parameter missing") else "request_invalid"
    if any(
        phrase in lowered
        for phrase in ("internal error", "internal server error", "unknown exception", "unknown error", "service provider exception", "server error")
    ):
        return "internal_error"
    if "rate limit" in lowered or "too many" in lowered or "maximum transaction limit" in lowered:
        return "rate_limited"
    if any(phrase in lowered for phrase in ("not found", "doesn't exist", "does not exist", "no results")):
        return "not_found"
    if "already exists" in lowered:
        return "conflict"
    if code in (7007, 7008):
        return "configuration"
    if 7101 <= code <= 7199:
        return "message_rejected"
    if 7201 <= code <= 7299 or 7301 <= code <= 7399 or 7401 <= code <= 7499 or 7503 <= code <= 7599:
        return "delivery_failed"
    return "request_invalid"


def seed_002_retryable(code: int, entry_class: str) -> bool:
    if entry_class in ("internal_error", "rate_limited", "expired"):
        return True
    if entry_class == "delivery_failed":
        return code in SEED_002_TRANSIENT_DELIVERY_FAILURES or code == 7602
    return False


def comparable_message(message: str) -> str:
    return re.sub(r"[^a-z0-9]", "", message.lower())


def extract_seed_002(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    rows = []  # (section, code, message, description, line number)
    section = None
    current_code = None
    coded_rows = 0
    continuation_rows = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped in SEED_002_SECTION_TITLES:
            section = stripped
            current_code = None
            continue
        if "|" not in stripped or stripped.startswith("Code |") or stripped.startswith("---"):
            continue
        check(section is not None, f"seed 002 line {line_number}: table row outside a section")
        fields = [field.strip() for field in stripped.rstrip("|").split("|")]
        check(len(fields) == 3, f"seed 002 line {line_number}: expected three columns: {stripped!r}")
        if re.fullmatch(r"\d{4}", fields[0]):
            current_code = int(fields[0])
            message, description = fields[1], fields[2]
            coded_rows += 1
        else:
            # A row without its own code continues the code above it (same table).
            check(current_code is not None, f"seed 002 line {line_number}: continuation row without a code")
            check(fields[2] == "", f"seed 002 line {line_number}: continuation row with a third column")
            message, description = fields[0], fields[1]
            continuation_rows += 1
        rows.append((section, current_code, message, description, line_number))

    check(coded_rows == EXPECTED_SEED_002_CODED_ROWS, f"seed 002: {coded_rows} coded rows")
    check(continuation_rows == EXPECTED_SEED_002_CONTINUATION_ROWS, f"seed 002: {continuation_rows} continuation rows")

    by_code: dict[int, list[tuple]] = {}
    for row in rows:
        by_code.setdefault(row[1], []).append(row)

    entries = []
    used_respellings: set = set()
    for code in sorted(by_code):
        ordered = sorted(by_code[code], key=lambda row: (SEED_002_SECTION_PRECEDENCE.index(row[0]), row[4]))
        preferred_message, respellings = SEED_002_RESPELLINGS.get(code, (None, []))
        folded_spellings = {comparable_message(spelling) for spelling in [preferred_message, *respellings] if spelling}
        distinct: list[dict] = []  # {message, descriptions}
        for _section, _code, message, description, _line in ordered:
            comparable = comparable_message(message)
            if comparable in folded_spellings:
                used_respellings.add((code, comparable))
                comparable = comparable_message(preferred_message)
                message = preferred_message
            known = next((item for item in distinct if comparable_message(item["message"]) == comparable), None)
            if known is None:
                distinct.append({"message": message, "descriptions": [description]})
            elif all(
                difflib.SequenceMatcher(None, comparable_message(seen), comparable_message(description)).ratio()
                < SEED_002_SAME_DESCRIPTION_SIMILARITY
                for seen in known["descriptions"]
            ):
                # The seed lists "param 'twitter' missing for channel twitter" twice with two explanations.
                known["descriptions"].append(description)
        for ordinal, variant in enumerate(distinct, start=1):
            catalog_code = str(code) if ordinal == 1 else f"{code}~{ordinal}"
            entry_class = seed_002_class(code, variant["message"])
            cause = " ".join(ensure_full_stop(description) for description in variant["descriptions"] if description)
            entries.append(
                make_entry(
                    catalog_code,
                    variant["message"],
                    cause,
                    None,
                    entry_class,
                    seed_002_retryable(code, entry_class),
                    SOURCE_IMICONNECT,
                )
            )
    expected_respellings = {
        (code, comparable_message(spelling))
        for code, (preferred, others) in SEED_002_RESPELLINGS.items()
        for spelling in [preferred, *others]
    }
    check(used_respellings == expected_respellings, f"seed 002: respellings not seen: {expected_respellings - used_respellings}")
    return entries


def ensure_full_stop(sentence: str) -> str:
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


# --------------------------------------------------------------------------------------------------
# Seed 003: provisioning/billing API error codes
# --------------------------------------------------------------------------------------------------

SEED_003_LISTING_HEADER = "Error Code Listing"
SEED_003_ROW = re.compile(r"^([A-Z]{1,3}\d{4})(\S.*)$")


def seed_003_class(code: str, description: str) -> str:
    lowered = description.lower()
    if lowered.startswith("authorization failure"):
        return "authentication"
    if "permission denied" in lowered:
        return "permission_denied"
    if "currently down" in lowered:
        return "provider_unavailable"
    if "could not be generated" in lowered or "error claiming" in lowered or "fatal error" in lowered:
        return "internal_error"
    if "configuration error" in lowered:
        return "configuration"
    if any(phrase in lowered for phrase in ("does not exist", "not found", "can be found")):
        return "not_found"
    if "not in the appropriate status" in lowered or "not appropriate for this action" in lowered or "cannot change" in lowered:
        return "state_conflict"
    return "request_invalid"


def seed_003_retryable(code: str, entry_class: str, description: str) -> bool:
    if code == "S2004":
        # Unknown or expired session key: authenticate again and resend.
        return True
    if "before retrying" in description:
        # "Credit Card Gateway Fatal Error. Please contact Support before retrying."
        return False
    return entry_class in ("provider_unavailable", "internal_error")


def extract_seed_003(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    _before, found, listing = text.partition(SEED_003_LISTING_HEADER)
    check(bool(found), "seed 003: no error code listing")
    independent_row_count = len(re.findall(r"(?m)^[A-Z]{1,3}[0-9]{4}", listing))
    check(independent_row_count == EXPECTED_SEED_003_CODE_ROWS, f"seed 003: {independent_row_count} code lines")

    entries = []
    for line in listing.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        match = SEED_003_ROW.match(stripped)
        check(match is not None, f"seed 003: unexpected line in the listing: {stripped!r}")
        code, description = match.group(1), collapse_whitespace(match.group(2))
        # A trailing "Please ..." sentence is the only resolution this seed gives.
        resolution_match = re.search(r"(?<=\. )Please .*$", description)
        resolution = resolution_match.group(0) if resolution_match else None
        entry_class = seed_003_class(code, description)
        entries.append(
            make_entry(
                code,
                description,
                None,
                resolution,
                entry_class,
                seed_003_retryable(code, entry_class, description),
                SOURCE_PROVISIONING,
            )
        )
    check(len(entries) == EXPECTED_SEED_003_CODE_ROWS, f"seed 003: parsed {len(entries)} rows")
    return entries


# --------------------------------------------------------------------------------------------------


def natural_sort_key(code: str) -> list:
    # "7003~2" before "7003~10"; "C2002" before "C2006".
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", code) if part]


def build_catalog(seeds_directory: Path) -> tuple[list[dict], dict[str, int]]:
    per_source = {
        SOURCE_SYNC_ERRORS: extract_seed_000(seed_file(seeds_directory, "000")),
        SOURCE_UPLOAD_DEVICES: extract_seed_001(seed_file(seeds_directory, "001")),
        SOURCE_IMICONNECT: extract_seed_002(seed_file(seeds_directory, "002")),
        SOURCE_PROVISIONING: extract_seed_003(seed_file(seeds_directory, "003")),
    }
    counts = {source: len(entries) for source, entries in per_source.items()}
    for source, expected in EXPECTED_ENTRIES_PER_SOURCE.items():
        check(counts[source] == expected, f"{source}: {counts[source]} entries, expected {expected}")

    catalog = [entry for entries in per_source.values() for entry in entries]
    seen_codes: dict[str, str] = {}
    for entry in catalog:
        for field in ("code", "message", "class", "source"):
            check(bool(entry[field]), f"{entry['code']}: empty {field}")
        # The Rust lookup is case-insensitive, so codes must be unique ignoring case.
        folded = entry["code"].lower()
        check(folded not in seen_codes, f"duplicate code {entry['code']} ({seen_codes.get(folded)})")
        seen_codes[folded] = entry["source"]
    catalog.sort(key=lambda entry: (entry["source"], natural_sort_key(entry["code"])))
    return catalog, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=Path, default=DEFAULT_SEEDS_DIRECTORY, help="directory of the seed documents")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT_FILE, help="catalog file to write")
    arguments = parser.parse_args()

    try:
        catalog, counts = build_catalog(arguments.seeds)
    except SeedFormatError as error:
        print(f"extract_catalog: {error}", file=sys.stderr)
        return 1

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(catalog, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for source, count in counts.items():
        print(f"{source}: {count} entries")
    print(f"total: {len(catalog)} entries -> {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
