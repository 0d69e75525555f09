#!/bin/sh
# Make a private CA and the certificates of a jobsched cluster with the openssl command.
#
#   examples/tls.sh DIR [NAME...]
#
# writes into DIR (created, mode 0700):
#   ca.pem                        the CA certificate: give it to everyone as --tls-ca
#   ca.key                        the CA's key: keep it offline, it is needed only to add certificates
#   scheduler.pem, scheduler.key  --tls-cert/--tls-key of the scheduler
#   worker.pem, worker.key        --tls-cert/--tls-key of the workers
#   client.pem, client.key        --tls-cert/--tls-key of users' commands (mutual TLS)
#
# The scheduler and worker certificates name localhost, 127.0.0.1, ::1, this host's name and
# every NAME given (a host name or an IP address: the address other hosts dial, i.e. what the
# workers' --advertise and the clients' --scheduler say). Run it again with the same DIR to
# re-issue them with more names: an existing CA is reused, so certificates already handed out stay
# valid. Keys are mode 0600. Works with OpenSSL 1.1/3.x and LibreSSL (macOS).
set -eu

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: $0 DIR [NAME...]   (NAME: extra host name or IP address of scheduler/workers)" >&2
    exit 2
fi
dir=$1
shift
days=${JOBSCHED_TLS_DAYS:-825}   # 825 days: the longest that Apple's TLS clients accept

command -v openssl >/dev/null 2>&1 || { echo "$0: the openssl command is required" >&2; exit 1; }
umask 077                        # every file below is created readable by its owner only
mkdir -p "$dir"
cd "$dir"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
host=$(uname -n 2>/dev/null || true)
case $host in ""|localhost) ;; *) san="$san,DNS:$host" ;; esac
for name in "$@"; do
    case $name in
        *[!0-9.]*) case $name in *:*) san="$san,IP:$name" ;; *) san="$san,DNS:$name" ;; esac ;;
        *) san="$san,IP:$name" ;;
    esac
done

# One config file for every step: LibreSSL's req needs one, and -addext is not portable.
cat > openssl.cnf <<EOF
[ req ]
distinguished_name = req_dn
[ req_dn ]
[ ca ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ peer ]
# schedulers and workers serve TLS and also dial each other: server and client use
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $san
[ client ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:jobsched-client
EOF

new_key() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$1"
    chmod 600 "$1"
}

if [ ! -f ca.key ] || [ ! -f ca.pem ]; then
    new_key ca.key
    openssl req -config openssl.cnf -new -x509 -sha256 -days 3650 -key ca.key \
        -subj "/CN=jobsched CA $(date +%Y%m%d%H%M%S)" -extensions ca -out ca.pem
    echo "made a new CA: $dir/ca.pem"
fi

issue() {  # issue NAME EXTENSIONS
    new_key "$1.key"
    openssl req -config openssl.cnf -new -sha256 -key "$1.key" -subj "/CN=jobsched $1" -out "$1.csr"
    # x509 -req chatters on stderr even when it succeeds: show it only when it fails
    if ! out=$(openssl x509 -req -sha256 -days "$days" -in "$1.csr" -CA ca.pem -CAkey ca.key \
            -CAserial ca.srl -CAcreateserial -extfile openssl.cnf -extensions "$2" -out "$1.pem" 2>&1)
    then
        echo "$out" >&2
        exit 1
    fi
    rm -f "$1.csr"
    chmod 644 "$1.pem"
    echo "made $dir/$1.pem and $dir/$1.key"
}

issue scheduler peer
issue worker peer
issue client client
chmod 644 ca.pem
rm -f openssl.cnf
echo "scheduler and worker certificates are valid for: $san"
