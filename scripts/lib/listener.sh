# Sourced by the measurement scripts (writer-instructions.sh, upload-commit-time.sh): a listener
# on a fresh database in "$work", on loopback ports.
#   listener_env CALLBACK_PORT API_PORT   sets the listener's environment
#   start_listener COMMAND...             runs COMMAND in the background ($listener), waits for /healthz

listener_env() {
  export M2M_STORAGE__PATH="$work/listener.db"
  export M2M_CALLBACK__LISTEN="127.0.0.1:$1"
  export M2M_API__LISTEN="127.0.0.1:$2"
  export M2M_TELEMETRY__LEVEL=warn
}

start_listener() {
  "$@" >"$work/listener.log" 2>&1 &
  listener=$!
  for _ in $(seq 1 300); do
    curl -fsS "http://$M2M_API__LISTEN/healthz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the listener did not answer on $M2M_API__LISTEN; its log: $work/listener.log" >&2
  return 1
}
