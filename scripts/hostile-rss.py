#!/usr/bin/env python3
"""Peak memory of the listener under concurrent hostile bodies (issue 12).

Starts the release binary on a temporary database, posts CONCURRENCY bodies of SIZE_MIB MiB at
once with a wrong password (JSON with as many device identifiers as fit: the shape that was
quadratic), then a real callback, and prints the answers, the peak resident set (VmHWM), the
resident set afterwards and how long the real callback took.

    cargo build --release && scripts/hostile-rss.py [CONCURRENCY] [SIZE_MIB]
    LISTENER_BINARY=/path/to/other/m2m-listener scripts/hostile-rss.py   # another build
"""

import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

CONCURRENCY = int(sys.argv[1]) if len(sys.argv) > 1 else 24
SIZE_MIB = int(sys.argv[2]) if len(sys.argv) > 2 else 15
BINARY = os.environ.get(
    "LISTENER_BINARY", os.path.join(os.path.dirname(__file__), "..", "target", "release", "m2m-listener")
)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hostile_body(size):
    head = b'{"username":"fleet-ops","password":"wrong","requestId":"hostile","deviceIds":['
    item = b'{"id":"350000000000000","kind":"imei"},'
    count = (size - len(head) - 2) // len(item)
    items = b"".join(b'{"id":"35%013d","kind":"imei"},' % index for index in range(count))
    return head + items.rstrip(b",") + b"]}"


def post(port, body, answers):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as stream:
            stream.sendall(
                b"POST / HTTP/1.1\r\nHost: rss\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            )
            stream.sendall(body)
            answer = stream.recv(64)
            answers[answer[9:12].decode(errors="replace") or "closed"] += 1
    except OSError as error:
        answers[type(error).__name__] += 1


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main():
    directory = tempfile.mkdtemp()
    callback_port, api_port = free_port(), free_port()
    environment = dict(
        os.environ,
        M2M_CALLBACK__LISTEN=f"127.0.0.1:{callback_port}",
        M2M_API__LISTEN=f"127.0.0.1:{api_port}",
        M2M_CALLBACK__CREDENTIALS__0__USERNAME="fleet-ops",
        M2M_CALLBACK__CREDENTIALS__0__PASSWORD="s3cret-rotation-A",
        M2M_TELEMETRY__LEVEL="warn",
    )
    listener = subprocess.Popen(
        [BINARY], cwd=directory, env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", callback_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        body = hostile_body(SIZE_MIB * 1024 * 1024)
        before = status_kib(listener.pid, "VmRSS")
        answers = collections.Counter()
        started = time.monotonic()
        threads = [
            threading.Thread(target=post, args=(callback_port, body, answers))
            for _ in range(CONCURRENCY)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        hostile_seconds = time.monotonic() - started
        time.sleep(1)
        real = (
            b"<CallbackRequest><Username>fleet-ops</Username><Password>s3cret-rotation-A</Password>"
            b"<RequestId>after-the-storm</RequestId><Data><Status>Success</Status></Data></CallbackRequest>"
        )
        real_answers = collections.Counter()
        real_started = time.monotonic()
        post(callback_port, real, real_answers)
        real_ms = (time.monotonic() - real_started) * 1000
        print(f"{CONCURRENCY} concurrent hostile bodies of {len(body) / 2**20:.1f} MiB: "
              f"answers {dict(answers)} in {hostile_seconds:.2f} s")
        print(f"RSS before {before / 1024:.0f} MiB, peak (VmHWM) "
              f"{status_kib(listener.pid, 'VmHWM') / 1024:.0f} MiB, after "
              f"{status_kib(listener.pid, 'VmRSS') / 1024:.0f} MiB")
        print(f"a real callback afterwards: {dict(real_answers)} in {real_ms:.1f} ms")
    finally:
        listener.terminate()
        listener.wait()


if __name__ == "__main__":
    main()
