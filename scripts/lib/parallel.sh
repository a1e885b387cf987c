# A few commands at a time in the background, each passed as words ("$@"), never as text to re-parse, so paths
# with spaces or quotes reach the program unchanged. Sourced by the CPU-scale scripts:
#   source scripts/lib/parallel.sh
#   par_run LOG CMD [ARG...]   start CMD with stdout and stderr to LOG ("-": the script's own) and stdin from
#                              /dev/null, after waiting while PAR_JOBS (default 2) commands are running
#   par_wait                   wait for every started command; returns 1, after one line per failed command,
#                              if any failed (under `set -e` the script then stops, as it did with xargs)
# A command that fails does not stop the others already queued in the same phase (as with xargs).
# INT (Ctrl-C) or TERM to the script sends TERM to every running command and everything it started (the stages
# then checkpoint and exit 143), waits for them and exits 130 / 143, instead of leaving them running unattended.

# Empty arrays ("${extra[@]}" with nothing in it) are an unbound-variable error under `set -u` before bash 4.4.
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "error: these scripts need bash 4.4 or newer (this is bash $BASH_VERSION)" >&2
  exit 2
fi

PAR_JOBS="${PAR_JOBS:-2}"
_par_pids=()      # the running commands; each is the leader of its own process group (see par_run)
_par_logs=()      # their log files (or, with no log file, the command), for the failure messages
_par_failed=0     # commands that ended non-zero since the last par_wait

_par_collect() {  # $1: index into _par_pids of a command that has ended or is about to; reads its status
  local status=0
  wait "${_par_pids[$1]}" || status=$?
  if [ "$status" -ne 0 ]; then
    _par_failed=$((_par_failed + 1))
    echo "failed (exit $status): ${_par_logs[$1]}" >&2
  fi
}

_par_reap() {  # forget the commands that have ended, counting the failures
  local i pids=() logs=()
  for i in "${!_par_pids[@]}"; do
    if kill -0 "${_par_pids[i]}" 2>/dev/null; then
      pids+=("${_par_pids[i]}"); logs+=("${_par_logs[i]}")
    else
      _par_collect "$i"
    fi
  done
  _par_pids=("${pids[@]}"); _par_logs=("${logs[@]}")
}

par_run() {
  local log="$1" job_control=0
  shift
  _par_reap
  while [ "${#_par_pids[@]}" -ge "$PAR_JOBS" ]; do
    sleep 1
    _par_reap
  done
  # Job control while starting it puts the command in its own process group, so that _par_stop can reach the
  # programs it starts too (a function or a nested bash would otherwise die alone and leave its child running).
  [[ $- == *m* ]] && job_control=1
  set -m
  if [ "$log" = - ]; then
    "$@" < /dev/null &
  else
    "$@" > "$log" 2>&1 < /dev/null &
  fi
  _par_pids+=("$!")
  if [ "$log" = - ]; then _par_logs+=("$*"); else _par_logs+=("see $log"); fi
  [ "$job_control" = 1 ] || set +m
}

par_wait() {
  local i failed
  for i in "${!_par_pids[@]}"; do
    _par_collect "$i"
  done
  _par_pids=(); _par_logs=()
  failed="$_par_failed"
  _par_failed=0
  if [ "$failed" -ne 0 ]; then
    echo "$failed command(s) failed" >&2
    return 1
  fi
}

_par_stop() {  # $1: exit status; runs on INT or TERM
  trap '' INT TERM
  local pid
  for pid in "${_par_pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  # Wait for each whole process group, not only its leader (a stage may still be writing its checkpoint after a
  # wrapping shell has gone); bounded, in case an orphan is never reaped.
  for pid in "${_par_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
    for _ in {1..600}; do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 0.1
    done
  done
  echo "stopped: sent TERM to the ${#_par_pids[@]} running command(s)" >&2
  exit "$1"
}
trap '_par_stop 130' INT
trap '_par_stop 143' TERM
