#!/bin/sh
# Every JSON route of a jobsched scheduler, driven with curl.
#
#   JOBSCHED_SCHEDULER=HOST:PORT sh examples/curl.sh
#
# JOBSCHED_SCHEDULER: the scheduler (default 127.0.0.1:50000; https://HOST:PORT for TLS).
# JOBSCHED_TOKEN:     the cluster token, if any; sent as "Authorization: Bearer TOKEN" through
#                     curl's config on stdin, so it never shows in `ps`.
# JOBSCHED_TLS_CA, JOBSCHED_TLS_CERT, JOBSCHED_TLS_KEY: CA to verify the scheduler with, and a
#                     client certificate for mutual TLS, as jobsched itself reads them.
#
# It lists the workers, runs `sh <this directory>/count.sh 3` (the worker must have count.sh at
# that path), polls it until done, starts `sleep 60` and stops it, and lists the jobs. Each
# request and answer is printed; it exits 1 at the first answer that is not 2xx.
set -eu

base=${JOBSCHED_SCHEDULER:-127.0.0.1:50000}
case $base in
    http://* | https://*) ;;
    *) base=http://$base ;;
esac
base=${base%/}
here=$(cd "$(dirname "$0")" && pwd)

# curl's config, read from stdin: the token and the TLS files, when given.
config() {
    if [ -n "${JOBSCHED_TOKEN-}" ]; then
        printf 'header = "Authorization: Bearer %s"\n' "$JOBSCHED_TOKEN"
    fi
    if [ -n "${JOBSCHED_TLS_CA-}" ]; then printf 'cacert = "%s"\n' "$JOBSCHED_TLS_CA"; fi
    if [ -n "${JOBSCHED_TLS_CERT-}" ]; then printf 'cert = "%s"\n' "$JOBSCHED_TLS_CERT"; fi
    if [ -n "${JOBSCHED_TLS_KEY-}" ]; then printf 'key = "%s"\n' "$JOBSCHED_TLS_KEY"; fi
}

# call VERB ROUTE [JSON]: sets $answer to the reply body; prints both unless $quiet is set.
quiet=
call() {
    if [ -z "$quiet" ]; then echo "> $1 $2 ${3-}"; fi
    if [ $# -ge 3 ]; then
        reply=$(config | curl -sS -K - -X "$1" -H "Content-Type: application/json" \
            --data "$3" -w '\n%{http_code}' "$base$2")
    else
        reply=$(config | curl -sS -K - -X "$1" -w '\n%{http_code}' "$base$2")
    fi
    status=$(printf '%s\n' "$reply" | tail -n 1)
    answer=$(printf '%s\n' "$reply" | sed '$d')
    if [ -z "$quiet" ]; then echo "< $status $answer"; fi
    case $status in
        2??) ;;
        *) echo "curl.sh: $1 $2 answered HTTP $status: $answer" >&2; exit 1 ;;
    esac
}

job_id_of() {
    printf '%s\n' "$1" | sed -n 's/.*"job_id": *"\([^"]*\)".*/\1/p'
}

call GET /workers

call POST /start '{"worker_id": "", "command": "sh", "path": "'"$here"'/count.sh", "args": ["3"]}'
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
