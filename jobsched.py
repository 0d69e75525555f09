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
import ipaddress
import json
import logging
import os
import platform
import pyexpat
import queue
import random
import re
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
    "JobschedError", "NotFound", "BadRequest", "Unavailable", "Unreachable", "InternalError",
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
FAN_OUT_THREADS = 64          # the most threads a start_all calls workers from


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
    """The peer could not be reached or answered at the HTTP level (no fault was received)."""


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


LABEL_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_LABEL_VALUE = 256
MAX_LABELS = 100


def want_labels(value, name):
    """A struct of labels (a worker's) or of constraints (a job's ``on``): keys of 1 to 64
    characters from A-Z a-z 0-9 _ . -, values printable strings of at most 256 characters."""
    pairs = want_struct(value, name)
    if len(pairs) > MAX_LABELS:
        raise BadRequest("%s has more than %d pairs" % (name, MAX_LABELS))
    for key, value in pairs.items():
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            raise BadRequest("%s: key %s must be 1 to 64 characters from A-Z a-z 0-9 _ . -"
                             % (name, _short(key)))
        if not isinstance(value, str):
            raise BadRequest("%s.%s must be a string, not %s" % (name, key, type(value).__name__))
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise BadRequest("%s.%s must be printable and at most %d characters: %s"
                             % (name, key, MAX_LABEL_VALUE, _short(value)))
    return pairs


def parse_on(value, name="on"):
    """A job's placement constraints: {KEY: VALUE}; the value "*" asks only that the key exists."""
    return want_labels(value, name)


def labels_match(labels, on):
    """True if labels satisfy every pair of on (see parse_on)."""
    return all(key in labels and value in ("*", labels[key]) for key, value in on.items())


def format_labels(pairs):
    """'k=v,k=v', sorted by key: how labels and constraints are shown."""
    return ",".join("%s=%s" % item for item in sorted(pairs.items()))


def split_on(options):
    """(options without "on", the checked "on" struct): the scheduler places by "on" and
    forwards the rest; workers do not know "on"."""
    if options is None:
        return None, {}
    options = want_struct(options, "options")
    if "on" not in options:
        return options, {}
    options = dict(options)
    return options, parse_on(options.pop("on"), "options.on")


def worker_labels(extra=None):
    """The built-in labels host, os and arch, plus extra; ConfigError for a bad pair or one that
    would change a built-in label."""
    labels = {"host": socket.gethostname(), "os": sys.platform, "arch": platform.machine()}
    try:
        extra = want_labels(extra or {}, "label")
    except BadRequest as e:
        raise ConfigError(str(e))
    for key, value in sorted(extra.items()):
        if key in labels and labels[key] != value:
            raise ConfigError("label %s is built in (%s=%s) and cannot be changed"
                              % (key, key, labels[key]))
        labels[key] = value
    return labels


def want_info_labels(info):
    """Check a worker's info struct's labels in place (register, heartbeat)."""
    if "labels" in info:
        info["labels"] = want_labels(info["labels"], "info.labels")


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

class Headers(dict):
    """HTTP headers by lower-cased name (of repeated ones, the last), read without the email
    package, whose parser cost a tenth of the CPU of a small request on each side."""

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
            if len(line) > 65536 or not colon or not name.strip():
                raise http.client.HTTPException("bad header line")
            headers[name.strip().lower()] = value.strip()
        raise http.client.HTTPException("more than %d headers" % max_headers)


class RequestHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    """HTTP/1.1 keep-alive handler: token check, body limits, XML-RPC and JSON routes."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    rpc_paths = ("/RPC2", "/")
    server_version = "jobsched/" + __version__
    encode_threshold = None  # gzip makes Binary output 2-3x slower and buys nothing on a LAN

    quiet = False  # true once the connection fell idle: the server parks it

    def setup(self):
        self.timeout = self.server.read_timeout
        super().setup()

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._next_request_within(self.server.park_after):
            self.handle_one_request()

    def _next_request_within(self, seconds):
        if getattr(self.connection, "pending", None) and self.connection.pending():
            return True  # TLS has decrypted bytes buffered: the socket would not show them
        self.connection.settimeout(seconds)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client hung up
                return False
        except socket.timeout:
            self.quiet = True  # this rfile is spent; the next request gets a new handler
            return False
        self.connection.settimeout(self.timeout)
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
            self.send_error(400, str(e))
            return False
        self.command, self.request_version = command, version
        connection = self.headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            version == "HTTP/1.0" and connection != "keep-alive")
        if version == "HTTP/1.1" and self.headers.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

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
        """The request body, or None after answering why it is refused."""
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            return self._refuse(415, "Content-Encoding is not supported")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._refuse(411, "chunked requests are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._refuse(411, "Content-Length is required")
        if not re.match(r"\s*[0-9]+\s*\Z", length):
            return self._refuse(400, "bad Content-Length")
        if len(length.strip()) > 18 or int(length) > self.server.max_request:
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
    hold a thousand threads); it is closed after ``read_timeout`` seconds of silence.

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
        parked = {}  # connection -> (client_address, parked since)
        while True:
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is wakeup:
                    wakeup.recv(4096)
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
                selector.unregister(connection)
                del parked[connection]
                self.shutdown_request(connection)
            if not running:
                selector.close()
                with self._park_lock:
                    self._wake_parking.close()
                wakeup.close()
                return

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


class _Transport(xmlrpc.client.Transport):
    """One kept-alive HTTP(S) connection with a timeout and the token on every request."""
    accept_gzip_encoding = False

    def __init__(self, tls_context, authorization, timeout):
        super().__init__()
        self.tls_context = tls_context
        self.authorization = authorization
        self.timeout = timeout
        self.relay = False  # return the reply as a _RelayedReply instead of parsing it

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        if self.tls_context is not None:
            connection = http.client.HTTPSConnection(host, timeout=self.timeout,
                                                     context=self.tls_context)
        else:
            connection = http.client.HTTPConnection(host, timeout=self.timeout)
        connection.response_class = _Response
        self._connection = host, connection
        return connection

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
    can serve many threads. Faults raise the JobschedError subclass of their code; a peer that
    cannot be reached raises Unreachable. ``address`` is HOST:PORT, or https://HOST:PORT, or
    http://user:TOKEN@HOST:PORT."""
    max_idle = 16

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
        self._idle = []  #: kept-alive transports not in use; guarded by self._idle_lock
        self._idle_lock = threading.Lock()

    def call(self, method, *params, timeout=None, relay=False):
        request = xmlrpc.client.dumps(params, method, allow_none=False).encode("utf-8")
        with self._idle_lock:
            transport = self._idle.pop() if self._idle else None
        if transport is None:
            transport = _Transport(self._tls_context, self._authorization, self.timeout)
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
        except _CONNECTION_ERRORS as e:
            transport.close()
            reason = "timed out" if isinstance(e, socket.timeout) else (str(e) or type(e).__name__)
            raise Unreachable("cannot reach %s: %s" % (self.address, reason)) from None
        self._release(transport, timeout)
        return result

    def _release(self, transport, timeout):
        if timeout is not None:
            transport.set_timeout(self.timeout)
        with self._idle_lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(transport)
                return
        transport.close()

    def close(self):
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for transport in idle:
            transport.close()

class _Role:
    """What Scheduler and Worker share: a server, serving in a thread, closing once."""
    server = None

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


class SpawnedProcess:
    """A job's process started by posix_spawn: its pid, and wait() as Popen has it."""
    __slots__ = ("pid", "returncode")

    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def wait(self):
        """Reap the process and return its returncode (only the job's waiter calls this)."""
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere: nothing left to learn
                status = 255 << 8
            self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.WEXITSTATUS(status))
        return self.returncode


class Spawner:
    """Starts a job's process: its own session and process group, stdin /dev/null, stdout and
    stderr appended to ``out`` (an fd), ``cwd``, ``env`` (None: the worker's), and exactly
    ``executable`` when given (the file --allow checked). Errors are OSError, as Popen's.

    ``method`` "posix_spawn" (the default where it works: Linux with glibc 2.26 or newer) calls
    the C library's posix_spawn through ctypes; glibc runs it with vfork, so a start costs the same
    whatever the worker's size and whatever the Python version. "popen" is subprocess.Popen, whose
    fork on Python 3.6 and 3.7 copies the page tables of the whole worker; it is also the fallback
    for a ``cwd`` on a glibc older than 2.29 (no posix_spawn_file_actions_addchdir_np)."""

    _SETSIGMASK, _SETSIGDEF, _SETSID = 0x08, 0x04, 0x80  # glibc's POSIX_SPAWN_* flags
    _ATTR_BYTES = _ACTIONS_BYTES = _SIGSET_BYTES = 1024  # larger than glibc's structs

    def __init__(self, method=None):
        self._libc = None
        if method in (None, "posix_spawn") and sys.platform.startswith("linux"):
            self._libc = self._load_libc()
        if method == "posix_spawn" and self._libc is None:
            raise ConfigError("posix_spawn through ctypes is not available on this system")
        if method not in (None, "posix_spawn", "popen"):
            raise ConfigError("spawn method must be posix_spawn or popen, not %s" % _short(method))
        self.method = "posix_spawn" if self._libc is not None else "popen"
        if self.method == "posix_spawn" and self._closefrom is None:
            self._close_inherited_fds()

    def _load_libc(self):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            version = tuple(int(n) for n in libc.gnu_get_libc_version().split(b".")[:2])
            if version < (2, 26):  # POSIX_SPAWN_SETSID; exec errors reported through vfork
                return None
            self._ctypes = ctypes
            self._spawn = libc.posix_spawn
            self._attr = (libc.posix_spawnattr_init, libc.posix_spawnattr_setflags,
                          libc.posix_spawnattr_setsigmask, libc.posix_spawnattr_setsigdefault,
                          libc.posix_spawnattr_destroy)
            self._actions = (libc.posix_spawn_file_actions_init,
                             libc.posix_spawn_file_actions_addopen,
                             libc.posix_spawn_file_actions_adddup2,
                             libc.posix_spawn_file_actions_destroy)
            self._chdir = getattr(libc, "posix_spawn_file_actions_addchdir_np", None)
            self._closefrom = getattr(libc, "posix_spawn_file_actions_addclosefrom_np", None)
            # Signals Python sets to SIG_IGN (SIGPIPE, SIGXFSZ) go back to default in the job, as
            # Popen's restore_signals does; the job starts with no signal blocked.
            self._no_signals = ctypes.create_string_buffer(self._SIGSET_BYTES)
            self._default_signals = ctypes.create_string_buffer(self._SIGSET_BYTES)
            libc.sigemptyset(self._no_signals)
            libc.sigemptyset(self._default_signals)
            for signum in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None), getattr(signal, "SIGXFZ", None)):
                if signum is not None:
                    libc.sigaddset(self._default_signals, int(signum))
            return libc
        except (ImportError, OSError, AttributeError, ValueError):
            return None

    @staticmethod
    def _close_inherited_fds():
        """Without posix_spawn_file_actions_addclosefrom_np (glibc < 2.34) a job would inherit
        every fd the worker got from its own parent; Python's own fds are close-on-exec already."""
        try:
            fds = [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:
            return
        for fd in fds:
            if fd > 2:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass

    def spawn(self, argv, out, cwd=None, env=None, executable=None):
        if self._libc is None or (cwd and self._chdir is None):
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=cwd, env=env, start_new_session=True,
                                    executable=executable)
        return SpawnedProcess(self._posix_spawn(argv, out, cwd, env, executable))

    def _find(self, command, executable, cwd, env):
        """The file to exec, searched as Popen searches it: in the PATH of the job's env."""
        if executable:
            return os.fsencode(executable)
        if os.sep in command:
            return os.fsencode(command)
        found = None
        for directory in os.get_exec_path(env):
            candidate = os.path.join(directory, command)
            seen_from = os.path.join(cwd, candidate) if cwd else candidate  # exec runs in cwd
            if os.path.isfile(seen_from) and os.access(seen_from, os.X_OK):
                return os.fsencode(candidate)
            if found is None and os.path.exists(seen_from):
                found = candidate  # exists but cannot run: Popen reports its error, not ENOENT
        if found is not None:
            return os.fsencode(found)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)

    def _posix_spawn(self, argv, out, cwd, env, executable):
        ctypes = self._ctypes
        path = self._find(argv[0], executable, cwd, env)
        args = [os.fsencode(a) for a in argv]
        if env is None:
            env = os.environ
        envp = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
        c_argv = (ctypes.c_char_p * (len(args) + 1))(*args)
        c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp)
        attr = ctypes.create_string_buffer(self._ATTR_BYTES)
        actions = ctypes.create_string_buffer(self._ACTIONS_BYTES)
        attr_init, set_flags, set_mask, set_default, attr_destroy = self._attr
        actions_init, add_open, add_dup2, actions_destroy = self._actions
        pid = ctypes.c_int(0)
        attr_init(attr)
        actions_init(actions)
        try:
            set_flags(attr, ctypes.c_short(self._SETSID | self._SETSIGMASK | self._SETSIGDEF))
            set_mask(attr, self._no_signals)
            set_default(attr, self._default_signals)
            add_open(actions, 0, b"/dev/null", os.O_RDONLY, 0)
            add_dup2(actions, out, 1)
            add_dup2(actions, out, 2)
            if self._closefrom is not None:
                self._closefrom(actions, 3)
            if cwd:
                self._chdir(actions, os.fsencode(cwd))
            err = self._spawn(ctypes.byref(pid), path, actions, attr, c_argv, c_envp)
        finally:
            actions_destroy(actions)
            attr_destroy(attr)
        if err:
            if cwd and not os.path.isdir(cwd):
                raise OSError(err, os.strerror(err), cwd)
            raise OSError(err, os.strerror(err), argv[0] if executable is None else executable)
        return pid.value


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
    standalone. ``labels`` adds to the built-in labels host, os and arch (see worker_labels()).
    RPCs: start, stop, query, output, jobs, info."""

    def __init__(self, listen=DEFAULT_WORKER, scheduler=DEFAULT_SCHEDULER, advertise=None,
                 state_dir=None, slots=None, stop_grace=5.0, heartbeat=2.0, keep_jobs=10000,
                 allow=(), jobs_dir=None, rpc_timeout=10.0, max_request=MiB, read_timeout=30.0,
                 token=None, tls_cert=None, tls_key=None, tls_ca=None, insecure=False,
                 security=None, spawn_method=None, labels=None):
        self.security = security or Security(token, tls_cert, tls_key, tls_ca, insecure)
        self.labels = worker_labels(labels)
        self.spawner = Spawner(spawn_method)
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
            parse_address(advertise)
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
            "stop_grace": self.stop_grace, "labels": dict(self.labels),
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
            job.process = self.spawner.spawn(argv, out, opts["cwd"], env, opts.get("executable"))
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
    """What the scheduler knows of one worker; fields guarded by Scheduler.workers_lock."""
    __slots__ = ("worker_id", "address", "slots", "running", "last_seen", "hostname", "version",
                 "tls", "heartbeat", "stop_grace", "deregistered", "reported_offline", "client",
                 "client_tls", "labels")

    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.address = self.hostname = self.version = self.client = None
        self.slots, self.running, self.heartbeat, self.stop_grace = 1, 0, 0.0, 5.0
        self.last_seen = time.time()
        self.tls = self.deregistered = self.reported_offline = self.client_tls = False
        self.labels = {}  # replaced as a whole, never changed in place

    def online(self, now):
        if self.deregistered:
            return False
        return not self.heartbeat or now - self.last_seen <= MISSED_HEARTBEATS * self.heartbeat

    def to_struct(self, now):
        return without_none({
            "worker_id": self.worker_id, "address": self.address, "online": self.online(now),
            "slots": self.slots, "running": self.running, "last_seen": self.last_seen,
            "hostname": self.hostname, "version": self.version, "tls": self.tls,
            "heartbeat": self.heartbeat, "labels": self.labels,
        })


class Scheduler(_Role):
    """The cluster's front door: a registry of workers and a router for their jobs.

    Library use: ``Scheduler(listen="127.0.0.1:0")``, then start_serving() (or ``with``),
    ``address``, close(). RPCs: register, deregister, heartbeat, start, start_all, stop, query,
    output, jobs, workers, info; JSON routes POST /start /start_all /stop /query, GET /workers /jobs.
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
            "start_all": self.start_all,
            "query": functools.partial(self.query, relay=True),
            "output": functools.partial(self.output, relay=True),
            "jobs": self.jobs,
            "workers": self.workers, "info": self.info,
        }, json_routes={
            ("POST", "/start"): self._json_start, ("POST", "/stop"): self._json_stop,
            ("POST", "/start_all"): self._json_start_all,
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
        """Log each worker that goes silent, once."""
        while not self._closed.wait(0.5):
            now, silent = time.time(), []
            with self.workers_lock:
                for rec in self._workers.values():
                    online = rec.online(now)
                    if not online and not rec.reported_offline and not rec.deregistered:
                        silent.append((rec.worker_id, now - rec.last_seen))
                    rec.reported_offline = not online
            for worker_id, age in silent:
                log.warning("worker %s offline (no heartbeat for %.1f s)", worker_id, age)

    # -- registry ------------------------------------------------------------------------------

    def _update(self, rec, info):
        """Apply a worker's info struct to its record (under workers_lock)."""
        for key, kind in (("slots", int), ("running", int), ("heartbeat", (int, float)),
                          ("stop_grace", (int, float)), ("hostname", str), ("version", str),
                          ("tls", bool)):
            if key in info and isinstance(info[key], kind) and not (
                    kind is int and isinstance(info[key], bool)):
                setattr(rec, key, info[key])
        if "labels" in info and info["labels"] != rec.labels:  # checked by want_info_labels
            rec.labels = info["labels"]
        rec.last_seen = time.time()
        rec.deregistered = False

    def register(self, address, info=None):
        """Add a worker at address (HOST:PORT); returns its worker_id (``info.worker_id`` if given)."""
        want_str(address, "address", limit=512, empty=False)
        parse_address(address)
        info = want_struct(info if info is not None else {}, "info")
        want_info_labels(info)
        worker_id = want_str(info.get("worker_id") or str(uuid.uuid4()), "worker_id", limit=256)
        with self.workers_lock:
            rec = self._workers.get(worker_id) or WorkerRecord(worker_id)
            self._workers[worker_id] = rec
            old_client = rec.client
            self._update(rec, info)
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
        log.info("worker %s deregistered", worker_id)
        return True

    def heartbeat(self, worker_id, info=None):
        """A worker's periodic sign of life; fault 1 "unknown worker" asks it to register again."""
        want_str(worker_id, "worker_id", limit=256)
        info = want_struct(info if info is not None else {}, "info")
        want_info_labels(info)
        with self.workers_lock:
            rec = self._workers.get(worker_id)
            if rec is None or rec.deregistered:
                raise NotFound("unknown worker %s" % _short(worker_id))
            came_back = rec.reported_offline
            self._update(rec, info)
            rec.reported_offline = False
        if came_back:
            log.info("worker %s back online", worker_id)
        return True

    def workers(self):
        """Every worker ever registered since start, with ``online``."""
        now = time.time()
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
            if not rec.online(time.time()):
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
        """The untried online worker with the most free slots, ties taken round-robin; with
        ``accept``, only a worker for which accept(rec) is true (called under workers_lock).

        Free slots are as of the last heartbeat plus the starts since; a worker that looks full
        is still tried last, since only the worker itself knows (it refuses with fault 3)."""
        now = time.time()
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
                best.running += 1  # until its next heartbeat tells the truth
            return best

    def start(self, worker_id, command, path, options=None):
        """Start a job on worker_id, or on the worker with the most free slots if it is ""."""
        want_str(worker_id, "worker_id", limit=256)
        want_str(command, "command", empty=False)
        want_str(path, "path")
        options, on = split_on(options)
        if options is not None:
            parse_job_options(options)  # refuse bad input here, not as a failure to forward it
        params = (command, path) + ((options,) if options is not None else ())
        if worker_id:
            rec = self._online_worker(self._worker(worker_id))
            self._check_on(rec, on)
            job_id = rec.client.call("start", *params)
            with self.workers_lock:
                rec.running += 1
        else:
            tried, accept = set(), self._acceptor(on)
            while True:
                rec = self._pick_worker(tried, accept)
                if rec is None:
                    raise Unavailable("no worker has a free slot")
                try:
                    job_id = rec.client.call("start", *params)
                    break
                except Unavailable as e:  # full, disk full, shutting down or unreachable: next
                    log.info("worker %s refused a job: %s", rec.worker_id, e)
                    tried.add(rec.worker_id)
                    with self.workers_lock:
                        rec.running -= 1
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
        """Call method on every online worker in parallel: [(rec, result or JobschedError)].

        With ``first`` given, returns [(rec, result)] as soon as first(result) is true, so a hung
        worker delays only the answers that need it."""
        now = time.time()
        with self.workers_lock:
            records = [rec for rec in self._workers.values() if rec.online(now)]
        if not records:
            return []

        answers = queue.Queue()

        def ask(rec):
            try:
                answers.put((rec, rec.client.call(method, *params)))
            except JobschedError as e:
                answers.put((rec, e))
        # Daemon threads, not an executor: a hung worker must not hold up the process's exit.
        for rec in records:
            threading.Thread(target=ask, args=(rec,), daemon=True).start()
        results = []
        for _ in records:  # each call ends within the rpc timeout
            rec, result = answers.get()
            if first is not None and first(result):
                return [(rec, result)]
            results.append((rec, result))
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
        want_number(offset, "offset", integer=True)
        want_number(max_bytes, "max_bytes", integer=True)
        rec, job_id = self._route((job_id,))
        return rec.client.call("output", job_id, offset, max_bytes, wait,
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

    # -- placement by labels, fan-out ----------------------------------------------------------

    def _matching_online(self, on):
        """The online workers whose labels match on, in registration order; fault 3 if none."""
        now = time.time()
        with self.workers_lock:
            records = [rec for rec in self._workers.values()
                       if rec.online(now) and labels_match(rec.labels, on)]
        if not records:
            raise Unavailable("no online worker matches %s" % format_labels(on) if on
                              else "no worker is online")
        return records

    def _acceptor(self, on):
        """_pick_worker's filter for a job's ``on``: None without one; fault 3 if none matches."""
        if not on:
            return None
        self._matching_online(on)
        return lambda rec: labels_match(rec.labels, on)

    def _check_on(self, rec, on):
        with self.workers_lock:
            labels = rec.labels
        if not labels_match(labels, on):
            raise Unavailable("worker %s does not match %s (its labels: %s)"
                              % (rec.worker_id, format_labels(on), format_labels(labels)))

    def start_all(self, command, path, options=None):
        """Start the job at once on every online worker that matches ``options.on`` (every online
        worker without it), in parallel, each with its own job_id.

        Answers one struct per worker, in registration order: ``worker_id``, ``hostname`` and
        ``job_id`` (started) or ``error`` (refused: nothing started), or both when the worker did
        not answer (the outcome is unknown: query job_id). Fault 3 if no online worker matches."""
        want_str(command, "command", empty=False)
        want_str(path, "path")
        options, on = split_on(options)
        options = options if options is not None else {}
        if parse_job_options(options)["job_id"] is not None:
            raise BadRequest("start_all makes a job_id for each worker: options.job_id is refused")
        records = self._matching_online(on)
        with self.workers_lock:
            hostnames = [rec.hostname for rec in records]
        placed = [(rec, str(uuid.uuid4())) for rec in records]
        results = self._call_each(placed, lambda rec, job_id: rec.client.call(
            "start", command, path, dict(options, job_id=job_id)))
        answer, remembered, started = [], [], []
        for (rec, job_id), hostname, result in zip(placed, hostnames, results):
            entry = without_none({"worker_id": rec.worker_id, "hostname": hostname})
            if isinstance(result, Unreachable):
                entry["job_id"], entry["error"] = job_id, (
                    "outcome unknown: job %s may have started on worker %s: %s"
                    % (job_id, rec.worker_id, result))
                remembered.append((job_id, rec.worker_id))
            elif isinstance(result, JobschedError):
                entry["error"] = str(result)
            else:
                entry["job_id"] = result
                remembered.append((result, rec.worker_id))
                started.append(rec)
            answer.append(entry)
        with self.workers_lock:
            for rec in started:
                rec.running += 1  # until its next heartbeat tells the truth
        self._remember(*remembered)
        log.info("start_all: %s started on %d of %d workers", _short(command), len(started),
                 len(placed))
        return answer

    def _call_each(self, items, call):
        """[call(*item), or the JobschedError it raised, for each item], called in parallel on at
        most FAN_OUT_THREADS threads; each call ends within the rpc timeout."""
        answers = queue.Queue()

        def run(indexes):
            for index in indexes:
                try:
                    result = call(*items[index])
                except JobschedError as e:
                    result = e
                except Exception:  # a thread's target: never end without an answer
                    log.exception("internal error in a call to a worker")
                    result = InternalError("internal error (see the scheduler's log)")
                answers.put((index, result))
        threads_n = min(len(items), FAN_OUT_THREADS)
        for first in range(threads_n):
            # Daemon threads, started without Thread.start()'s wait for each one to run (half
            # the cost of starting them); a hung worker must not hold up the process's exit.
            _thread.start_new_thread(run, (range(first, len(items), threads_n),))
        results = [None] * len(items)
        for _ in items:
            index, result = answers.get()
            results[index] = result
        return results

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

    def _json_options(self, request, fields=()):
        """The start options of a /start or /start_all body (``on`` included)."""
        self._fields(request, ("command",), fields + ("path", "on") + JOB_OPTIONS)
        return {k: request[k] for k in ("on",) + JOB_OPTIONS if request.get(k) is not None}

    def _json_start(self, request):
        options = self._json_options(request, ("worker_id",))
        job_id = self.start(request.get("worker_id") or "", request["command"],
                            request.get("path") or "", options)
        return 201, {"job_id": job_id}

    def _json_start_all(self, request):
        options = self._json_options(request)
        return 201, {"jobs": self.start_all(request["command"], request.get("path") or "", options)}

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
    worker (start, start_all, stop, query, output, jobs, workers, info, register, deregister,
    heartbeat),
    plus follow(). Same arguments as the RPCs; see RPCClient for addresses and errors."""

    # Scheduler and worker share start, stop, query, output and jobs.
    def start(self, *args):
        """Worker: start(command, path[, options]); scheduler: start(worker_id, command, path[, options])."""
        return self.call("start", *args)

    def start_all(self, command, path, options=None):
        """Scheduler: start on every matching online worker; one struct per worker."""
        # The scheduler answers once every worker has, each within its own rpc timeout.
        return self.call("start_all", command, path, *([options] if options is not None else []),
                         timeout=self.timeout + 60)

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
    while not stop.wait(0.5):
        pass
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
                    max_request=args.max_request, security=_security_from_args(args),
                    spawn_method=None if args.spawn_method == "auto" else args.spawn_method,
                    labels=_pairs(args.label, "--label"))
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
    if args.on:
        options["on"] = _pairs(args.on, "--on")
    return options


def _start_from_args(client, args):
    if not args.command:
        raise ConfigError("no command given: jobsched %s [options] -- COMMAND [ARG...]" % args.cmd)
    return client.start(args.worker, args.command[0], args.path, _start_options(args))


def cmd_start(args):
    if args.all:
        return _start_all(args)
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
    if args.all or args.gather or args.no_prefix:
        return _run_all(args)
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


def _pairs(items, option):
    """KEY=VALUE arguments (--label, --on) as a dict; ConfigError (exit 2) for a bad one."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("%s %s is not KEY=VALUE" % (option, _short(item)))
        pairs[key] = value
    try:
        return want_labels(pairs, option)
    except BadRequest as e:
        raise ConfigError(str(e))


# -- fan-out: start --all, run --all ------------------------------------------------------------

def _start_all_from_args(client, args):
    if args.worker:
        raise ConfigError("--all runs on every matching worker: leave out --worker")
    if not args.command:
        raise ConfigError("no command given: jobsched %s --all [options] -- COMMAND [ARG...]"
                          % args.cmd)
    return client.start_all(args.command[0], args.path, _start_options(args))


def _fan_out_names(entries):
    """How fan-out output names each worker: its hostname, or HOST/ID (the first 8 characters
    of its worker id) when another of these workers has the same hostname."""
    hosts = [entry.get("hostname") or entry["worker_id"][:8] for entry in entries]
    count = {}
    for host in hosts:
        count[host] = count.get(host, 0) + 1
    return [host if count[host] == 1 else "%s/%s" % (host, entry["worker_id"][:8])
            for host, entry in zip(hosts, entries)]


def _start_all(args):
    """start --all: JOB_ID WORKER_ID HOSTNAME per started job, a line on stderr per refusal."""
    entries = _start_all_from_args(_client_from_args(args), args)
    for name, entry in zip(_fan_out_names(entries), entries):
        if "error" in entry:
            print("jobsched: %s: %s" % (name, entry["error"]), file=sys.stderr)
        else:
            print("%s %s %s" % (entry["job_id"], entry["worker_id"], entry.get("hostname", "")))
    return 1 if any("error" in entry for entry in entries) else 0


class _FanOutJob:
    """One worker's part of `run --all`. follow() is its thread's target: it hands on the job's
    output in whole lines, then records how the job ended: ``status`` (as a shell reports it;
    1 if the worker refused, 255 if the outcome is unknown) and ``reason`` unless it succeeded."""

    def __init__(self, name, entry):
        self.name, self.job_id = name, entry.get("job_id")
        self.status = self.reason = None
        self.output = []  # --gather: the output, kept until every job has ended
        self.followed = threading.Event()  # set when follow() has returned
        self.started = "error" not in entry
        if not self.started:  # refused, or with a job_id: the worker did not answer
            self.status, self.reason = 255 if self.job_id else 1, entry["error"]
            self.followed.set()

    def follow(self, client, emit, stdout_closed):
        try:
            self._follow(client, emit)
        except BrokenPipeError:
            stdout_closed.set()
        except Exception as e:  # a thread's target: the reason goes to the user, not lost
            self.status = 255
            self.reason = "outcome unknown: %s (jobsched.py query %s)" % (e, self.job_id)
        finally:
            self.followed.set()

    def _follow(self, client, emit):
        data, offset = b"", 0
        while True:
            reply = client.output(self.job_id, offset, MAX_OUTPUT_CHUNK, 10)
            offset, data = reply["offset"], data + reply["data"]
            # Whole lines only, so that hosts never mix within a line; a line longer than a
            # chunk goes as it is.
            end = data.rfind(b"\n") + 1 if len(data) < MAX_OUTPUT_CHUNK else len(data)
            if end:
                emit(self, data[:end])
                data = data[end:]
            if reply["eof"]:
                break
        if data:
            emit(self, data)
        job = client.query(self.job_id)
        self.status = job_exit_status(job)
        if job["state"] != "succeeded":
            self.reason = job.get("error_text") or job["state"]


def _stop_fan_out(client, jobs):
    """Stop every job in parallel; returns the threads doing it."""
    def stop(job):
        try:
            client.stop(job.job_id)
        except JobschedError as e:
            print("jobsched: %s: cannot stop job %s: %s" % (job.name, job.job_id, e), file=sys.stderr)
    threads = [threading.Thread(target=stop, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    return threads


def _await_fan_out(client, jobs, stdout_closed):
    """Wait for every follower. The first Ctrl-C, or a closed stdout, stops every job; a second
    Ctrl-C exits at once."""
    stoppers = None
    while True:
        try:
            if stdout_closed.is_set() and stoppers is None:
                stoppers = _stop_fan_out(client, jobs)
            # Events, not Thread.join(): a join that Ctrl-C interrupts can mark a thread
            # that still runs as ended.
            following = [job for job in jobs if not job.followed.is_set()]
            if not following:
                break
            following[0].followed.wait(0.1)
        except KeyboardInterrupt:
            if stoppers is not None:
                raise
            print("jobsched: stopping %d jobs" % len(jobs), file=sys.stderr)
            stoppers = _stop_fan_out(client, jobs)
    if stdout_closed.is_set() and stoppers is None:
        stoppers = _stop_fan_out(client, jobs)
    for thread in stoppers or ():
        thread.join()


def _run_all(args):
    """run --all: the job on every matching worker at once, each output line as it comes (or
    grouped, --gather), one line on stderr per job that did not succeed; the highest status."""
    if not args.all:
        raise ConfigError("--gather and --no-prefix go with --all")
    client = _client_from_args(args)
    entries = _start_all_from_args(client, args)
    jobs = [_FanOutJob(name, entry) for name, entry in zip(_fan_out_names(entries), entries)]
    client.max_idle = len(jobs)  # each follower keeps its connection from one call to the next
    out, stdout_closed = sys.stdout.buffer, threading.Event()
    out_lock = threading.Lock()
    #: guards writes to out: a line is written whole, never mixed with another host's

    def emit(job, data):
        if args.gather:
            job.output.append(data if data.endswith(b"\n") else data + b"\n")
            return
        prefix = b"" if args.no_prefix else job.name.encode("utf-8", "replace") + b": "
        lines = data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")
        text = b"".join(prefix + line + b"\n" for line in lines)
        with out_lock:
            out.write(text)
            out.flush()
    for job in jobs:
        if job.started:
            threading.Thread(target=job.follow, args=(client, emit, stdout_closed),
                             name="jobsched-follow", daemon=True).start()
    _await_fan_out(client, [job for job in jobs if job.job_id], stdout_closed)
    if stdout_closed.is_set():
        return 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away
    if args.gather:
        groups = {}
        for job in jobs:
            if job.started:
                groups.setdefault((b"".join(job.output), job.status), []).append(job.name)
        for (output, status), names in sorted(groups.items(), key=lambda group: sorted(group[1])):
            out.write(("---- %s (exit %d) ----\n" % (",".join(sorted(names)), status)).encode(
                "utf-8", "replace") + output)
        out.flush()
    for job in sorted(jobs, key=lambda job: job.name):
        if job.reason:
            print("jobsched: %s: %s" % (job.name, job.reason), file=sys.stderr)
    return max(job.status for job in jobs)


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
        ("labels", lambda w: format_labels(w.get("labels", {}))),
    ], as_json, "workers")


def cmd_workers(args):
    on = _pairs(args.on, "--on")
    workers = _client_from_args(args).workers()
    _print_workers([w for w in workers if labels_match(w.get("labels", {}), on)], args.json)
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
    sub.add_argument("--spawn-method", choices=["auto", "posix_spawn", "popen"], default="auto",
                     help="how jobs are started: posix_spawn (vfork, fast on every Python; Linux "
                          "with glibc 2.26+) or popen (subprocess); auto picks posix_spawn where it "
                          "works (default: %(default)s)")
    sub.add_argument("--jobs-dir", metavar="DIR",
                     help="resolve 'path' inside DIR and refuse anything that escapes it")
    sub.add_argument("--label", metavar="KEY=VALUE", action="append", default=[],
                     help="a label jobs can ask for with --on (repeatable); host, os and arch "
                          "are built in")

    def job_options(sub):
        sub.add_argument("--worker", metavar="ID", default="", help="worker to run on (default: the one with most free slots)")
        sub.add_argument("--path", default="", help="script path passed after COMMAND (default: none)")
        sub.add_argument("--cwd", metavar="DIR", help="working directory of the job")
        sub.add_argument("--env", metavar="K=V", action="append", default=[], help="add to the job's environment (repeatable)")
        sub.add_argument("--timeout", metavar="SECONDS", type=_positive(float), help="stop the job after this long")
        sub.add_argument("--on", metavar="KEY=VALUE", action="append", default=[],
                         help="only on a worker with this label; VALUE * asks only for the key (repeatable)")
        sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    job_options(command("start", "start a job and print its id", cmd_start))
    job_options(command("run", "start a job, stream its output, exit with its exit code", cmd_run))
    for name in ("start", "run"):
        commands.choices[name].add_argument(
            "--all", action="store_true",
            help="start the job on every online worker that matches --on, each with its own id")
    sub = commands.choices["run"]
    sub.add_argument("--no-prefix", action="store_true",
                     help="with --all: print output lines without the 'HOST: ' prefix")
    sub.add_argument("--gather", action="store_true",
                     help="with --all: once all have ended, print each distinct output once, "
                          "under the hosts that printed it")
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
    sub.add_argument("--on", metavar="KEY=VALUE", action="append", default=[],
                     help="only the workers with this label; VALUE * asks only for the key (repeatable)")
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
