#!/usr/bin/env bash
# The SQLite writer's commit time on an upload load (BENCHMARKS.md, "Sixth round"): sequential
# devices, 50 lines per callback, one callback (and commit) at a time. A key that scatters
# sequential identifiers shows here, where the instruction counts of writer-instructions.sh do
# not. Wall-clock: run each binary several times, alternated, with nothing else running.
#   scripts/upload-commit-time.sh [BINARY] [UPLOADS]
set -euo pipefail
binary="${1:-target/release/m2m-listener}"
uploads="${2:-6}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib/listener.sh
source "$(dirname "$0")/lib/listener.sh"
listener_env 19103 19104
start_listener "$binary" serve
"$binary" simulate --url "http://127.0.0.1:19103/" --api-url "http://127.0.0.1:19104" \
  --jobs 0 --uploads "$uploads" --upload-lines 10000 --sms 0 --concurrency 1 >"$work/simulate.log" 2>&1
metrics="$(curl -fsS "http://127.0.0.1:19104/metrics")"
kill -TERM "$listener"
wait "$listener" || true
seconds="$(awk '/^m2m_store_commit_seconds_sum/ {print $2}' <<<"$metrics")"
commits="$(awk '/^m2m_store_commit_seconds_count/ {print $2}' <<<"$metrics")"
stored="$(awk '/^m2m_store_batch_size_sum/ {print $2}' <<<"$metrics")"
echo "uploads=$uploads callbacks=$stored commits=$commits commit_seconds=$seconds"
tail -1 "$work/simulate.log"
