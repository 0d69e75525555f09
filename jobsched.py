#!/usr/bin/env python3
"""jobsched: one scheduler, many workers, jobs run anywhere -- over XML-RPC, stdlib only.

Copy this one file to every host; it needs Python 3.6+ and nothing else.

    python3 jobsched.py scheduler                 # the cluster's front door
    python3 jobsched.py worker --scheduler H:P    # on each host that runs jobs
    python3 jobsched.py run -- make test          # start a job, follow it, exit with its code

Three ways to drive it: the command line above; any XML-RPC client (``POST /RPC2``) or
``curl`` against the scheduler's JSON routes; or ``import jobsched`` and use
:class:`Scheduler`, :class:`Worker` and :class:`Client`.

License: MIT (see LICENSE).
"""

import argparse
import base64
import errno
import fcntl
import functools
import hmac
import http.client
import inspect
import io
import ipaddress
import json
import logging
import os
import pyexpat
import queue
import random
import re
import select
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import _thread
import time
import uuid
import xmlrpc.client
import xmlrpc.server
from collections import deque

try:
    import ssl
except ImportError:  # a Python built without OpenSSL still runs plain HTTP
    ssl = None

__version__ = "1.0.0"
__all__ = [
    "JobschedError", "NotFound", "BadRequest", "Unavailable", "Unreachable", "OutcomeUnknown",
    "InternalError",
    "ConfigError", "Security", "Headers", "RequestHandler", "RPCServer", "RPCClient", "Client", "Job", "Worker", "WorkerRecord",
    "Scheduler", "main",
]

log = logging.getLogger("jobsched")

DEFAULT_SCHEDULER = "127.0.0.1:50000"
DEFAULT_WORKER = "127.0.0.1:30000"
MiB = 1024 * 1024
MAX_OUTPUT_CHUNK = MiB        # the most bytes one output() call returns
MAX_WAIT_SECONDS = 60.0       # the longest an output() long-poll may wait
FOLLOW_POLL_SECONDS = 0.02    # how often a waiting output() looks at the file again
MISSED_HEARTBEATS = 3         # a worker silent this many intervals is offline
JOB_INDEX_LIMIT = 1000000     # job ids the scheduler remembers; older ones are asked for
JOURNAL_LIMIT = 4 * MiB       # a worker's journal of started jobs is rewritten past this size


# ---------------------------------------------------------------------------------------------
# Errors and wire format
# ---------------------------------------------------------------------------------------------

NOT_FOUND, BAD_REQUEST, UNAVAILABLE, INTERNAL = 1, 2, 3, 4
HTTP_STATUS = {NOT_FOUND: 404, BAD_REQUEST: 400, UNAVAILABLE: 503, INTERNAL: 500}


class JobschedError(Exception):
    """Root of every error jobsched raises. ``code`` is the XML-RPC fault code it travels as."""
    code = INTERNAL


class NotFound(JobschedError):
    """Unknown job or worker (fault 1)."""
    code = NOT_FOUND


class BadRequest(JobschedError):
    """Wrong types, unknown option or refused input (fault 2)."""
    code = BAD_REQUEST


class Unavailable(JobschedError):
    """No worker, worker offline, unreachable or full (fault 3)."""
    code = UNAVAILABLE


class Unreachable(Unavailable):
    """The peer could not be reached or answered at the HTTP level (no fault was received).

    Raised as such, the request certainly was not acted on: it was never sent whole (refused,
    failed TLS handshake), or the server refused it at the HTTP level."""


class OutcomeUnknown(Unreachable):
    """The request was sent but no answer came (timed out, connection lost): the peer may or may
    not have acted on it. Only an idempotent request may simply be sent again."""


class InternalError(JobschedError):
    """A bug or an unexpected condition on the server (fault 4)."""
    code = INTERNAL


class ConfigError(JobschedError):
    """A refused configuration; the command line exits 2 with its message."""
    code = BAD_REQUEST


_ERROR_BY_CODE = {NOT_FOUND: NotFound, BAD_REQUEST: BadRequest, UNAVAILABLE: Unavailable,
                  INTERNAL: InternalError}


def error_from_fault(fault):
    return _ERROR_BY_CODE.get(fault.faultCode, JobschedError)(fault.faultString)


def wire_int(n):
    """XML-RPC ints are 32-bit: larger counts (offsets, sizes) travel as doubles."""
    return n if -2 ** 31 <= n < 2 ** 31 else float(n)


def without_none(struct):
    """XML-RPC has no null: an absent value is an absent key."""
    return {k: v for k, v in struct.items() if v is not None}


class _WireMarshaller(xmlrpc.client.Marshaller):
    """The stdlib's marshaller, but Binary goes as one base64 line: the stdlib's 76-column lines
    cost one b2a_base64 call per 57 bytes here and two parser callbacks per line at the peer."""
    dispatch = dict(xmlrpc.client.Marshaller.dispatch)

    def dump_binary(self, value, write):
        write("<value><base64>")
        write(base64.b64encode(value.data).decode("ascii"))
        write("</base64></value>\n")
    dispatch[xmlrpc.client.Binary] = dump_binary

    def dump_long(self, value, write):
        # XML-RPC ints are 32-bit: a larger one (an offset, a peer's <i8>) goes as a double
        # instead of failing the whole call.
        if -2 ** 31 <= value < 2 ** 31:
            write("<value><int>%d</int></value>\n" % value)
        else:
            self.dump_double(float(value), write)
    dispatch[int] = dump_long


def dumps_request(method, params):
    """xmlrpc.client.dumps(params, method), UTF-8 encoded, with _WireMarshaller's rules."""
    body = _WireMarshaller("utf-8", False).dumps(params)
    return ("<?xml version='1.0'?>\n<methodCall>\n<methodName>%s</methodName>\n%s</methodCall>\n"
            % (method, body)).encode("utf-8")


def dumps_response(result):
    """xmlrpc.client.dumps((result,), methodresponse=True), UTF-8 encoded, Binary on one line."""
    body = _WireMarshaller("utf-8", False).dumps((result,))
    return ("<?xml version='1.0'?>\n<methodResponse>\n%s</methodResponse>\n" % body).encode("utf-8")


class _RelayedReply(bytes):
    """A peer's whole XML-RPC reply, passed on unparsed (the scheduler relaying output)."""


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_NOT_XML_CHARS = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def bounded_int(text):
    """int() of a long digit string is quadratic before Python 3.11: refuse what no field needs."""
    if len(text.strip()) > 40:
        raise ValueError("integer of %d digits is too long" % len(text.strip()))
    return int(text)


class _Unmarshaller(xmlrpc.client.Unmarshaller):
    """xmlrpc.client's, with integers parsed by bounded_int."""

    def end_int(self, data):
        self.append(bounded_int(data))
        self._value = 0
    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)
    dispatch.update(dict.fromkeys(("i1", "i2", "i4", "i8", "int", "biginteger"), end_int))


def loads_request(body):
    """(params, method name) of an XML-RPC request. A DTD is refused as soon as expat meets it,
    whatever the document's encoding, so no entity is ever defined, let alone expanded."""
    unmarshaller = _Unmarshaller()
    parser = xmlrpc.client.ExpatParser(unmarshaller)

    def refuse_dtd(*args):
        raise BadRequest("DTDs and entity declarations are not allowed")
    parser._parser.StartDoctypeDeclHandler = parser._parser.EntityDeclHandler = refuse_dtd
    parser.feed(body)
    parser.close()
    return unmarshaller.close(), unmarshaller.getmethodname()


def want_str(value, name, limit=4096, empty=True):
    if not isinstance(value, str):
        raise BadRequest("%s must be a string, not %s" % (name, type(value).__name__))
    if len(value) > limit:
        raise BadRequest("%s is longer than %d characters" % (name, limit))
    if not empty and not value:
        raise BadRequest("%s must not be empty" % name)
    if "\0" in value:
        raise BadRequest("%s must not contain NUL" % name)
    if _NOT_XML_CHARS.search(value):  # possible from JSON; would make every later reply unparsable
        raise BadRequest("%s must not contain control characters or lone surrogates" % name)
    return value


def want_number(value, name, minimum=0, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest("%s must be a number, not %s" % (name, type(value).__name__))
    if value != value or value < minimum or value in (float("inf"), float("-inf")):
        raise BadRequest("%s must be a finite number >= %s" % (name, minimum))
    if integer:
        if value != int(value):
            raise BadRequest("%s must be a whole number" % name)
        return int(value)
    return value


def lookup(table, lock, key, kind):
    """table[key], read under lock; NotFound "<kind> not found" if it is not there."""
    want_str(key, kind + "_id", limit=256)
    with lock:
        value = table.get(key)
    if value is None:
        raise NotFound("%s not found: %s" % (kind, _short(key)))
    return value


def want_struct(value, name):
    if value == []:  # PHP's xmlrpc (and other clients) cannot send an empty struct
        return {}
    if not isinstance(value, dict):
        raise BadRequest("%s must be a struct, not %s" % (name, type(value).__name__))
    return value


JOB_OPTIONS = ("args", "env", "cwd", "timeout", "job_id")
MAX_JOB_TIMEOUT = 10 ** 7     # seconds (115 days); threading.Timer cannot wait much longer


def want_timeout(value):
    seconds = want_number(value, "timeout", minimum=0.001)
    if seconds > MAX_JOB_TIMEOUT:
        raise BadRequest("timeout must be at most %d seconds" % MAX_JOB_TIMEOUT)
    return seconds


def want_job_id(value, name="job_id"):
    """A job id made by a caller must be a UUID; returns its canonical (lower-case) form."""
    want_str(value, name, limit=64)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest("%s must be a UUID, not %s" % (name, _short(value)))


def parse_job_options(options):
    """Check a start() options struct; returns {args, env, cwd, timeout, job_id} with defaults."""
    options = want_struct(options, "options")
    unknown = sorted(set(options) - set(JOB_OPTIONS))
    if unknown:
        raise BadRequest("unknown option %s (known: %s)" % (_short(unknown[0]), ", ".join(JOB_OPTIONS)))
    args = options.get("args", [])
    if not isinstance(args, list) or len(args) > 4096:
        raise BadRequest("args must be a list of at most 4096 strings")
    env = want_struct(options.get("env", {}), "env")
    for key, value in env.items():
        want_str(key, "env name", limit=256, empty=False)
        want_str(value, "env value of %s" % key, limit=65536)
        if "=" in key:
            raise BadRequest("env name %s must not contain '='" % _short(key))
    timeout = options.get("timeout")
    return {
        "args": [want_str(a, "args[%d]" % i, limit=65536) for i, a in enumerate(args)],
        "env": env,
        "cwd": want_str(options["cwd"], "cwd") if options.get("cwd") else None,
        "timeout": want_timeout(timeout) if timeout is not None else None,
        "job_id": want_job_id(options["job_id"]) if "job_id" in options else None,
    }


def parse_address(text, default_port=None):
    """'host:port', '[::1]:port', 'https://host:port', 'http://user:token@host:port'.

    Returns (scheme, host, port, password); scheme is '' when none was written."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    userinfo, at, hostport = rest.rstrip("/").rpartition("@")
    shown = _short(scheme + sep + hostport)  # never the token of user:token@
    if sep and scheme not in ("http", "https"):
        raise ConfigError("address %s: scheme must be http or https" % shown)
    password = userinfo.partition(":")[2] if at else None
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port[1:] if port.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    if not port and default_port is not None:
        port = str(default_port)
    if not re.match(r"[0-9]{1,5}\Z", port) or int(port) > 65535:
        raise ConfigError("address %s is not HOST:PORT" % shown)
    return scheme, host, int(port), password or None


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def want_host_port(text, name="address"):
    """parse_address(text) of an address to dial: the host a DNS name (RFC 1123 labels), an IPv4
    address or an [IPv6] one, the port 1-65535. Anything else fails in every later name lookup,
    or makes it hang (``node1..example.org``)."""
    scheme, host, port, password = parse_address(text)
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    hostport = text.partition("://")[2] if "://" in text else text
    if ":" in host or hostport.rpartition("@")[2].startswith("["):
        try:
            valid = ":" in host and bool(ipaddress.IPv6Address(host))
        except ValueError:
            valid = False
    elif all(label.isdigit() for label in labels):
        try:
            valid = bool(ipaddress.IPv4Address(host))
        except ValueError:
            valid = False
    else:
        valid = len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)
    if not valid or port == 0:
        raise ConfigError("%s %s is not HOST:PORT (a DNS name, an IPv4 address or an [IPv6] "
                          "address, and a port from 1 to 65535)" % (name, _short(text)))
    return scheme, host, port, password


def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------

def read_token_file(path):
    """Read a token the way ssh reads a private key: refuse it if others may read or write it."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise ConfigError("token file %s is accessible by group or others (mode %03o); "
                              "run: chmod 600 %s" % (path, mode & 0o777, path))
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read token file %s: %s" % (path, getattr(e, "strerror", e)))
    if not token or any(c.isspace() for c in token):
        raise ConfigError("token file %s must hold one token without spaces" % path)
    return token


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Security:
    """TLS and token settings of one process, used by its servers and its clients alike.

    ``tls_cert``+``tls_key`` make servers speak TLS (1.2 or newer); ``tls_ca`` makes clients verify
    servers against it and servers require client certificates from it (mutual TLS). Without
    ``tls_ca`` a TLS client verifies against the system's trust store. ``token`` is required on
    every request (HTTP Basic password or Bearer) and sent on every call."""

    def __init__(self, token=None, tls_cert=None, tls_key=None, tls_ca=None, insecure=False):
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        if (tls_cert or tls_ca) and ssl is None:
            raise ConfigError("this Python has no ssl module; TLS is not available")
        for name, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--tls-ca", tls_ca)):
            if path and not os.path.isfile(path):
                raise ConfigError("%s %s: no such file" % (name, path))
        self.token = token or None
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.insecure = insecure
        self._client_context = None

    @property
    def serves_tls(self):
        return bool(self.tls_cert)

    @property
    def dials_tls(self):
        return bool(self.tls_cert or self.tls_ca)

    @property
    def mutual_tls(self):
        return bool(self.tls_cert and self.tls_ca)

    @staticmethod
    def _tls12_or_newer(context):
        if hasattr(context, "minimum_version"):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        else:  # Python 3.6
            context.options |= ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
        return context

    def server_context(self):
        if not self.serves_tls:
            return None
        context = self._tls12_or_newer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
            if self.tls_ca:
                context.load_verify_locations(self.tls_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("cannot load TLS files: %s" % e)
        return context

    def client_context(self):
        """One verifying context per process, shared by every connection (it caches sessions)."""
        if self._client_context is None:
            try:
                context = self._tls12_or_newer(ssl.create_default_context(cafile=self.tls_ca))
                if self.tls_cert:
                    context.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError("cannot load TLS files: %s" % e)
            self._client_context = context
        return self._client_context

    def check_listen(self, host):
        if is_loopback(host) or self.token or self.mutual_tls or self.insecure:
            return
        raise ConfigError(
            "refusing to listen on %s without protection: configure a token (--token-file or "
            "JOBSCHED_TOKEN) or mutual TLS (--tls-cert, --tls-key and --tls-ca), or pass --insecure"
            % (host or "all interfaces"))

    def authorized(self, header):
        """True if the Authorization header carries the token (Basic password or Bearer)."""
        if self.token is None:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() == "bearer":
            supplied = value.strip()
        elif scheme.lower() == "basic":
            try:
                supplied = base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(supplied.encode("utf-8"), self.token.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------------

def send_close_notify(sock):
    """Before closing a TLS connection, say it is a clean close (close_notify), without waiting for
    the peer's: a peer that sees the connection end without one gets an SSLEOFError instead."""
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(0)
            sock.unwrap()
        except (OSError, ValueError):  # SSLWantReadError once ours is sent; or already closed
            pass


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token


class Headers(dict):
    """HTTP headers by lower-cased name (of repeated ones, the last), read without the email
    package, whose parser cost a tenth of the CPU of a small request on each side.

    Strict where a lenient reading lets two parsers see two different messages: a name that is
    not a token (whitespace before the colon), a folded line, a second Content-Length."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def get_all(self, name, default=None):
        value = self.get(name)
        return default if value is None else [value]

    @classmethod
    def read(cls, fp, max_headers=100):
        """Read header lines up to the blank one; HTTPException if they are not HTTP headers."""
        headers = cls()
        for _ in range(max_headers + 1):
            line = fp.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if len(line) > 65536 or not colon or not _HEADER_NAME.match(name):
                raise http.client.HTTPException(
                    "folded header line" if line[:1] in b" \t" else
                    "whitespace before a header's colon" if colon and name != name.rstrip()
                    else "bad header line")
            name = name.lower()
            if name == "content-length" and name in headers:
                raise http.client.HTTPException("more than one Content-Length")
            headers[name] = value.strip()
        raise http.client.HTTPException("more than %d headers" % max_headers)


class _RequestReader(socket.SocketIO):
    """The raw reader under RequestHandler.rfile. From start() on, every read of the request --
    its line, headers and body -- must end by one deadline ``timeout`` seconds later: a socket
    timeout is per recv(), and a client that trickles a byte a second would hold a thread forever."""

    def __init__(self, sock, timeout):
        super().__init__(sock, "rb")
        sock._io_refs += 1  # counted as socket.makefile() counts its files
        self.timeout, self.deadline = timeout, None

    def start(self):
        """A request begins: it must be read in full within the timeout."""
        if self._sock.gettimeout() != self.timeout:
            self._sock.settimeout(self.timeout)
        self.deadline = time.monotonic() + self.timeout

    def finish(self):
        """The request is read: no deadline, and the reply's writes get the whole timeout."""
        self.deadline = None
        if self._sock.gettimeout() != self.timeout:
            self._sock.settimeout(self.timeout)

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the request was not read within %g s" % self.timeout)
            if remaining < self._sock.gettimeout() - 0.05:  # settimeout() is a syscall: not per read
                self._sock.settimeout(remaining)
        return super().readinto(buffer)


class RequestHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    """HTTP/1.1 keep-alive handler: token check, body limits, XML-RPC and JSON routes."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    rpc_paths = ("/RPC2", "/")
    server_version = "jobsched/" + __version__
    encode_threshold = None  # gzip makes Binary output 2-3x slower and buys nothing on a LAN

    quiet = False  # true once the connection fell idle: the server parks it

    def setup(self):
        self.connection = self.request
        self.timeout = self.server.read_timeout
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.reader = _RequestReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.reader.start()

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._next_request_within(self.server.park_after):
            self.handle_one_request()

    def _next_request_within(self, seconds):
        self.reader.deadline = None  # waiting for a request is not reading one
        if getattr(self.connection, "pending", None) and self.connection.pending():
            self.reader.start()
            return True  # TLS has decrypted bytes buffered: the socket would not show them
        self.connection.settimeout(seconds)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client hung up
                return False
        except socket.timeout:
            self.quiet = True  # this rfile is spent; the next request gets a new handler
            return False
        self.reader.start()
        return True

    def parse_request(self):
        """The stdlib's, for HTTP/1.0 and 1.1 only, with headers read by Headers.read()."""
        self.command, self.close_connection = None, True
        self.request_version = "HTTP/1.0"  # how error replies go out
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(400, "Bad request line (HTTP/1.0 and HTTP/1.1 only)")
            return False
        command, self.path, version = words
        try:
            self.headers = Headers.read(self.rfile)
        except http.client.HTTPException as e:
            self._refuse(400, str(e))
            return False
        self.command, self.request_version = command, version
        error = self._framing_error()
        if error:
            self._refuse(400, error)
            return False
        connection = self.headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            version == "HTTP/1.0" and connection != "keep-alive")
        if version == "HTTP/1.1" and self.headers.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def _framing_error(self):
        """Why the request's body cannot be delimited beyond doubt (else None): a peer or proxy
        that read it otherwise would take part of it for the next request."""
        if "transfer-encoding" in self.headers:
            return "Transfer-Encoding is not supported; send Content-Length"
        length = self.headers.get("content-length")
        if length is None:
            return None
        if not re.match(r"[0-9]+\Z", length):
            return "bad Content-Length"
        if self.command != "POST" and length.strip("0"):
            return "a %s request must not have a body" % self.command
        return None

    def handle_expect_100(self):
        # curl sends "Expect: 100-continue" before a large body and waits a second for the
        # answer; the xmlrpc handler's buffered wfile would hold it back until the reply.
        super().handle_expect_100()
        self.wfile.flush()
        return True

    def do_POST(self):
        if not self._authorized():
            return
        body = self._read_body()
        if body is None:
            return
        path = self.path.partition("?")[0]
        route = self.server.json_routes.get(("POST", path))
        if route is not None:
            self._reply_json(*self.server.call_json(route, body))
        elif path in self.rpc_paths:
            self._reply(200, self.server.dispatch_xmlrpc(body), "text/xml")
        else:
            self._reply_json(404, {"error": "no such route: POST %s" % _short(path)})

    def do_GET(self):
        if not self._authorized():
            return
        route = self.server.json_routes.get(("GET", self.path.partition("?")[0]))
        if route is None:
            self._reply_json(404, {"error": "no such route: GET %s" % _short(self.path)})
        else:
            self._reply_json(*self.server.call_json(route, b""))

    def _authorized(self):
        if self.server.security.authorized(self.headers.get("Authorization")):
            return True
        self.server.note_unauthorized(self.client_address[0])
        self._reply(401, b"", "text/plain", close=True,
                    headers=(("WWW-Authenticate", 'Basic realm="jobsched"'),))
        return False

    def _read_body(self):
        """The request body, or None after answering why it is refused. (parse_request has
        refused a Transfer-Encoding and a malformed Content-Length.)"""
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            return self._refuse(415, "Content-Encoding is not supported")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._refuse(411, "Content-Length is required")
        if len(length) > 18 or int(length) > self.server.max_request:
            return self._refuse(413, "request body over %d bytes" % self.server.max_request)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True
            return None
        return body

    def _refuse(self, status, message):
        self._reply_json(status, {"error": message}, close=True)
        return None

    def _reply_json(self, status, obj, close=False):
        self._reply(status, json.dumps(obj).encode("utf-8"), "application/json", close=close)

    def _reply(self, status, body, content_type, close=False, headers=()):
        self.reader.finish()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # one line per event, not per request

    def log_message(self, format, *args):
        log.debug("%s: %s", self.client_address[0], format % args)


class RPCServer(socketserver.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
    """Threaded XML-RPC + JSON server: a thread per busy connection, TLS handshakes in it.

    A kept-alive connection quiet for ``park_after`` seconds gives up its thread and waits in
    one selector thread for its next request (a thousand heartbeating workers would otherwise
    hold a thousand threads). After ``read_timeout`` seconds of silence it is closed in stages
    (RFC 9112, 9.6): close_notify (TLS) and FIN first, then read and dropped until the client
    closes too, for ``read_timeout`` seconds at most. A client that sends its next request in
    that time reads a clean close and reconnects instead of seeing a reset.

    Callers use serve_in_thread(), close() and ``address``. The roles fill ``methods``
    (name -> callable; nothing else is callable) and ``json_routes``
    ((verb, path) -> callable(request dict) -> (status, reply dict))."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops connections under 16 concurrent clients
    park_after = 0.25

    def __init__(self, listen, security, methods, json_routes=None, max_request=MiB,
                 read_timeout=30.0):
        _, host, port, _ = parse_address(listen)
        security.check_listen(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.security = security
        self.ssl_context = security.server_context()
        self.methods = dict(methods)
        self._signatures = {name: inspect.signature(func) for name, func in self.methods.items()}
        self.json_routes = dict(json_routes or {})
        self.max_request = max_request
        self.read_timeout = read_timeout
        self._unauthorized_peers = set()  #: peers already logged as unauthorized; guarded by the GIL (set.add)
        self._park_lock = threading.Lock()
        #: guards self._to_park (connections handed to the parking thread), self._parking and
        #: sends on self._wake_parking (a socketpair while the parking thread runs)
        self._to_park, self._parking = [], False
        try:
            super().__init__((host, port), requestHandler=RequestHandler, logRequests=False,
                             allow_none=False)
        except OSError as e:
            raise ConfigError("cannot listen on %s: %s" % (format_address(host, port), e.strerror or e))
        self.address = format_address(host, self.server_address[1])

    def serve_in_thread(self):
        if pyexpat.version_info < (2, 6, 0):
            log.warning("expat %s is older than 2.6.0: jobsched refuses DTDs itself, but upgrade "
                        "for expat's own entity protections", pyexpat.EXPAT_VERSION)
        with self._park_lock:
            self._parking = True
            self._wake_parking, wakeup = socket.socketpair()
            self._wake_parking.setblocking(False)  # a full pipe already means "wake up"
        threading.Thread(target=self._parking_loop, args=(wakeup,), name="jobsched-parking",
                         daemon=True).start()
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="jobsched-accept", daemon=True)
        thread.start()
        self._serving = True
        return thread

    def close(self):
        if getattr(self, "_serving", False):  # shutdown() waits for a serve_forever() to end
            self.shutdown()
        with self._park_lock:
            if self._parking:
                self._parking = False
                self._wake()  # the parking thread closes the pair
        self.server_close()

    def process_request_thread(self, request, client_address):
        self.serve_connection(request, client_address, handshake=True)

    def serve_connection(self, connection, client_address, handshake=False):
        """Serve requests on a connection until it closes or goes quiet (then park it)."""
        try:
            if handshake and self.ssl_context is not None:
                connection.settimeout(self.read_timeout)
                try:
                    connection = self.ssl_context.wrap_socket(connection, server_side=True)
                except OSError as e:
                    log.info("TLS handshake with %s failed: %s", client_address[0], e)
                    return
            if self.RequestHandlerClass(connection, client_address, self).quiet:
                return self._park(connection, client_address)
        except Exception:
            self.handle_error(connection, client_address)
        self.shutdown_request(connection)

    def _park(self, connection, client_address):
        with self._park_lock:
            if self._parking:
                self._to_park.append((connection, client_address))
                self._wake()
                return
        self.shutdown_request(connection)

    def _wake(self):
        try:
            self._wake_parking.send(b"x")
        except BlockingIOError:
            pass

    def _parking_loop(self, wakeup):
        """Hand each parked connection back to a new thread when its next request arrives."""
        selector = selectors.DefaultSelector()
        selector.register(wakeup, selectors.EVENT_READ)
        parked = {}   # connection -> (client_address, parked since)
        closing = {}  # half-closed connection -> since when
        while True:
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is wakeup:
                    wakeup.recv(4096)
                    continue
                if key.fileobj in closing:
                    try:
                        if key.fileobj.recv(65536):
                            continue  # dropped: the connection is closed for requests
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    del closing[key.fileobj]  # the client has closed its side too
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                selector.unregister(key.fileobj)
                client_address, _ = parked.pop(key.fileobj)
                try:
                    threading.Thread(target=self.serve_connection,
                                     args=(key.fileobj, client_address), daemon=True).start()
                except RuntimeError:  # no thread to be had: drop the connection, not the loop
                    self.shutdown_request(key.fileobj)
            with self._park_lock:
                arrived, self._to_park, running = self._to_park, [], self._parking
            now = time.monotonic()
            for connection, client_address in arrived:
                try:
                    selector.register(connection, selectors.EVENT_READ)
                    parked[connection] = client_address, now
                except (ValueError, OSError):  # closed under us
                    self.shutdown_request(connection)
            for connection in [c for c, (_, since) in parked.items()
                               if not running or now - since > self.read_timeout]:
                del parked[connection]
                if running and self._half_close(connection):
                    closing[connection] = now
                else:
                    selector.unregister(connection)
                    self.shutdown_request(connection)
            for connection in [c for c, since in closing.items()
                               if not running or now - since > self.read_timeout]:
                del closing[connection]
                selector.unregister(connection)
                connection.close()
            if not running:
                selector.close()
                with self._park_lock:
                    self._wake_parking.close()
                wakeup.close()
                return

    def shutdown_request(self, request):
        """Close a connection; a TLS one with close_notify first, so that a client whose idle
        connection this is sees a clean close and reconnects."""
        send_close_notify(request)
        super().shutdown_request(request)

    @staticmethod
    def _half_close(connection):
        """close_notify (TLS) and FIN, reading on: false if the connection is gone already."""
        send_close_notify(connection)
        try:
            connection.setblocking(False)
            connection.shutdown(socket.SHUT_WR)  # also makes a TLS socket read plain bytes
            return True
        except OSError:
            return False

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)

    def note_unauthorized(self, peer):
        if peer not in self._unauthorized_peers and len(self._unauthorized_peers) < 10000:
            self._unauthorized_peers.add(peer)
            log.warning("unauthorized request from %s (missing or wrong token)", peer)

    def call(self, name, params):
        """Call a registered method; every failure comes out as a JobschedError."""
        func = self.methods.get(name)
        if func is None:
            raise BadRequest("unknown method %s" % _short(name))
        try:
            self._signatures[name].bind(*params)
        except TypeError as e:
            raise BadRequest("%s: %s" % (name, e))
        try:
            return func(*params)
        except JobschedError:
            raise
        except Exception:
            log.exception("internal error in %s", name)
            raise InternalError("internal error in %s (see the server's log)" % name)

    def dispatch_xmlrpc(self, body):
        try:
            try:
                params, name = loads_request(body)
            except JobschedError:
                raise
            except Exception as e:  # expat, int() and the unmarshaller raise many kinds
                raise BadRequest("malformed XML-RPC request: %s" % str(e).splitlines()[0][:200]
                                 if str(e) else "malformed XML-RPC request")
            if not isinstance(name, str):
                raise BadRequest("not an XML-RPC method call")
            result = self.call(name, params)
            if isinstance(result, _RelayedReply):
                return result
            try:
                return dumps_response(result)
            except (TypeError, OverflowError):
                log.exception("cannot marshal the result of %s", name)
                raise InternalError("internal error in %s (see the server's log)" % name)
        except JobschedError as e:
            return xmlrpc.client.dumps(xmlrpc.client.Fault(e.code, str(e))).encode("utf-8")

    def call_json(self, route, body):
        try:
            try:
                request = (json.loads(body.decode("utf-8"), parse_int=bounded_int)
                           if body.strip() else {})
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise BadRequest("invalid JSON: %s" % e)
            if not isinstance(request, dict):
                raise BadRequest("the body must be a JSON object")
            return route(request)
        except JobschedError as e:
            return HTTP_STATUS[e.code], {"error": str(e)}
        except Exception:
            log.exception("internal error in a JSON route")
            return 500, {"error": "internal error (see the server's log)"}


class _Response(http.client.HTTPResponse):
    """http.client's response, with its headers read by Headers.read()."""

    def begin(self):
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        while status == http.client.CONTINUE:
            Headers.read(self.fp)
            version, status, reason = self._read_status()
        self.code = self.status = status
        self.reason = reason.strip()
        self.version = 11 if version == "HTTP/1.1" else 10
        self.headers = self.msg = Headers.read(self.fp)
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.chunk_left = None
        self.will_close = self._check_close()
        length = self.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() and not self.chunked else None
        if self.length is None and not self.chunked:
            self.will_close = True  # the body ends when the connection does


def create_connection(address, timeout, source_address=None):
    """socket.create_connection(), with the name lookup bounded by the timeout too: getaddrinfo()
    has no timeout of its own, and a hung resolver would hold the calling thread. (The lookup
    thread left behind ends when the resolver gives up.)"""
    host, port = address
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # an address literal: nothing to look up
        return socket.create_connection(address, timeout, source_address)
    found, looked_up = [], threading.Event()

    def lookup():
        try:
            found.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except Exception as e:  # gaierror, or UnicodeError for a name idna cannot encode
            found.append(e)
        looked_up.set()
    threading.Thread(target=lookup, name="jobsched-lookup", daemon=True).start()
    if not looked_up.wait(timeout):
        raise socket.timeout("looking up %s timed out" % _short(host))
    if isinstance(found[0], Exception):
        raise found[0]
    error = OSError("no address found for %s" % _short(host))
    for family, kind, proto, _, sockaddr in found[0]:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


_CLOSED_BY_PEER = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) + (
    (ssl.SSLEOFError, ssl.SSLZeroReturnError) if ssl is not None else ())


def is_tls_alert(error):
    """True for a TLS alert from the peer, which ends a handshake that failed on its side. (With
    TLS 1.3 a server refuses a client's certificate only after the client has sent its request:
    the request never reached the server's application.)"""
    return (ssl is not None and isinstance(error, ssl.SSLError)
            and "ALERT" in (getattr(error, "reason", None) or ""))


class _Transport(xmlrpc.client.Transport):
    """One kept-alive HTTP(S) connection with a timeout and the token on every request.

    After a failed request, ``sent`` tells whether the whole request had been written (the server
    may have acted on it) or not (it certainly did not)."""
    accept_gzip_encoding = False

    def __init__(self, tls_context, authorization, timeout):
        super().__init__()
        self.tls_context = tls_context
        self.authorization = authorization
        self.timeout = timeout
        self.relay = False  # return the reply as a _RelayedReply instead of parsing it
        self.sent = False
        self.idle_since = 0.0  # time.monotonic() when last put back in its pool
        self.generation = 0    # of its RPCClient's pool

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        if self.tls_context is not None:
            connection = http.client.HTTPSConnection(host, timeout=self.timeout,
                                                     context=self.tls_context)
        else:
            connection = http.client.HTTPConnection(host, timeout=self.timeout)
        connection.response_class = _Response
        connection._create_connection = create_connection
        self._connection = host, connection
        return connection

    def close(self):
        connection = self._connection[1]
        if connection is not None and connection.sock is not None:
            send_close_notify(connection.sock)
        super().close()

    def closed_by_peer(self):
        """True if the idle connection has something to read: the server closed it (or sent junk)."""
        connection = self._connection[1]
        if connection is None or connection.sock is None:
            return False
        if hasattr(select, "poll"):  # select() cannot take a descriptor above FD_SETSIZE
            poller = select.poll()
            poller.register(connection.sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([connection.sock], [], [], 0)[0])

    def request(self, host, handler, request_body, verbose=False):
        """The stdlib's, but sent again only when a kept-alive connection turns out to have been
        closed by the server before any byte of the answer (as HTTP clients do: the server most
        likely closed it while it was idle). The stdlib's would also send again after a fresh
        connection was lost, and not after a TLS connection closed without close_notify."""
        self.sent = False
        for retry in (False, True):
            connection = self._connection[1]
            reused = connection is not None and connection.sock is not None
            sent_before = self.sent
            try:
                connection = self.send_request(host, handler, request_body, verbose)
                self.sent = True
                response = connection.getresponse()
                break
            except _CLOSED_BY_PEER:
                self.close()
                if retry or not reused:
                    raise
            except BaseException as e:
                self.close()
                if not reused and is_tls_alert(e):  # the handshake failed after all
                    self.sent = sent_before
                raise
        try:
            if response.status == 200:
                return self.parse_response(response)
        except xmlrpc.client.Fault:
            raise
        except BaseException:
            response.close()
            self.close()
            raise
        response.close()
        raise xmlrpc.client.ProtocolError(host + handler, response.status, response.reason,
                                          dict(response.getheaders()))

    def send_headers(self, connection, headers):
        super().send_headers(connection, headers)
        if self.authorization:
            connection.putheader("Authorization", self.authorization)

    def parse_response(self, response):
        # The stdlib reads and feeds the reply 1 KiB at a time: 1400 rounds per MiB of output.
        body = response.read()
        if self.relay:
            return (_RelayedReply(body),)
        parser, unmarshaller = self.getparser()
        parser.feed(body)
        parser.close()
        return unmarshaller.close()

    def set_timeout(self, seconds):
        self.timeout = seconds
        connection = self._connection[1]
        if connection is not None:
            connection.timeout = seconds
            if connection.sock is not None:
                connection.sock.settimeout(seconds)


_CONNECTION_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ResponseError,
                      pyexpat.ExpatError) + (
    (ssl.CertificateError,) if ssl is not None else ())


class RPCClient:
    """Calls one jobsched server: ``call(method, *params)``.

    Thread-safe: each call borrows a kept-alive connection from a small pool, so one RPCClient
    can serve many threads. Faults raise the JobschedError subclass of their code. A peer that
    cannot be reached raises Unreachable when the request certainly was not acted on (refused,
    failed TLS handshake, an HTTP error status), and its subclass OutcomeUnknown when it was sent
    and no answer came (timed out, connection lost). A connection idle for ``idle_timeout``
    seconds is closed rather than used (servers close theirs after 30 s). ``address`` is
    HOST:PORT, or https://HOST:PORT, or http://user:TOKEN@HOST:PORT."""
    max_idle = 16
    idle_timeout = 25.0
    check_after = 1.0  # an idle connection older than this is checked for a close before use

    def __init__(self, address=DEFAULT_SCHEDULER, token=None, tls_ca=None, tls_cert=None,
                 tls_key=None, timeout=10.0, security=None):
        scheme, host, port, password = parse_address(address)
        self.security = security or Security(token=token, tls_cert=tls_cert, tls_key=tls_key,
                                             tls_ca=tls_ca)
        self.address = format_address(host, port)
        self.timeout = timeout
        token = password or self.security.token
        self._authorization = "Bearer " + token if token else None
        use_tls = scheme == "https" or self.security.dials_tls
        self._tls_context = self.security.client_context() if use_tls else None
        self._idle_lock = threading.Lock()
        #: guards self._idle (kept-alive transports not in use, least recently used first) and
        #: self._generation (bumped by close(): transports of an older one are not kept)
        self._idle, self._generation = [], 0
        self._logged_unexpected = False  # written once, by whichever call sees one first

    def call(self, method, *params, timeout=None, relay=False):
        request = dumps_request(method, params)
        transport = self._borrow()
        transport.relay = relay
        if timeout is not None:
            transport.set_timeout(timeout)
        try:
            result = transport.request(self.address, "/RPC2", request)[0]
        except xmlrpc.client.Fault as fault:
            self._release(transport, timeout)
            raise error_from_fault(fault) from None
        except xmlrpc.client.ProtocolError as e:
            transport.close()
            if e.errcode == 401:
                raise Unreachable("%s refused the request: missing or wrong token (HTTP 401)"
                                  % self.address) from None
            raise Unreachable("%s answered HTTP %d %s" % (self.address, e.errcode, e.errmsg)) from None
        except Exception as e:  # whatever a peer makes of a call is this peer's failure
            transport.close()
            if not isinstance(e, _CONNECTION_ERRORS) and not self._logged_unexpected:
                self._logged_unexpected = True
                log.warning("unexpected error calling %s on %s", method, self.address, exc_info=True)
            reason = "timed out" if isinstance(e, socket.timeout) else (str(e) or type(e).__name__)
            if transport.sent:
                raise OutcomeUnknown("no answer from %s: %s" % (self.address, reason)) from None
            raise Unreachable("cannot reach %s: %s" % (self.address, reason)) from None
        self._release(transport, timeout)
        return result

    def _borrow(self):
        now = time.monotonic()
        expired = ()
        with self._idle_lock:
            transport = self._idle.pop() if self._idle else None
            if transport is not None and now - transport.idle_since > self.idle_timeout:
                expired, self._idle = self._idle + [transport], []  # the rest are older still
                transport = None
            generation = self._generation
        for old in expired:
            old.close()
        if transport is None:
            transport = _Transport(self._tls_context, self._authorization, self.timeout)
            transport.generation = generation
        elif now - transport.idle_since > self.check_after and transport.closed_by_peer():
            transport.close()  # a fresh connection, not a request sure to fail
        return transport

    def _release(self, transport, timeout):
        if timeout is not None:
            transport.set_timeout(self.timeout)
        transport.idle_since = time.monotonic()
        with self._idle_lock:
            if transport.generation == self._generation and len(self._idle) < self.max_idle:
                self._idle.append(transport)
                return
        transport.close()

    def drop_idle(self):
        """Close the connections idle for ``idle_timeout`` seconds or more."""
        cutoff = time.monotonic() - self.idle_timeout
        with self._idle_lock:
            count = 0
            while count < len(self._idle) and self._idle[count].idle_since <= cutoff:
                count += 1
            expired, self._idle = self._idle[:count], self._idle[count:]
        for transport in expired:
            transport.close()

    def close(self):
        """Close the idle connections now and the busy ones when their calls end. Later calls
        still work, on new connections."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for transport in idle:
            transport.close()


class _Role:
    """What Scheduler and Worker share: a server, serving in a thread, closing once."""
    server = None
    fatal_error = None  # why the role cannot go on (set by its threads); the command exits 2

    @property
    def address(self):
        """The HOST:PORT actually bound (port 0 resolved)."""
        return self.server.address

    def __enter__(self):
        self.start_serving()
        return self

    def __exit__(self, *exc_info):
        self.close()


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------

_GO_SIGNAL_NAMES = {
    signal.SIGHUP: "hangup", signal.SIGINT: "interrupt", signal.SIGQUIT: "quit",
    signal.SIGILL: "illegal instruction", signal.SIGTRAP: "trace/breakpoint trap",
    signal.SIGABRT: "aborted", signal.SIGBUS: "bus error", signal.SIGFPE: "floating point exception",
    signal.SIGKILL: "killed", signal.SIGUSR1: "user defined signal 1",
    signal.SIGSEGV: "segmentation fault", signal.SIGUSR2: "user defined signal 2",
    signal.SIGPIPE: "broken pipe", signal.SIGALRM: "alarm clock", signal.SIGTERM: "terminated",
}


def exit_text(returncode):
    """The outcome in Go's os/exec wording: '' on success, 'exit status 3', 'signal: killed'."""
    if returncode == 0:
        return ""
    if returncode > 0:
        return "exit status %d" % returncode
    return "signal: " + _GO_SIGNAL_NAMES.get(-returncode, "signal %d" % -returncode)


def process_start_time(pid):
    """An opaque token that changes when a pid is reused (Linux: /proc starttime; macOS: ps)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=5).stdout.decode().strip()
            return out or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass  # the group is gone already


def write_atomically(path, data):
    """Temp file + rename: a crash at any moment leaves the old file or the new one, whole.

    Each path has one writer at a time (a job's waiter, or the worker at start), so the temp
    file's name needs no randomness."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


#: the ``finished`` Event of every ended job: one shared set Event instead of 1.5 KB per kept job
_ENDED = threading.Event()
_ENDED.set()


class Job:
    """One child process and what became of it.

    Fields that change after start (state, exit, finish time) are guarded by Worker.jobs_lock."""
    __slots__ = ("job_id", "worker_id", "command", "path", "args", "pid", "started_at",
                 "proc_start", "process", "state", "exit_code", "signal", "error_text",
                 "finished_at", "output_bytes", "stop_reason", "finished", "timer")

    def __init__(self, job_id, worker_id, command, path, args):
        self.job_id, self.worker_id = job_id, worker_id
        self.command, self.path, self.args = command, path, args
        self.pid = self.proc_start = self.process = self.exit_code = self.signal = None
        self.finished_at = self.output_bytes = self.stop_reason = self.timer = None
        self.started_at = time.time()
        self.state = "running"
        self.error_text = ""
        self.finished = threading.Event()

    @property
    def done(self):
        return self.state != "running"

    def to_struct(self):
        return without_none({
            "job_id": self.job_id, "worker_id": self.worker_id, "command": self.command,
            "path": self.path, "args": list(self.args), "state": self.state, "done": self.done,
            "error": bool(self.error_text), "error_text": self.error_text,
            "exit_code": self.exit_code, "signal": self.signal, "pid": self.pid,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "output_bytes": None if self.output_bytes is None else wire_int(self.output_bytes),
        })

    def to_record(self):
        record = self.to_struct()
        record["proc_start"] = self.proc_start
        return json.dumps(without_none(record)).encode("utf-8")

    @classmethod
    def from_record(cls, record):
        job = cls(record["job_id"], record["worker_id"], record["command"], record["path"],
                  record["args"])
        for name in ("pid", "proc_start", "state", "exit_code", "signal", "error_text",
                     "started_at", "finished_at", "output_bytes"):
            if name in record:
                setattr(job, name, record[name])
        if job.done:
            job.finished = _ENDED
        return job


def default_state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "jobsched", "worker")


class Worker(_Role):
    """Runs jobs on this host: each in its own session, output appended to
    ``<state_dir>/<job_id>.out``, a record in ``<job_id>.json``, a waiter thread per job.

    Library use: ``Worker(listen="127.0.0.1:0", scheduler=ADDR, state_dir=DIR)``, then
    start_serving() (or ``with``), ``address``, ``worker_id``, close(). ``scheduler=None`` runs it
    standalone. RPCs: start, stop, query, output, jobs, info."""

    def __init__(self, listen=DEFAULT_WORKER, scheduler=DEFAULT_SCHEDULER, advertise=None,
                 state_dir=None, slots=None, stop_grace=5.0, heartbeat=2.0, keep_jobs=10000,
                 allow=(), jobs_dir=None, rpc_timeout=10.0, max_request=MiB, read_timeout=30.0,
                 token=None, tls_cert=None, tls_key=None, tls_ca=None, insecure=False,
                 security=None):
        self.security = security or Security(token, tls_cert, tls_key, tls_ca, insecure)
        self.slots = slots if slots is not None else (os.cpu_count() or 1)
        self.stop_grace, self.heartbeat, self.keep_jobs = stop_grace, heartbeat, keep_jobs
        self.rpc_timeout = rpc_timeout
        self.scheduler = scheduler
        self.jobs_dir = os.path.realpath(jobs_dir) if jobs_dir else None
        self.allowed = {self._resolve_executable(c, os.environ.get("PATH")) or c for c in allow}
        self.state_dir = os.path.abspath(state_dir or default_state_dir())
        # A job's environment is the worker's without the cluster token (None: inherit it
        # as it is, which spares Popen a copy of the environment per job).
        self._base_env = ({k: v for k, v in os.environ.items() if k != "JOBSCHED_TOKEN"}
                          if "JOBSCHED_TOKEN" in os.environ else None)
        self.jobs_lock = threading.Lock()
        #: guards self._jobs, self._starting, self._finished, self._running, self._closing and
        #: every Job's state
        self._job_changed = threading.Condition(self.jobs_lock)  # notified when a job ends
        self.journal_lock = threading.Lock()
        #: guards self._journal (fd of <state-dir>/journal) and self._journal_bytes; taken
        #: before jobs_lock, never while holding it
        self._journal, self._journal_bytes = None, 0
        self._jobs = {}
        self._finished = deque()  # finished job ids, oldest first, for --keep-jobs
        self._running = 0
        self._starting = set()  # job ids being spawned: a second start of one waits for the first
        self._closing = False
        self._closed = threading.Event()
        self._registered = False  # written by the heartbeat thread only
        if advertise:
            want_host_port(advertise, "--advertise")
        self._lock_file = self._lock_state_dir()
        try:
            try:
                self.worker_id = self._load_worker_id()
                self._load_records()
            except OSError as e:  # disk full or read-only: a configuration error, not a traceback
                raise ConfigError("cannot use state dir %s: %s" % (self.state_dir, e.strerror or e))
            self.server = RPCServer(listen, self.security, {
                "start": self.start, "stop": self.stop, "query": self.query,
                "output": self.output, "jobs": self.jobs, "info": self.info,
            }, max_request=max_request, read_timeout=read_timeout)
        except BaseException:
            if self._journal is not None:
                os.close(self._journal)
            self._lock_file.close()
            raise
        if advertise:
            self.advertise = advertise
        else:
            host, port = self.server.address.rsplit(":", 1)
            if host in ("0.0.0.0", "[::]", ""):
                host = socket.gethostname()
            self.advertise = "%s:%s" % (host, port)
        self._threads = []

    # -- state dir -----------------------------------------------------------------------------

    def _lock_state_dir(self):
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            lock_file = open(os.path.join(self.state_dir, "lock"), "a+")
        except OSError as e:
            raise ConfigError("cannot use state dir %s: %s" % (self.state_dir, e.strerror))
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise ConfigError("state dir %s is in use by another worker" % self.state_dir)
        return lock_file

    def _load_worker_id(self):
        path = os.path.join(self.state_dir, "worker_id")
        try:
            with open(path) as f:
                worker_id = f.read().strip()
            if worker_id:
                return worker_id
        except FileNotFoundError:
            pass
        worker_id = str(uuid.uuid4())
        write_atomically(path, worker_id.encode() + b"\n")
        return worker_id

    def _load_records(self):
        """Bring back finished jobs; jobs that were running when the worker died become lost.

        A started job is one line appended to ``journal`` (no file to create on the hot path);
        an ended one has its ``<job_id>.json``, which wins over its journal line."""
        journal = os.path.join(self.state_dir, "journal")
        records, outputs = {}, set()
        try:
            with open(journal, "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line.decode("utf-8"))
                        records[record["job_id"]] = record
                    except (ValueError, KeyError, TypeError):
                        pass  # the last line, cut short by a crash
        except FileNotFoundError:
            pass
        for name in os.listdir(self.state_dir):
            path = os.path.join(self.state_dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # a write the last run did not finish
            elif name.endswith(".out"):
                outputs.add(name[:-4])
            elif name.endswith(".json"):
                try:
                    with open(path, "rb") as f:
                        records[name[:-5]] = json.loads(f.read().decode("utf-8"))
                except (OSError, ValueError) as e:
                    log.warning("ignoring unreadable job record %s: %s", path, e)
        for job_id in outputs - set(records):  # created, then the worker died before the journal
            os.unlink(self._out_path(job_id))
        for job_id in set(records) - outputs:  # removed by --keep-jobs; its journal line lingers
            del records[job_id]
        jobs = []
        for job_id, record in records.items():
            try:
                jobs.append(Job.from_record(record))
            except (KeyError, TypeError, AttributeError) as e:
                log.warning("ignoring unreadable record of job %s: %s", job_id, e)
        for job in jobs:
            if job.state == "running":
                current = process_start_time(job.pid) if job.pid else None
                if job.pid and (current is None or current == job.proc_start):
                    signal_group(job.pid, signal.SIGKILL)  # not a reused pid: ours, still alive
                job.state, job.finished_at = "lost", time.time()
                job.error_text = "lost: the worker restarted while the job was running"
                job.output_bytes = self._output_size(job.job_id)
                job.finished = _ENDED
                self._write_record(job)
                log.info("job %s lost: the worker restarted while it was running", job.job_id)
        for job in sorted(jobs, key=lambda j: j.finished_at or 0):
            self._jobs[job.job_id] = job
            self._finished.append(job.job_id)
        self._expire_jobs()
        self._journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self._journal_bytes = 0

    def _journal_started(self, job):
        """Append the job's line to the journal and make it visible, both under journal_lock, so
        a rewrite of the journal finds every job in the old file or in self._jobs."""
        line = job.to_record() + b"\n"
        with self.journal_lock:
            if self._journal is None:
                raise Unavailable("worker is shutting down")
            if self._journal_bytes > JOURNAL_LIMIT:
                self._rewrite_journal()
            try:
                if os.write(self._journal, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                os.ftruncate(self._journal, self._journal_bytes)  # no half line before the next
                raise
            self._journal_bytes += len(line)
            with self.jobs_lock:
                if self._closing:  # close() has taken its list of jobs to stop
                    raise Unavailable("worker is shutting down")
                self._jobs[job.job_id] = job

    def _rewrite_journal(self):
        """Keep only the lines of jobs whose final record is not written yet (under journal_lock)."""
        with self.jobs_lock:
            lines = [job.to_record() + b"\n" for job in self._jobs.values()
                     if not job.finished.is_set()]
        path = os.path.join(self.state_dir, "journal")
        write_atomically(path, b"".join(lines))
        os.close(self._journal)
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._journal_bytes = sum(map(len, lines))

    def _out_path(self, job_id):
        return os.path.join(self.state_dir, job_id + ".out")

    def _output_size(self, job_id):
        try:
            return os.stat(self._out_path(job_id)).st_size
        except OSError:
            return 0

    def _write_record(self, job):
        with self.jobs_lock:
            record = job.to_record()
        write_atomically(os.path.join(self.state_dir, job.job_id + ".json"), record)

    def _expire_jobs(self):
        """Forget the oldest finished jobs beyond keep_jobs, files first."""
        while True:
            with self.jobs_lock:
                if len(self._finished) <= self.keep_jobs:
                    return
                job_id = self._finished.popleft()
                self._jobs.pop(job_id, None)
            for suffix in (".json", ".out"):
                try:
                    os.unlink(os.path.join(self.state_dir, job_id + suffix))
                except OSError:
                    pass

    # -- serving -------------------------------------------------------------------------------

    def start_serving(self):
        """Serve in background threads and, if a scheduler is set, register and heartbeat."""
        if os.geteuid() == 0:
            log.warning("running as root: every job runs as root too; prefer a dedicated user")
        self._threads.append(self.server.serve_in_thread())
        if self.scheduler:
            thread = threading.Thread(target=self._heartbeat_loop, name="jobsched-heartbeat",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("worker %s listening on %s (slots %d, state dir %s)", self.worker_id,
                 self.address, self.slots, self.state_dir)
        return self

    def info(self):
        """This worker's struct."""
        with self.jobs_lock:
            running = self._running
        return {
            "worker_id": self.worker_id, "address": self.advertise, "online": True,
            "slots": self.slots, "running": running, "last_seen": time.time(),
            "hostname": socket.gethostname(), "version": __version__,
            "heartbeat": self.heartbeat, "tls": self.security.serves_tls,
            "stop_grace": self.stop_grace,
        }

    def _heartbeat_loop(self):
        """Register, then heartbeat; never give up on an unreachable scheduler."""
        scheduler = RPCClient(self.scheduler, security=self.security, timeout=self.rpc_timeout)
        registered, failures, delay = False, 0, 0.0
        while not self._closed.wait(delay):
            try:
                if registered:
                    scheduler.call("heartbeat", self.worker_id, self.info())
                else:
                    scheduler.call("register", self.advertise, self.info())
                    log.info("registered with scheduler %s as %s", scheduler.address, self.worker_id)
                    registered = True
                failures, delay = 0, self.heartbeat
            except NotFound:  # the scheduler restarted and forgot us: same id, at once
                registered, delay = False, 0.0
            except Exception as e:  # JobschedError, or a peer that is not a jobsched scheduler
                if isinstance(e, BadRequest) and not registered:  # asking again cannot help
                    self.fatal_error = "scheduler %s refused to register this worker: %s" % (
                        scheduler.address, e)
                    log.error("%s", self.fatal_error)
                    break
                failures += 1
                if failures == 1:
                    log.warning("cannot reach scheduler %s: %s (retrying)", scheduler.address, e)
                delay = min(30.0, 0.25 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            self._registered = registered
        scheduler.close()

    def close(self):
        """Stop accepting, stop every running job (TERM, grace, KILL), deregister."""
        with self.jobs_lock:
            if self._closing:
                return
            self._closing = True
            running = [job for job in self._jobs.values() if not job.done]
        self.server.close()
        stoppers = [threading.Thread(target=self._stop_job, args=(job, "stopped")) for job in running]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self._closed.set()
        if self._registered:  # here, not in the heartbeat thread: it may be stuck in a call
            scheduler = RPCClient(self.scheduler, security=self.security, timeout=1.0)
            try:
                scheduler.call("deregister", self.worker_id)
            except JobschedError as e:
                log.warning("could not deregister: %s", e)
            scheduler.close()
        for thread in self._threads:
            thread.join(timeout=1.0)
        with self.journal_lock:
            os.close(self._journal)
            self._journal = None
        self._lock_file.close()
        log.info("worker %s stopped", self.worker_id)

    # -- the RPCs ------------------------------------------------------------------------------

    def _resolve_executable(self, command, path_env):
        if os.sep in command:
            return os.path.realpath(command) if os.access(command, os.X_OK) else None
        for directory in (path_env or os.defpath).split(os.pathsep):
            candidate = os.path.join(directory or ".", command)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return os.path.realpath(candidate)
        return None

    def _resolve_path(self, path):
        if not path or self.jobs_dir is None:
            return path
        if os.path.isabs(path) or ".." in path.split("/"):
            raise BadRequest("path %s must be relative to the jobs dir, without '..'" % _short(path))
        resolved = os.path.realpath(os.path.join(self.jobs_dir, path))
        if not resolved.startswith(self.jobs_dir + os.sep):
            raise BadRequest("path %s escapes the jobs dir" % _short(path))
        return resolved

    def start(self, command, path, options=None):
        """Start ``[command] + ([path] if path else []) + args``; no shell. Returns the job_id."""
        want_str(command, "command", empty=False)
        want_str(path, "path")
        opts = parse_job_options(options if options is not None else {})
        env = (dict(self._base_env or os.environ, **opts["env"]) if opts["env"]
               else self._base_env)
        if self.allowed:
            executable = self._resolve_executable(command, (env or os.environ).get("PATH"))
            if executable not in self.allowed:
                raise BadRequest("command %s is not allowed on this worker" % _short(command))
            # Run the file that was checked: Popen would search PATH again, from the job's cwd.
            opts["executable"] = executable
        argv = [command] + ([self._resolve_path(path)] if path else []) + opts["args"]
        job_id = opts["job_id"] or str(uuid.uuid4())
        with self.jobs_lock:
            # start is idempotent: a job_id this worker has, or is starting, starts nothing.
            while job_id in self._starting:
                self._job_changed.wait()
            if job_id in self._jobs:
                return job_id
            if self._closing:
                raise Unavailable("worker is shutting down")
            if self._running >= self.slots:
                raise Unavailable("worker is full (%d slots)" % self.slots)
            self._running += 1  # hold the slot while starting, outside the lock
            self._starting.add(job_id)
        try:
            job = self._spawn(job_id, command, path, opts, argv, env)
        except BaseException:
            with self.jobs_lock:
                self._running -= 1
            raise
        finally:
            with self.jobs_lock:
                self._starting.discard(job_id)
                self._job_changed.notify_all()
        log.info("job %s started: %s", job.job_id, " ".join(map(_short, argv)))
        return job.job_id

    def _spawn(self, job_id, command, path, opts, argv, env):
        job = Job(job_id, self.worker_id, command, path, opts["args"])
        out_path = self._out_path(job.job_id)
        try:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as e:
            raise Unavailable("cannot write job output in %s: %s" % (self.state_dir, e.strerror))
        try:
            job.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=opts["cwd"], env=env,
                start_new_session=True, executable=opts.get("executable"))
        except OSError as e:
            os.unlink(out_path)
            raise BadRequest("cannot start %s: %s%s" % (_short(argv[0]), e.strerror or e,
                                                         ": " + str(e.filename) if e.filename else ""))
        except (ValueError, TypeError) as e:
            os.unlink(out_path)
            raise BadRequest("cannot start %s: %s" % (_short(argv[0]), e))
        finally:
            os.close(out)
        job.pid = job.process.pid
        job.proc_start = process_start_time(job.pid)
        try:
            self._journal_started(job)
        except (OSError, Unavailable) as e:
            signal_group(job.pid, signal.SIGKILL)
            job.process.wait()
            os.unlink(out_path)
            if isinstance(e, Unavailable):
                raise
            raise Unavailable("cannot write job record in %s: %s" % (self.state_dir, e.strerror))
        if opts["timeout"] is not None:
            job.timer = threading.Timer(opts["timeout"], self._stop_job, (job, "timeout"))
            job.timer.daemon = True
            job.timer.start()
        # threading.Thread.start() would wait for the new thread to run: a quarter of a start.
        _thread.start_new_thread(self._wait_for, (job,))
        return job

    def _wait_for(self, job):
        """The waiter: record the outcome under the lock, then write it down."""
        if hasattr(os, "waitid"):
            # Wait without reaping: the group id cannot be reused while the leader is a zombie,
            # so a stopped job's survivors can be killed safely.
            try:
                os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        else:  # macOS: reap first; the group id is then free again, a window of microseconds
            job.process.wait()
        with self.jobs_lock:
            stopping = job.stop_reason is not None
        if stopping:
            signal_group(job.pid, signal.SIGKILL)  # no grandchild outlives a stop
        returncode = job.process.wait()
        if job.timer is not None:
            job.timer.cancel()
        output_bytes = self._output_size(job.job_id)
        with self.jobs_lock:
            job.process = None
            job.finished_at = time.time()
            job.output_bytes = output_bytes
            job.error_text = exit_text(returncode)
            if returncode >= 0:
                job.exit_code = returncode
            else:
                job.signal = -returncode
            job.state = job.stop_reason or ("succeeded" if returncode == 0 else "failed")
            self._running -= 1
            self._job_changed.notify_all()
        try:
            self._write_record(job)
        except OSError as e:
            log.error("cannot write the record of job %s: %s", job.job_id, e)
        with self.jobs_lock:
            self._finished.append(job.job_id)  # only now may --keep-jobs remove its files
        job.finished.set()
        job.finished = _ENDED  # waiters hold the set Event; later ones get the shared one
        log.info("job %s %s%s", job.job_id, job.state, ": " + job.error_text if job.error_text else "")
        self._expire_jobs()

    def _get(self, job_id):
        return lookup(self._jobs, self.jobs_lock, job_id, "job")

    def _stop_job(self, job, reason):
        """TERM the group, KILL it after the grace period; true once the job has ended."""
        with self.jobs_lock:
            if job.done or job.process is None:
                return True
            if job.stop_reason is None:
                job.stop_reason = reason
        log.info("job %s: stopping (%s)", job.job_id, reason)
        signal_group(job.pid, signal.SIGTERM)
        if not job.finished.wait(self.stop_grace):
            signal_group(job.pid, signal.SIGKILL)
            return job.finished.wait(1.0)
        return True

    def stop(self, job_id):
        """TERM the job's process group, KILL it after the grace period; true once it has ended."""
        if not self._stop_job(self._get(job_id), "stopped"):
            raise Unavailable("job %s has not ended 1 s after SIGKILL" % job_id)
        return True

    def query(self, job_id):
        """The job's struct."""
        return self._struct(self._get(job_id))

    def _struct(self, job):
        with self.jobs_lock:
            struct = job.to_struct()
        if not struct["done"]:
            struct["output_bytes"] = wire_int(self._output_size(job.job_id))
        return struct

    def jobs(self):
        """Every job this worker knows, oldest first."""
        with self.jobs_lock:
            jobs = list(self._jobs.values())
        return [self._struct(job) for job in sorted(jobs, key=lambda j: j.started_at)]

    def output(self, job_id, offset, max_bytes, wait_seconds=0):
        """Up to max_bytes (at most 1 MiB) of output from offset: {data, offset, eof}.

        With wait_seconds > 0, waits until there are new bytes or the job ends."""
        offset = want_number(offset, "offset", integer=True)
        max_bytes = min(want_number(max_bytes, "max_bytes", integer=True), MAX_OUTPUT_CHUNK)
        wait_seconds = min(want_number(wait_seconds, "wait_seconds"), MAX_WAIT_SECONDS)
        job = self._get(job_id)
        deadline = time.monotonic() + wait_seconds
        while True:
            with self.jobs_lock:
                done = job.done
            data, size = self._read_output(job.job_id, offset, max_bytes)
            remaining = deadline - time.monotonic()
            if data or done or remaining <= 0 or max_bytes == 0:
                break
            with self._job_changed:
                if not job.done:
                    self._job_changed.wait(min(remaining, FOLLOW_POLL_SECONDS))
        return {"data": xmlrpc.client.Binary(data), "offset": wire_int(offset + len(data)),
                "eof": done and offset + len(data) >= size}

    def _read_output(self, job_id, offset, max_bytes):
        try:
            with open(self._out_path(job_id), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset >= size:
                    return b"", size
                f.seek(offset)
                return f.read(max_bytes), size
        except FileNotFoundError:
            return b"", 0


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------

class WorkerRecord:
    """What the scheduler knows of one worker; fields guarded by Scheduler.workers_lock.

    Liveness is measured on time.monotonic() (``seen_at``): stepping the wall clock changes no
    worker's state. ``last_seen`` is the wall-clock time of the same moment, for display."""
    __slots__ = ("worker_id", "address", "slots", "running", "last_seen", "seen_at", "hostname",
                 "version", "tls", "heartbeat", "stop_grace", "deregistered", "reported_offline",
                 "client", "client_tls")

    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.address = self.hostname = self.version = self.client = None
        self.slots, self.running, self.heartbeat, self.stop_grace = 1, 0, 0.0, 5.0
        self.last_seen, self.seen_at = time.time(), time.monotonic()
        self.tls = self.deregistered = self.reported_offline = self.client_tls = False

    def online(self, now):
        """Whether the worker counts as online at time.monotonic() ``now``."""
        if self.deregistered:
            return False
        return not self.heartbeat or now - self.seen_at <= MISSED_HEARTBEATS * self.heartbeat

    def to_struct(self, now):
        return without_none({
            "worker_id": self.worker_id, "address": self.address, "online": self.online(now),
            "slots": self.slots, "running": wire_int(self.running), "last_seen": self.last_seen,
            "hostname": self.hostname, "version": self.version, "tls": self.tls,
            "heartbeat": self.heartbeat,
        })


class Scheduler(_Role):
    """The cluster's front door: a registry of workers and a router for their jobs.

    Library use: ``Scheduler(listen="127.0.0.1:0")``, then start_serving() (or ``with``),
    ``address``, close(). RPCs: register, deregister, heartbeat, start, stop, query, output,
    jobs, workers, info; JSON routes POST /start /stop /query, GET /workers /jobs.
    It keeps no database: after a restart workers register again and jobs it does not know are
    asked of the online workers in parallel."""

    def __init__(self, listen=DEFAULT_SCHEDULER, rpc_timeout=10.0, max_request=MiB,
                 read_timeout=30.0, token=None, tls_cert=None, tls_key=None, tls_ca=None,
                 insecure=False, security=None):
        self.security = security or Security(token, tls_cert, tls_key, tls_ca, insecure)
        self.rpc_timeout = rpc_timeout
        self.workers_lock = threading.Lock()
        #: guards self._workers, self._job_index, self._job_order, self._round_robin and every
        #: WorkerRecord
        self._workers = {}     # worker_id -> WorkerRecord, in registration order
        self._job_index = {}   # job_id -> worker_id
        self._job_order = deque()  # the ids in self._job_index, oldest first
        self._round_robin = 0
        self._closed = threading.Event()
        self.server = RPCServer(listen, self.security, {
            "register": self.register, "deregister": self.deregister,
            "heartbeat": self.heartbeat, "start": self.start, "stop": self.stop,
            "query": functools.partial(self.query, relay=True),
            "output": functools.partial(self.output, relay=True),
            "jobs": self.jobs,
            "workers": self.workers, "info": self.info,
        }, json_routes={
            ("POST", "/start"): self._json_start, ("POST", "/stop"): self._json_stop,
            ("POST", "/query"): self._json_query,
            ("GET", "/workers"): lambda request: (200, {"workers": self.workers()}),
            ("GET", "/jobs"): lambda request: (200, {"jobs": self.jobs()}),
        }, max_request=max_request, read_timeout=read_timeout)
        self._threads = []

    def start_serving(self):
        self._threads.append(self.server.serve_in_thread())
        watcher = threading.Thread(target=self._watch_workers, name="jobsched-watch", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        log.info("scheduler listening on %s", self.address)
        return self

    def close(self):
        if self._closed.is_set():
            return
        self._closed.set()
        self.server.close()
        for thread in self._threads:
            thread.join(timeout=3.0)
        with self.workers_lock:
            clients = [rec.client for rec in self._workers.values() if rec.client]
        for client in clients:
            client.close()
        log.info("scheduler stopped")

    def _watch_workers(self):
        """Log each worker that goes silent, once, and close the connections to it; close
        connections idle for RPCClient.idle_timeout."""
        while not self._closed.wait(0.5):
            now, silent, clients = time.monotonic(), [], []
            with self.workers_lock:
                for rec in self._workers.values():
                    online = rec.online(now)
                    if not online and not rec.reported_offline and not rec.deregistered:
                        silent.append((rec.worker_id, now - rec.seen_at, rec.client))
                    elif online and rec.client is not None:
                        clients.append(rec.client)
                    rec.reported_offline = not online
            for worker_id, age, client in silent:
                log.warning("worker %s offline (no heartbeat for %.1f s)", worker_id, age)
                if client is not None:
                    client.close()
            for client in clients:
                client.drop_idle()

    # -- registry ------------------------------------------------------------------------------

    @staticmethod
    def _worker_fields(info):
        """The fields of a worker's info struct the scheduler keeps, checked: an out-of-range
        number is fault 2 here, not a record that breaks every later workers()."""
        info = want_struct(info if info is not None else {}, "info")
        fields = {}
        for key in ("slots", "running"):
            if key in info:
                fields[key] = want_number(info[key], "info." + key, integer=True)
                if fields[key] > 2 ** 31 - 1:
                    raise BadRequest("info.%s must be at most %d" % (key, 2 ** 31 - 1))
        for key in ("heartbeat", "stop_grace"):
            if key in info:
                fields[key] = want_number(info[key], "info." + key)
                if fields[key] > MAX_JOB_TIMEOUT:
                    raise BadRequest("info.%s must be at most %d seconds" % (key, MAX_JOB_TIMEOUT))
        for key in ("hostname", "version"):
            if key in info:
                fields[key] = want_str(info[key], "info." + key, limit=256)
        if "tls" in info:
            if not isinstance(info["tls"], bool):
                raise BadRequest("info.tls must be a boolean")
            fields["tls"] = info["tls"]
        return info, fields

    @staticmethod
    def _update(rec, fields):
        """Apply checked info fields to a worker's record (under workers_lock)."""
        for key, value in fields.items():
            setattr(rec, key, value)
        rec.last_seen, rec.seen_at = time.time(), time.monotonic()
        rec.deregistered = False

    def register(self, address, info=None):
        """Add a worker at address (HOST:PORT); returns its worker_id (``info.worker_id`` if given)."""
        want_str(address, "address", limit=512, empty=False)
        want_host_port(address)
        info, fields = self._worker_fields(info)
        worker_id = want_str(info.get("worker_id") or str(uuid.uuid4()), "worker_id", limit=256)
        with self.workers_lock:
            rec = self._workers.get(worker_id) or WorkerRecord(worker_id)
            self._workers[worker_id] = rec
            old_client = rec.client
            self._update(rec, fields)
            tls = rec.tls or self.security.dials_tls or address.startswith("https://")
            if rec.address != address or rec.client is None or rec.client_tls != tls:
                rec.address, rec.client_tls = address, tls
                rec.client = RPCClient(("https://" if tls and "://" not in address else "") + address,
                                       security=self.security, timeout=self.rpc_timeout)
        if old_client is not None and old_client is not rec.client:
            old_client.close()
        log.info("worker %s registered at %s", worker_id, address)
        return worker_id

    def deregister(self, worker_id):
        """Mark the worker offline for good (it stays listed); true."""
        rec = self._worker(worker_id)
        with self.workers_lock:
            rec.deregistered = True
            client = rec.client
        if client is not None:
            client.close()
        log.info("worker %s deregistered", worker_id)
        return True

    def heartbeat(self, worker_id, info=None):
        """A worker's periodic sign of life; fault 1 "unknown worker" asks it to register again."""
        want_str(worker_id, "worker_id", limit=256)
        _, fields = self._worker_fields(info)
        with self.workers_lock:
            rec = self._workers.get(worker_id)
            if rec is None or rec.deregistered:
                raise NotFound("unknown worker %s" % _short(worker_id))
            came_back = rec.reported_offline
            self._update(rec, fields)
            rec.reported_offline = False
        if came_back:
            log.info("worker %s back online", worker_id)
        return True

    def workers(self):
        """Every worker ever registered since start, with ``online``."""
        now = time.monotonic()
        with self.workers_lock:
            return [rec.to_struct(now) for rec in self._workers.values()]

    def info(self):
        with self.workers_lock:
            count = len(self._workers)
        return {"role": "scheduler", "version": __version__, "workers": count,
                "hostname": socket.gethostname()}

    def _worker(self, worker_id):
        return lookup(self._workers, self.workers_lock, worker_id, "worker")

    def _online_worker(self, rec):
        with self.workers_lock:
            if not rec.online(time.monotonic()):
                raise Unavailable("worker offline")
            return rec

    def _remember(self, *pairs):
        """Index (job_id, worker_id) pairs, forgetting the oldest past JOB_INDEX_LIMIT."""
        with self.workers_lock:
            for job_id, worker_id in pairs:
                if job_id not in self._job_index:
                    self._job_order.append(job_id)
                self._job_index[job_id] = worker_id
            while len(self._job_order) > JOB_INDEX_LIMIT:
                del self._job_index[self._job_order.popleft()]

    # -- routing -------------------------------------------------------------------------------

    def _pick_worker(self, tried, accept=None):
        """The untried online worker with the most free slots, ties taken round-robin; its slot
        is held (``running`` + 1) until its next heartbeat tells the truth. ``accept``, if given,
        is a test of a WorkerRecord (called under workers_lock: keep it quick).

        Free slots are as of the last heartbeat plus the starts since; a worker that looks full
        is still tried last, since only the worker itself knows (it refuses with fault 3)."""
        now = time.monotonic()
        with self.workers_lock:
            records = list(self._workers.values())
            self._round_robin += 1
            first = self._round_robin % len(records) if records else 0
            best, best_free = None, None
            for rec in records[first:] + records[:first]:
                free = rec.slots - rec.running
                if (best_free is None or free > best_free) and rec.worker_id not in tried \
                        and rec.online(now) and (accept is None or accept(rec)):
                    best, best_free = rec, free
            if best is not None:
                best.running += 1
            return best

    def start(self, worker_id, command, path, options=None):
        """Start a job on worker_id, or on the worker with the most free slots if it is "".

        The job is named before it is placed: its job_id is the caller's (options' ``job_id``)
        or a new UUID, sent to the worker, whose start is idempotent. A job_id the scheduler has
        placed before goes to the same worker again. See _start_on for when placement moves on."""
        want_str(worker_id, "worker_id", limit=256)
        want_str(command, "command", empty=False)
        want_str(path, "path")
        options = {key: value for key, value in parse_job_options(
            options if options is not None else {}).items() if value}
        job_id = options.setdefault("job_id", str(uuid.uuid4()))
        with self.workers_lock:
            placed = self._job_index.get(job_id)
        if placed and worker_id not in ("", placed):
            raise BadRequest("job %s was placed on worker %s, not %s" % (job_id, placed, _short(worker_id)))
        if placed or worker_id:
            rec = self._online_worker(self._worker(placed or worker_id))
            with self.workers_lock:
                rec.running += 1
            return self._start_on(rec, command, path, options)
        tried = set()
        while True:
            rec = self._pick_worker(tried)
            if rec is None:
                raise Unavailable("no worker has a free slot")
            try:
                return self._start_on(rec, command, path, options)
            except OutcomeUnknown:
                raise
            except Unavailable as e:  # full, disk full, shutting down, or never reached: next
                log.info("worker %s refused a job: %s", rec.worker_id, e)
                tried.add(rec.worker_id)

    def _start_on(self, rec, command, path, options):
        """Start a job on rec, whose slot the caller holds; ``options`` carry its job_id.
        Returns the job_id, indexed on rec.

        When rec certainly did not start the job -- a fault answer, or no request sent whole
        (connection refused, failed TLS handshake) -- the slot is given back and the error
        raised: the caller may try another worker. When the outcome is unknown (timed out,
        connection lost after sending), rec is asked again with the same job_id (start is
        idempotent) until it answers with the job_id or --rpc-timeout runs out; then
        OutcomeUnknown, with the job indexed on rec so that a later query tells the truth.
        Never another worker then: that is how a job could run twice. (Nor after a fault to a
        second ask: the first request may still wait unread in the worker's socket.)"""
        job_id = options["job_id"]
        deadline = time.monotonic() + self.rpc_timeout
        unknown, delay = None, 0.05
        while True:
            try:
                # The first call has the client's timeout (no settimeout syscalls); a retry
                # gets what is left of the rpc timeout.
                timeout = None if unknown is None else max(deadline - time.monotonic(), 0.05)
                rec.client.call("start", command, path, options, timeout=timeout)
                break
            except JobschedError as e:
                if unknown is None and not isinstance(e, OutcomeUnknown):  # certainly not started
                    with self.workers_lock:
                        rec.running -= 1
                    raise
                unknown = unknown or e
            if time.monotonic() + delay >= deadline or self._closed.wait(delay):
                self._remember((job_id, rec.worker_id))
                log.warning("job %s may have started on worker %s: %s", job_id, rec.worker_id, unknown)
                raise OutcomeUnknown("outcome unknown: job %s may have started on worker %s (%s)"
                                     % (job_id, rec.worker_id, unknown))
            delay = min(2 * delay, 1.0)
        self._remember((job_id, rec.worker_id))
        return job_id

    def _route(self, ids):
        """(WorkerRecord, job_id) for stop/query/output: (job_id) or the seed's (worker_id, job_id)."""
        if len(ids) == 2:
            worker_id, job_id = ids
            want_str(worker_id, "worker_id", limit=256)
        elif len(ids) == 1:
            worker_id, job_id = "", ids[0]
        else:
            raise BadRequest("expected (job_id) or (worker_id, job_id)")
        want_str(job_id, "job_id", limit=256, empty=False)
        with self.workers_lock:
            worker_id = self._job_index.get(job_id) or worker_id
        if worker_id:
            return self._online_worker(self._worker(worker_id)), job_id
        answers = self._ask_online("query", job_id, first=lambda result: isinstance(result, dict))
        found = [rec for rec, struct in answers if isinstance(struct, dict)]
        if not found:
            silent = sum(isinstance(result, Unavailable) for _, result in answers)
            if silent:  # the job may be on a worker that did not answer: not "not found"
                raise Unavailable("job %s not found on the workers that answered; %d did not"
                                  % (_short(job_id), silent))
            raise NotFound("job not found: %s" % _short(job_id))
        self._remember((job_id, found[0].worker_id))
        return found[0], job_id

    def _ask_online(self, method, *params, first=None):
        """Call method on every online worker in parallel: [(rec, result or JobschedError)],
        within the rpc timeout and half a second; a worker that has not answered by then is
        Unavailable.

        With ``first`` given, returns [(rec, result)] as soon as first(result) is true, so a hung
        worker delays only the answers that need it."""
        deadline = time.monotonic() + self.rpc_timeout + 0.5
        with self.workers_lock:
            records = [rec for rec in self._workers.values() if rec.online(time.monotonic())]
        if not records:
            return []

        answers = queue.Queue()

        def ask(rec):
            try:
                result = rec.client.call(method, *params)
            except JobschedError as e:
                result = e
            except Exception as e:  # RPCClient turns a peer's failures into JobschedError: a bug
                log.exception("internal error asking worker %s", rec.worker_id)
                result = InternalError("internal error asking worker %s: %s" % (rec.worker_id, e))
            answers.put((rec, result))
        # Daemon threads, not an executor: a hung worker must not hold up the process's exit.
        for rec in records:
            threading.Thread(target=ask, args=(rec,), daemon=True).start()
        results = []
        for _ in records:  # each call ends within the rpc timeout, or is not waited for
            try:
                rec, result = answers.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if first is not None and first(result):
                return [(rec, result)]
            results.append((rec, result))
        answered = {rec.worker_id for rec, _ in results}
        results.extend((rec, Unavailable("no answer from worker %s within %g s"
                                         % (rec.worker_id, self.rpc_timeout)))
                       for rec in records if rec.worker_id not in answered)
        return results

    def stop(self, *ids):
        """stop(job_id) or stop(worker_id, job_id): true once the job has ended."""
        rec, job_id = self._route(ids)
        return rec.client.call("stop", job_id, timeout=self.rpc_timeout + rec.stop_grace + 1)

    def query(self, *ids, relay=False):
        """query(job_id) or query(worker_id, job_id): the job's struct (the RPC relays it)."""
        rec, job_id = self._route(ids)
        return rec.client.call("query", job_id, relay=relay)

    def output(self, job_id, offset, max_bytes, wait_seconds=0, *, relay=False):
        """The job's output from offset, as the worker's output() answers it.

        The RPC passes relay=True: the worker's reply (up to a MiB of base64) goes on unparsed."""
        wait = min(want_number(wait_seconds, "wait_seconds"), MAX_WAIT_SECONDS)
        offset = want_number(offset, "offset", integer=True)
        max_bytes = min(want_number(max_bytes, "max_bytes", integer=True), MAX_OUTPUT_CHUNK)
        rec, job_id = self._route((job_id,))
        return rec.client.call("output", job_id, wire_int(offset), max_bytes, wait,
                               timeout=self.rpc_timeout + wait, relay=relay)

    def jobs(self):
        """Every job of every online worker, asked in parallel."""
        jobs = []
        for rec, result in self._ask_online("jobs"):
            if isinstance(result, list):
                jobs.extend(result)
            else:
                log.warning("worker %s did not list its jobs: %s", rec.worker_id, result)
        # Index fresh copies: the listing's own strings would keep the memory of the whole
        # parsed listing allocated (100000 jobs: 150 MB of RSS instead of 15 MB).
        self._remember(*[(job["job_id"].encode().decode(), sys.intern(job["worker_id"]))
                         for job in jobs])
        return jobs

    # -- JSON routes (the seed's HTTP API) -----------------------------------------------------

    @staticmethod
    def _fields(request, required, optional=()):
        unknown = sorted(set(request) - set(required) - set(optional))
        if unknown:
            raise BadRequest("unknown field %s" % _short(unknown[0]))
        for name in required:
            if name not in request:
                raise BadRequest("missing field %s" % name)
        return request

    def _json_start(self, request):
        self._fields(request, ("command",), ("worker_id", "path") + JOB_OPTIONS)
        options = {k: request[k] for k in JOB_OPTIONS if request.get(k) is not None}
        job_id = self.start(request.get("worker_id") or "", request["command"],
                            request.get("path") or "", options)
        return 201, {"job_id": job_id}

    def _json_stop(self, request):
        self._fields(request, ("job_id",), ("worker_id",))
        return 200, {"success": self.stop(request["job_id"])}

    def _json_query(self, request):
        self._fields(request, ("job_id",), ("worker_id",))
        return 200, self.query(request["job_id"])


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------

class Client(RPCClient):
    """What programs and the command line call: one method per RPC of the scheduler and the
    worker (start, stop, query, output, jobs, workers, info, register, deregister, heartbeat),
    plus follow(). Same arguments as the RPCs; see RPCClient for addresses and errors."""

    # Scheduler and worker share start, stop, query, output and jobs.
    def start(self, *args):
        """Worker: start(command, path[, options]); scheduler: start(worker_id, command, path[, options])."""
        return self.call("start", *args)

    def stop(self, *ids):
        return self.call("stop", *ids, timeout=self.timeout + 60)

    def query(self, *ids):
        return self.call("query", *ids)

    def output(self, job_id, offset=0, max_bytes=MAX_OUTPUT_CHUNK, wait_seconds=0):
        reply = self.call("output", job_id, wire_int(offset), max_bytes, wait_seconds,
                          timeout=self.timeout + wait_seconds)
        reply["data"] = reply["data"].data
        reply["offset"] = int(reply["offset"])
        return reply

    def follow(self, job_id, offset=0, wait_seconds=10):
        """Yield the job's output from ``offset`` in chunks until the job has ended and all is read."""
        while True:
            reply = self.output(job_id, offset, MAX_OUTPUT_CHUNK, wait_seconds)
            if reply["data"]:
                yield reply["data"]
            offset = reply["offset"]
            if reply["eof"]:
                return

    def jobs(self):
        return self.call("jobs")

    def workers(self):
        return self.call("workers")

    def info(self):
        return self.call("info")

    def register(self, address, info=None):
        return self.call("register", address, *([info] if info is not None else []))

    def deregister(self, worker_id):
        return self.call("deregister", worker_id)

    def heartbeat(self, worker_id, info=None):
        return self.call("heartbeat", worker_id, *([info] if info is not None else []))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _env(name, default=None):
    return os.environ.get(name) or default


def _positive(kind):
    """An argparse type: a number of this kind above zero."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError("%r is not a positive %s" % (text, kind.__name__))
        return value
    return convert


def _security_from_args(args):
    token = read_token_file(args.token_file) if args.token_file else _env("JOBSCHED_TOKEN")
    return Security(token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                    insecure=getattr(args, "insecure", False))


def _client_from_args(args):
    return Client(args.scheduler, security=_security_from_args(args), timeout=args.rpc_timeout)


def _configure_logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


def _serve_until_signal(role, banner):
    """Serve until SIGINT or SIGTERM; a second signal exits at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            os._exit(1)
        stop.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    role.start_serving()
    print(banner % role.address, flush=True)
    while not stop.wait(0.5) and not role.fatal_error:
        pass
    if role.fatal_error:
        role.close()
        print("jobsched: error: %s" % role.fatal_error, file=sys.stderr)
        return 2
    log.info("signal received, shutting down")
    role.close()
    return 0


def cmd_scheduler(args):
    scheduler = Scheduler(args.listen, rpc_timeout=args.rpc_timeout, max_request=args.max_request,
                          security=_security_from_args(args))
    return _serve_until_signal(scheduler, "jobsched scheduler listening on %s")


def cmd_worker(args):
    worker = Worker(args.listen, scheduler=args.scheduler or None, advertise=args.advertise,
                    state_dir=args.state_dir, slots=args.slots, stop_grace=args.stop_grace,
                    heartbeat=args.heartbeat, keep_jobs=args.keep_jobs, allow=args.allow,
                    jobs_dir=args.jobs_dir, rpc_timeout=args.rpc_timeout,
                    max_request=args.max_request, security=_security_from_args(args))
    return _serve_until_signal(worker, "jobsched worker listening on %%s (worker_id %s)"
                               % worker.worker_id)


def _start_options(args):
    options = {"args": args.command[1:]}
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--env %s is not K=V" % _short(item))
        env[key] = value
    if env:
        options["env"] = env
    if args.cwd:
        options["cwd"] = args.cwd
    if args.timeout is not None:
        options["timeout"] = args.timeout
    return options


def _start_from_args(client, args):
    if not args.command:
        raise ConfigError("no command given: jobsched %s [options] -- COMMAND [ARG...]" % args.cmd)
    return client.start(args.worker, args.command[0], args.path, _start_options(args))


def cmd_start(args):
    print(_start_from_args(_client_from_args(args), args))
    return 0


def _write_output(client, job_id, position, follow):
    """Copy a job's output to stdout from position["offset"], keeping it up to date (so a Ctrl-C
    loses no place); follow until the job ends if asked."""
    out = sys.stdout.buffer
    while True:
        reply = client.output(job_id, position["offset"], MAX_OUTPUT_CHUNK, 10 if follow else 0)
        out.write(reply["data"])
        out.flush()
        position["offset"] = reply["offset"]
        if reply["eof"] or (not follow and not reply["data"]):
            return


def job_exit_status(job):
    """The status a shell would give: the exit code, 128+N when killed by signal N, else 1."""
    if "exit_code" in job:
        return job["exit_code"]
    if "signal" in job:
        return 128 + job["signal"]
    return 1


def cmd_run(args):
    client = _client_from_args(args)
    job_id = _start_from_args(client, args)
    position, interrupted = {"offset": 0}, False
    while True:
        try:
            _write_output(client, job_id, position, follow=True)
            break
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            print("jobsched: stopping job %s" % job_id, file=sys.stderr)
            client.stop(job_id)
    return job_exit_status(client.query(job_id))


def cmd_stop(args):
    _client_from_args(args).stop(args.job_id)
    return 0


def _print_struct(struct, as_json):
    if as_json:
        print(json.dumps(struct, indent=2, sort_keys=True))
        return
    for key in sorted(struct):
        print("%s: %s" % (key, struct[key]))


def cmd_query(args):
    _print_struct(_client_from_args(args).query(args.job_id), args.json)
    return 0


def cmd_logs(args):
    if args.offset < 0:
        raise ConfigError("--offset must be >= 0")
    _write_output(_client_from_args(args), args.job_id, {"offset": args.offset}, args.follow)
    return 0


def _print_table(rows, columns, as_json, key):
    if as_json:
        print(json.dumps({key: rows}, indent=2, sort_keys=True))
        return
    table = [[name.upper() for name, _ in columns]]
    table += [[str(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def cmd_jobs(args):
    _print_table(_client_from_args(args).jobs(), [
        ("job_id", lambda j: j["job_id"]), ("worker_id", lambda j: j["worker_id"][:8]),
        ("state", lambda j: j["state"]),
        ("exit", lambda j: j["exit_code"] if "exit_code" in j else
         "signal %d" % j["signal"] if "signal" in j else "-"),
        ("command", lambda j: " ".join([j["command"]] + ([j["path"]] if j["path"] else []) + j["args"])),
    ], args.json, "jobs")
    return 0


def _print_workers(workers, as_json):
    _print_table(workers, [
        ("worker_id", lambda w: w["worker_id"]), ("address", lambda w: w["address"]),
        ("online", lambda w: "yes" if w["online"] else "no"), ("slots", lambda w: w["slots"]),
        ("running", lambda w: w["running"]), ("hostname", lambda w: w.get("hostname", "")),
    ], as_json, "workers")


def cmd_workers(args):
    _print_workers(_client_from_args(args).workers(), args.json)
    return 0


def cmd_demo(args):
    """A scheduler and two workers on free loopback ports, in this process, then gone."""
    here = os.path.dirname(os.path.abspath(__file__))
    count = os.path.join(here, "examples", "count.sh")
    job = ("sh", count, ["5"]) if os.path.exists(count) else (
        "sh", "", ["-c", 'for i in 1 2 3 4 5; do echo $i; sleep 1; done; echo done'])
    with tempfile.TemporaryDirectory(prefix="jobsched-demo-") as tmp:
        with Scheduler("127.0.0.1:0") as scheduler:
            print("== scheduler listening on %s" % scheduler.address)
            with Worker("127.0.0.1:0", scheduler.address, state_dir=os.path.join(tmp, "w1"),
                        heartbeat=0.5, stop_grace=2) as w1, \
                    Worker("127.0.0.1:0", scheduler.address, state_dir=os.path.join(tmp, "w2"),
                           heartbeat=0.5, stop_grace=2) as w2:
                client = Client(scheduler.address)
                deadline = time.monotonic() + 10
                while sum(w["online"] for w in client.workers()) < 2:
                    if time.monotonic() > deadline:
                        raise Unavailable("the demo workers did not register")
                    time.sleep(0.05)
                print("== workers %s and %s registered" % (w1.worker_id[:8], w2.worker_id[:8]))
                print("$ jobsched run -- %s" % " ".join([job[0]] + ([job[1]] if job[1] else []) + job[2]))
                job_id = client.start("", job[0], job[1], {"args": job[2]})
                for chunk in client.follow(job_id):
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                print("$ jobsched query %s" % job_id)
                _print_struct(client.query(job_id), False)
                print("$ jobsched workers")
                _print_workers(client.workers(), False)
                long_job = client.start("", "sleep", "", {"args": ["600"]})
                print("$ jobsched start -- sleep 600\n%s" % long_job)
                print("$ jobsched stop %s" % long_job)
                client.stop(long_job)
                state = client.query(long_job)
                print("state: %s, error_text: %s" % (state["state"], state["error_text"]))
                client.close()
        print("== all stopped; nothing left behind")
    return 0



def build_parser():
    parser = argparse.ArgumentParser(
        prog="jobsched", description="One scheduler, many workers, jobs run anywhere (XML-RPC, stdlib only).",
        epilog="Start with: python3 jobsched.py demo")
    parser.add_argument("--version", action="version", version="jobsched " + __version__)
    commands = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    commands.required = True

    security = argparse.ArgumentParser(add_help=False)
    group = security.add_argument_group("security")
    group.add_argument("--token-file", metavar="FILE", default=_env("JOBSCHED_TOKEN_FILE"),
                       help="shared token, required on every request (env JOBSCHED_TOKEN holds the token itself)")
    group.add_argument("--tls-cert", metavar="FILE", default=_env("JOBSCHED_TLS_CERT"),
                       help="certificate to serve TLS with / to present as a client (env JOBSCHED_TLS_CERT)")
    group.add_argument("--tls-key", metavar="FILE", default=_env("JOBSCHED_TLS_KEY"),
                       help="its private key (env JOBSCHED_TLS_KEY)")
    group.add_argument("--tls-ca", metavar="FILE", default=_env("JOBSCHED_TLS_CA"),
                       help="CA that peers' certificates must chain to; servers then require client "
                            "certificates (mutual TLS) (env JOBSCHED_TLS_CA)")
    group.add_argument("--rpc-timeout", metavar="SECONDS", type=_positive(float), default=10.0,
                       help="timeout of each remote call (default: %(default)s)")

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--insecure", action="store_true",
                        help="allow listening on a non-loopback address without token or mutual TLS")
    server.add_argument("--max-request", metavar="BYTES", type=_positive(int), default=MiB,
                        help="largest request body accepted (default: %(default)s)")
    server.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"], help="(default: %(default)s)")

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--scheduler", metavar="HOST:PORT", default=_env("JOBSCHED_SCHEDULER", DEFAULT_SCHEDULER),
                        help="scheduler to talk to; https://HOST:PORT for TLS (env JOBSCHED_SCHEDULER; "
                             "default: %(default)s)")

    def command(name, help, func, parents=(security, client)):
        sub = commands.add_parser(name, help=help, description=help, parents=list(parents))
        sub.set_defaults(func=func)
        return sub

    sub = command("scheduler", "run the scheduler", cmd_scheduler, (security, server))
    sub.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_SCHEDULER, help="(default: %(default)s)")

    sub = command("worker", "run a worker", cmd_worker, (security, server))
    sub.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_WORKER,
                     help="port 0 picks a free port (default: %(default)s)")
    sub.add_argument("--scheduler", metavar="HOST:PORT", default=_env("JOBSCHED_SCHEDULER", DEFAULT_SCHEDULER),
                     help="scheduler to register with; '' for none (default: %(default)s)")
    sub.add_argument("--advertise", metavar="HOST:PORT",
                     help="address the scheduler should dial (default: the bound address)")
    sub.add_argument("--state-dir", metavar="DIR", default=default_state_dir(),
                     help="job output and records, locked by one worker (default: %(default)s)")
    sub.add_argument("--slots", type=_positive(int), default=os.cpu_count() or 1,
                     help="jobs run at once, at most (default: %(default)s, the CPU count)")
    sub.add_argument("--stop-grace", metavar="SECONDS", type=_positive(float), default=5.0,
                     help="time between SIGTERM and SIGKILL on stop (default: %(default)s)")
    sub.add_argument("--heartbeat", metavar="SECONDS", type=_positive(float), default=2.0,
                     help="heartbeat interval (default: %(default)s)")
    sub.add_argument("--keep-jobs", metavar="N", type=_positive(int), default=10000,
                     help="finished jobs kept, oldest removed first (default: %(default)s)")
    sub.add_argument("--allow", metavar="COMMAND", action="append", default=[],
                     help="only these commands may be started (repeatable; matched on the resolved path)")
    sub.add_argument("--jobs-dir", metavar="DIR",
                     help="resolve 'path' inside DIR and refuse anything that escapes it")

    def job_options(sub):
        sub.add_argument("--worker", metavar="ID", default="", help="worker to run on (default: the one with most free slots)")
        sub.add_argument("--path", default="", help="script path passed after COMMAND (default: none)")
        sub.add_argument("--cwd", metavar="DIR", help="working directory of the job")
        sub.add_argument("--env", metavar="K=V", action="append", default=[], help="add to the job's environment (repeatable)")
        sub.add_argument("--timeout", metavar="SECONDS", type=_positive(float), help="stop the job after this long")
        sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    job_options(command("start", "start a job and print its id", cmd_start))
    job_options(command("run", "start a job, stream its output, exit with its exit code", cmd_run))
    sub = command("stop", "stop a job (TERM, then KILL after the grace period)", cmd_stop)
    sub.add_argument("job_id")
    sub = command("query", "show a job's state", cmd_query)
    sub.add_argument("job_id")
    sub.add_argument("--json", action="store_true", help="print the job struct as JSON")
    sub = command("logs", "write a job's output to stdout", cmd_logs)
    sub.add_argument("job_id")
    sub.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    sub.add_argument("--offset", type=int, default=0, help="start at this byte (default: %(default)s)")
    sub = command("jobs", "list the jobs of every online worker", cmd_jobs)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command("workers", "list the workers", cmd_workers)
    sub.add_argument("--json", action="store_true", help="print JSON")
    command("demo", "start a scheduler and two workers on loopback, run jobs, clean up", cmd_demo, ())
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if args.cmd in ("scheduler", "worker"):
        _configure_logging(args.log_level)
    elif args.cmd == "demo":
        _configure_logging("error")
    try:
        return args.func(args)
    except ConfigError as e:
        print("jobsched: error: %s" % e, file=sys.stderr)
        return 2
    except JobschedError as e:
        print("jobsched: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jobsched: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
