#!/usr/bin/env python3
"""Writes the upgrade fixtures of one release: a database written by that release's own binary,
and the answers its API gave about it.

    scripts/make-upgrade-fixture.py COMMIT [--binary PATH] [--postgres-url URL] [--out DIR]

COMMIT is the released commit (the last landed `main` before a schema change). Without --binary
the script checks it out in a temporary worktree and builds it (`cargo build --release`). The
binary runs as a real process on a temporary directory (SQLite) and then on a fresh schema
(PostgreSQL), is fed real payloads from tests/fixtures/ through its callback port and its API
(registered jobs, an upload, a failed activation, a re-delivery, quarantined bodies, an MO SMS, a
job that times out, one adopted by a late registration), records what its API answers, and is
stopped with SIGTERM. It writes into DIR (default tests/fixtures/upgrade/):

    sqlite-v<N>.db              the database after a TRUNCATE checkpoint (no -wal), user_version N
    sqlite-v<N>.expected.json   the answers of that release about it
    postgres-v<M>.sql           pg_dump --no-owner --no-privileges --inserts of the schema, whose
                                name is m2m_upgrade_fixture (tests/api/upgrade.rs loads it under
                                a fresh name); psql-only meta-commands (\\restrict) left out
    postgres-v<M>.expected.json

N and M are the schema versions each backend records (`PRAGMA user_version`, the largest
`schema_migrations.version`). Keep every pair: when a release changes a schema, run this script
on that release and add the new files beside the old ones; `tests/api/upgrade.rs` opens them all.

Every job is finished before the answers are recorded (unregistered jobs get a deadline of
seconds), so nothing in them depends on when the test runs later.
"""

import argparse
import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPOSITORY, "tests", "fixtures")
API_TOKEN = "upgrade-fixture-token"
POSTGRES_SCHEMA = "m2m_upgrade_fixture"

# The pairs tests/api/helpers.rs::test_credentials accepts, in the same order.
CREDENTIALS = [
    ("", "", None),
    ("test", "test", "seed-account"),
    ("fleet-ops", "s3cret-rotation-A", None),
]

TIMEOUT_JOB = "3e6a1f6c-8b0d-4f7e-a2c4-5d9e1b7a0c33"


def fixture(name):
    with open(os.path.join(FIXTURES, name), "rb") as file:
        return file.read()


def with_callback_count(body, count):
    start = body.index(b"<CallbackCount>") + len(b"<CallbackCount>")
    end = body.index(b"<", start)
    return body[:start] + str(count).encode() + body[end:]


def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


class Listener:
    """The release binary as a process of its own, on fixed ports."""

    def __init__(self, binary, directory, storage):
        self.callback_port = free_port()
        self.api_port = free_port()
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("M2M_")
        }
        environment.update(
            {
                "M2M_CALLBACK__LISTEN": f"127.0.0.1:{self.callback_port}",
                "M2M_API__LISTEN": f"127.0.0.1:{self.api_port}",
                "M2M_API__TOKEN": API_TOKEN,
                "M2M_STORAGE__PATH": os.path.join(directory, "m2m-listener.db"),
                # A job never registered closes on what it received once this passes.
                "M2M_JOBS__DEFAULT_TIMEOUT_S": "2",
                "M2M_JOBS__SWEEP_INTERVAL_MS": "100",
                "M2M_TELEMETRY__LEVEL": "warn",
            }
        )
        for index, (username, password, account) in enumerate(CREDENTIALS):
            environment[f"M2M_CALLBACK__CREDENTIALS__{index}__USERNAME"] = username
            environment[f"M2M_CALLBACK__CREDENTIALS__{index}__PASSWORD"] = password
            if account:
                environment[f"M2M_CALLBACK__CREDENTIALS__{index}__ACCOUNT"] = account
        environment.update(storage)
        self.log = open(os.path.join(directory, "listener.log"), "wb")
        self.process = subprocess.Popen(
            [binary, "serve"],
            cwd=directory,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the listener did not become ready; see {self.log.name}")
            time.sleep(0.05)

    def request(self, method, path, body=None, port=None, content_type="application/json"):
        url = f"http://127.0.0.1:{port or self.api_port}{path}"
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Authorization", f"Bearer {API_TOKEN}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers.get("Content-Type"), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type"), error.read()

    def callback(self, body, expected_status=200):
        status, _, answer = self.request(
            "POST", "/", body, port=self.callback_port, content_type="text/xml; charset=utf-8"
        )
        if status != expected_status:
            sys.exit(f"callback answered {status}, expected {expected_status}: {answer!r}")

    def json(self, path):
        status, _, body = self.request("GET", path)
        if status != 200:
            sys.exit(f"GET {path} answered {status}: {body!r}")
        return json.loads(body)

    def stop(self):
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.log.close()
        if code != 0:
            sys.exit(f"the listener exited with {code} on SIGTERM; see {self.log.name}")


def register(listener, registration, expected_status=201):
    status, _, body = listener.request("POST", "/api/v1/jobs", json.dumps(registration).encode())
    if status != expected_status:
        sys.exit(f"registering {registration['request_id']} answered {status}: {body!r}")


REGISTRATIONS = [
    {
        "request_id": "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33",
        "operation": "activate",
        "account": "0342077109-00001",
        "label": "pilot activation",
        "devices": [
            {"kind": "MEID", "id": "A1000000444461"},
            {"kind": "MEID", "id": "A1000000444462"},
        ],
        "timeout_s": 3600,
    },
    {
        "request_id": "5afbb4c7-99dc-49a7-8341-7406b7d6f3d3",
        "operation": "upload_devices",
        "expected_devices": 2,
        "timeout_s": 3600,
    },
    {
        "request_id": "7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11",
        "operation": "deactivate",
        "devices": [{"kind": "IMEI", "id": "990000862471854"}],
    },
    {
        "request_id": TIMEOUT_JOB,
        "operation": "activate",
        "label": "times out with one device missing",
        "devices": [
            {"kind": "MEID", "id": "A1000000444462"},
            {"kind": "MEID", "id": "A1000000449999"},
        ],
        "timeout_s": 1,
    },
]

# Registered after its callback arrived: adopts what was received.
LATE_REGISTRATION = {
    "request_id": "5d4ba5a4-7d1b-4a4e-9c2a-0f3f4b1f2c10",
    "operation": "activate",
    "expected_devices": 1,
    "timeout_s": 3600,
}


def feed(listener):
    """What the release stores: every kind of callback the fixtures hold, and the jobs."""
    for registration in REGISTRATIONS:
        register(listener, registration)
    listener.callback(fixture("json_fault.json"))
    register(listener, LATE_REGISTRATION)
    listener.callback(fixture("activate_seed004.xml"))
    listener.callback(fixture("activate_failed.xml"))
    listener.callback(with_callback_count(fixture("activate_seed004.xml"), 2))  # duplicate
    listener.callback(fixture("activate_seed004_malformed.xml"))  # quarantined
    listener.callback(fixture("json_malformed.json"))  # quarantined
    listener.callback(fixture("upload_seed001.xml"))
    listener.callback(fixture("deactivate_bare.xml"))
    listener.callback(fixture("sms_mo.xml"))
    listener.callback(fixture("json_nidd_uplink.json"))  # a NIDD message (issue 14 on)
    listener.callback(fixture("promo_change.xml"))
    listener.callback(fixture("resume_tracking.xml"))
    listener.callback(fixture("json_change_identifier.json"))
    listener.callback(
        fixture("activate_failed.xml").replace(
            b"2c90bd28-ece4-42ef-9f02-7e3bd4fbff33", TIMEOUT_JOB.encode()
        )
    )
    listener.callback(b"<Envelope>not a callback", expected_status=400)  # nothing stored

    deadline = time.monotonic() + 30
    while any(
        listener.json(f"/api/v1/jobs?state={state}")["items"] for state in ("pending", "in_progress")
    ):
        if time.monotonic() > deadline:
            sys.exit("jobs still open after 30 s: the sweep did not close them")
        time.sleep(0.2)
    late = listener.json(f"/api/v1/jobs/{LATE_REGISTRATION['request_id']}")
    if not late["registered"] or late["deliveries"] != 1:
        sys.exit(f"the late registration did not adopt its callback: {late}")
    timed_out = listener.json(f"/api/v1/jobs/{TIMEOUT_JOB}")
    if timed_out["state"] != "timed_out":
        sys.exit(f"the job with a one-second deadline is {timed_out['state']}")


def pages(listener, path, cursor="cursor"):
    """A listing two items a page, following next_cursor (passed back as `cursor`): the cursors
    are answers too."""
    separator = "&" if "?" in path else "?"
    paths = [f"{path}{separator}limit=2"]
    while True:
        page = listener.json(paths[-1])
        if not page.get("next_cursor"):
            return paths
        paths.append(f"{path}{separator}limit=2&{cursor}={urllib.parse.quote(str(page['next_cursor']))}")


def record(listener):
    """Every answer the test asks the new code for again: (method, path, request body)."""
    requests = [("GET", "/api/v1/jobs?limit=1000", None), ("GET", "/api/v1/deliveries?limit=1000", None)]
    requests += [("GET", path, None) for path in pages(listener, "/api/v1/jobs")]
    requests += [("GET", path, None) for path in pages(listener, "/api/v1/deliveries")]
    for result in ("stored", "duplicate", "quarantined"):
        requests.append(("GET", f"/api/v1/deliveries?result={result}&limit=1000", None))
    identifiers = set()
    for job in listener.json("/api/v1/jobs?limit=1000")["items"]:
        request_id = urllib.parse.quote(job["request_id"], safe="")
        requests += [
            ("GET", f"/api/v1/jobs/{request_id}", None),
            ("GET", f"/api/v1/jobs/{request_id}/devices", None),
            ("GET", f"/api/v1/jobs/{request_id}/devices?reveal=secrets", None),
            ("GET", f"/api/v1/jobs/{request_id}/devices?format=csv", None),
            ("GET", f"/api/v1/deliveries?request_id={request_id}&limit=1000", None),
        ]
        for device in listener.json(f"/api/v1/jobs/{request_id}/devices")["items"]:
            identifiers.update((each["kind"], each["id"]) for each in device["identifiers"])
    for kind, identifier in sorted(identifiers):
        path = f"/api/v1/devices/{urllib.parse.quote(kind, safe='')}/{urllib.parse.quote(identifier, safe='')}"
        requests += [("GET", path, None), ("GET", f"{path}?reveal=secrets", None)]
        if listener.request("GET", f"{path}/messages")[0] == 200:  # issue 14 on
            requests.append(("GET", f"{path}/messages", None))
    for delivery in listener.json("/api/v1/deliveries?limit=1000")["items"]:
        # This release answers /raw with the exact bytes; later ones do so on reveal=secrets.
        requests.append(("GET", f"/api/v1/deliveries/{delivery['id']}/raw?reveal=secrets", None))
    if listener.request("GET", "/api/v1/events")[0] == 200:  # the event outbox, issue 15 on
        requests.append(("GET", "/api/v1/events?limit=1000", None))
        requests += [("GET", path, None) for path in pages(listener, "/api/v1/events", cursor="after")]
        for event in listener.json("/api/v1/events?limit=1000")["items"]:
            requests.append(("GET", f"/api/v1/events/{urllib.parse.quote(event['id'], safe='')}", None))
    # The same registrations again: "already registered", not a conflict.
    for registration in REGISTRATIONS + [LATE_REGISTRATION]:
        requests.append(("POST", "/api/v1/jobs", registration))

    answers = []
    for method, path, body in requests:
        encoded = None if body is None else json.dumps(body).encode()
        status, content_type, answer = listener.request(method, path, encoded)
        entry = {"method": method, "path": path}
        if body is not None:
            entry["body"] = body
        entry.update({"status": status, "content_type": content_type})
        if content_type and content_type.startswith("application/json"):
            entry["json"] = json.loads(answer)
        else:
            try:
                entry["text"] = answer.decode("utf-8")
            except UnicodeDecodeError:
                entry["base64"] = base64.b64encode(answer).decode()
        answers.append(entry)
    return answers


def write_expected(path, release, backend, schema_version, answers):
    document = {
        "release": release,
        "backend": backend,
        "schema_version": schema_version,
        "generated_by": "scripts/make-upgrade-fixture.py",
        "api_token": API_TOKEN,
        "answers": answers,
    }
    with open(path, "w") as file:
        json.dump(document, file, indent=1, ensure_ascii=False)
        file.write("\n")


def sqlite_fixture(binary, release, out):
    with tempfile.TemporaryDirectory() as directory:
        listener = Listener(binary, directory, {})
        feed(listener)
        answers = record(listener)
        listener.stop()
        database = os.path.join(directory, "m2m-listener.db")
        connection = sqlite3.connect(database)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        connection.close()
        for suffix in ("-wal", "-shm"):
            if os.path.exists(database + suffix):
                if suffix == "-wal" and os.path.getsize(database + suffix) != 0:
                    sys.exit("the WAL is not empty after the checkpoint")
                os.remove(database + suffix)
        shutil.copyfile(database, os.path.join(out, f"sqlite-v{version}.db"))
        write_expected(
            os.path.join(out, f"sqlite-v{version}.expected.json"), release, "sqlite", version, answers
        )
        print(f"sqlite-v{version}: {len(answers)} answers")


def postgres_fixture(binary, release, out, base_url):
    def psql(sql):
        quiet = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
        subprocess.run(["psql", base_url, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, env=quiet)

    psql(f"DROP SCHEMA IF EXISTS {POSTGRES_SCHEMA} CASCADE; CREATE SCHEMA {POSTGRES_SCHEMA}")
    separator = "&" if "?" in base_url else "?"
    url = f"{base_url}{separator}options=-c%20search_path%3D{POSTGRES_SCHEMA}"
    with tempfile.TemporaryDirectory() as directory:
        listener = Listener(binary, directory, {"M2M_STORAGE__URL": url})
        feed(listener)
        answers = record(listener)
        listener.stop()
    version = subprocess.run(
        ["psql", url, "-Atc", "SELECT max(version) FROM schema_migrations"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dump = subprocess.run(
        [
            "pg_dump",
            "--no-owner",
            "--no-privileges",
            "--inserts",
            f"--schema={POSTGRES_SCHEMA}",
            base_url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # \restrict and \unrestrict are for psql; the test loads the dump through a client.
    dump = "".join(line for line in dump.splitlines(keepends=True) if not line.startswith("\\"))
    with open(os.path.join(out, f"postgres-v{version}.sql"), "w") as file:
        file.write(dump)
    write_expected(
        os.path.join(out, f"postgres-v{version}.expected.json"),
        release,
        "postgres",
        int(version),
        answers,
    )
    psql(f"DROP SCHEMA {POSTGRES_SCHEMA} CASCADE")
    print(f"postgres-v{version}: {len(answers)} answers")


def build(commit):
    worktree = tempfile.mkdtemp(prefix=f"m2m-release-{commit}-")
    subprocess.run(["git", "-C", REPOSITORY, "worktree", "add", "--detach", worktree, commit], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "m2m-listener"], cwd=worktree, check=True)
    print(f"built in {worktree} (left for reuse with --binary; git worktree remove it when done)")
    return os.path.join(worktree, "target", "release", "m2m-listener")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", help="the released commit the binary is built from")
    parser.add_argument("--binary", help="that commit's release binary (else built here)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("M2M_TEST_POSTGRES_URL") or "postgres://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument("--out", default=os.path.join(FIXTURES, "upgrade"))
    arguments = parser.parse_args()
    binary = os.path.abspath(arguments.binary) if arguments.binary else build(arguments.commit)
    os.makedirs(arguments.out, exist_ok=True)
    sqlite_fixture(binary, arguments.commit, arguments.out)
    postgres_fixture(binary, arguments.commit, arguments.out, arguments.postgres_url)


if __name__ == "__main__":
    main()
