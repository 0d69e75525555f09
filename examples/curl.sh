#!/bin/sh
# Every JSON route of a jobsched scheduler, driven with curl.
#
#   JOBSCHED_SCHEDULER=HOST:PORT sh examples/curl.sh
#
# It reads the environment variables jobsched's command line reads:
# JOBSCHED_SCHEDULER:  the scheduler (default 127.0.0.1:50000; https://HOST:PORT for TLS).
# JOBSCHED_TOKEN_FILE: a file holding the cluster token, if any; else JOBSCHED_TOKEN, the token
#                      itself. Sent as "Authorization: Bearer TOKEN" through curl's config on
#                      stdin, so it never shows in `ps`.
# JOBSCHED_TLS_CA, JOBSCHED_TLS_CERT, JOBSCHED_TLS_KEY: CA to verify the scheduler with, and a
#                      client certificate for mutual TLS.
#
# It lists the workers, runs `sh <this directory>/count.sh 3` (the worker must have count.sh at
# that path), polls it until done, starts `sleep 60` and stops it, and lists the jobs. Each
# request and answer is printed, the answer byte for byte; it exits 1 at the first answer that
# is not 2xx.
set -eu

base=${JOBSCHED_SCHEDULER:-127.0.0.1:50000}
case $base in
    http://* | https://*) ;;
    *) base=http://$base ;;
esac
base=${base%/}
here=$(cd "$(dirname "$0")" && pwd)
token=${JOBSCHED_TOKEN-}
if [ -n "${JOBSCHED_TOKEN_FILE-}" ]; then
    token=$(cat "$JOBSCHED_TOKEN_FILE") || exit 1
fi
body=$(mktemp)
trap 'rm -f "$body"' EXIT

# json_string TEXT: TEXT as the inside of a JSON string (backslashes and quotes escaped).
json_string() {
    printf '%s' "$1" | sed 's/[\\"]/\\&/g'
}

# curl's config, read from stdin: the token and the TLS files, when given.
config() {
    if [ -n "$token" ]; then
        printf 'header = "Authorization: Bearer %s"\n' "$token"
    fi
    if [ -n "${JOBSCHED_TLS_CA-}" ]; then printf 'cacert = "%s"\n' "$JOBSCHED_TLS_CA"; fi
    if [ -n "${JOBSCHED_TLS_CERT-}" ]; then printf 'cert = "%s"\n' "$JOBSCHED_TLS_CERT"; fi
    if [ -n "${JOBSCHED_TLS_KEY-}" ]; then printf 'key = "%s"\n' "$JOBSCHED_TLS_KEY"; fi
}

# call VERB ROUTE [JSON]: sets $answer to the reply body; prints both unless $quiet is set.
quiet=
call() {
    if [ -z "$quiet" ]; then printf '> %s %s %s\n' "$1" "$2" "${3-}"; fi
    if [ $# -ge 3 ]; then
        status=$(config | curl -sS -K - -X "$1" -H "Content-Type: application/json" \
            --data "$3" -o "$body" -w '%{http_code}' "$base$2")
    else
        status=$(config | curl -sS -K - -X "$1" -o "$body" -w '%{http_code}' "$base$2")
    fi
    answer=$(cat "$body")
    if [ -z "$quiet" ]; then
        printf '< %s ' "$status"
        cat "$body"
        printf '\n'
    fi
    case $status in
        2??) ;;
        *) printf 'curl.sh: %s %s answered HTTP %s: %s\n' "$1" "$2" "$status" "$answer" >&2; exit 1 ;;
    esac
}

job_id_of() {
    printf '%s\n' "$1" | sed -n 's/.*"job_id": *"\([^"]*\)".*/\1/p'
}

call GET /workers

call POST /start '{"worker_id": "", "command": "sh", "path": "'"$(json_string "$here")"'/count.sh", "args": ["3"]}'
job=$(job_id_of "$answer")

# Poll until done (bounded: count.sh 3 takes about 2 seconds).
quiet=1
i=0
while :; do
    call POST /query '{"job_id": "'"$job"'"}'
    case $answer in *'"done": true'*) break ;; esac
    i=$((i + 1))
    if [ "$i" -ge 60 ]; then echo "curl.sh: job $job still running after 60 s" >&2; exit 1; fi
    sleep 1
done
quiet=
call POST /query '{"worker_id": "", "job_id": "'"$job"'"}'

call POST /start '{"command": "sleep", "args": ["60"]}'
sleeper=$(job_id_of "$answer")
call POST /stop '{"job_id": "'"$sleeper"'"}'
call POST /query '{"job_id": "'"$sleeper"'"}'

call GET /jobs
