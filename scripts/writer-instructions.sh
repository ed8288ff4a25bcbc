#!/usr/bin/env bash
# The SQLite writer's instructions per callback (BENCHMARKS.md, "The writer's cost per callback").
# Starts the release binary under callgrind on a fresh database, plays a load with `simulate`,
# stops the listener and prints the writer thread's instructions divided by the callbacks stored.
#   scripts/writer-instructions.sh [BINARY] [ten|one]
# ten: jobs of ten devices (200 jobs x 10); one: one new job per callback (2000 jobs x 1).
set -euo pipefail
binary="${1:-target/release/m2m-listener}"
load="${2:-ten}"
case "$load" in
  ten) jobs=200; per_job=10 ;;
  one) jobs=2000; per_job=1 ;;
  *) echo "load is ten or one" >&2; exit 2 ;;
esac
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck source=lib/listener.sh
source "$(dirname "$0")/lib/listener.sh"
listener_env 19101 19102
start_listener valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/cg.out" \
  "$binary" serve
"$binary" simulate --url "http://127.0.0.1:19101/" --api-url "http://127.0.0.1:19102" \
  --jobs "$jobs" --devices-per-job "$per_job" --uploads 0 --sms 0 --concurrency 16 >"$work/simulate.log" 2>&1
metrics="$(curl -fsS "http://127.0.0.1:19102/metrics")"
stored="$(awk '/^m2m_store_batch_size_sum/ {print $2}' <<<"$metrics")"
commits="$(awk '/^m2m_store_batch_size_count/ {print $2}' <<<"$metrics")"
kill -TERM "$listener"
wait "$listener" || true
# The writer is the thread whose profile holds the writer loop.
best=0; best_file=""
for file in "$work"/cg.out-*; do
  if grep -q "Writer.*run" "$file"; then
    total="$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
    if [ "${total:-0}" -gt "$best" ]; then best="$total"; best_file="$file"; fi
  fi
done
echo "load=$load callbacks=$stored commits=$commits writer_Ir=$best per_callback=$((best / ${stored%.*}))"
if [ -n "${KEEP_PROFILE:-}" ]; then cp "$best_file" "$KEEP_PROFILE"; echo "profile: $KEEP_PROFILE"; fi
