#!/usr/bin/env bash
# Contract fuzzing of the API: schemathesis generates requests from docs/openapi.yaml against a
# live listener and checks every answer (no 5xx, status codes and bodies as documented).
# Needs the debug binary (cargo build), schemathesis 4.32.5 and hypothesis 6.130.12 (newer
# hypothesis trips "AST constructor recursion depth mismatch" inside CPython 3.11.7's ast module).
#
# The coverage phase is left out: schemathesis 4.32.5 crashes in it with an internal error
# ("AST constructor recursion depth mismatch") on one operation; the other phases run every check.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/debug/m2m-listener
[ -x "$binary" ] || cargo build --locked
workdir=$(mktemp -d)
trap 'kill "$listener" 2>/dev/null || true; rm -rf "$workdir"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
callback_port=$(free_port)
api_port=$(free_port)

M2M_CALLBACK__LISTEN="127.0.0.1:$callback_port" \
M2M_API__LISTEN="127.0.0.1:$api_port" \
M2M_STORAGE__PATH="$workdir/contract.db" \
M2M_CALLBACK__CREDENTIALS__0__USERNAME= \
M2M_CALLBACK__CREDENTIALS__0__PASSWORD= \
M2M_TELEMETRY__LEVEL=warn \
  "$binary" > "$workdir/listener.log" 2>&1 &
listener=$!

for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$api_port/readyz" > /dev/null && break
  sleep 0.1
done
# Some data for the read endpoints to find.
curl -sf -X POST --data-binary @tests/fixtures/activate_seed004.xml "http://127.0.0.1:$callback_port/" > /dev/null
curl -sf -X POST --data-binary @tests/fixtures/upload_seed001.xml "http://127.0.0.1:$callback_port/" > /dev/null || true

st --config-file scripts/schemathesis.toml run docs/openapi.yaml \
  --url "http://127.0.0.1:$api_port" \
  --phases examples,fuzzing,stateful \
  --max-examples 100 \
  --workers 2 \
  --seed 1
