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
import heapq
import hmac
import http.client
import inspect
import itertools
import ipaddress
import json
import logging
import os
import pyexpat
import queue
import random
import re
import selectors
import shlex
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


_ID_ARRAY_HEAD = (b"<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n"
                  b"<value><array><data>\n")
_ID_ARRAY_TAIL = b"</data></array></value>\n</param>\n</params>\n</methodResponse>\n"
ID_ITEM = "<value><string>%s</string></value>\n"
_ID_ITEM = re.compile("<value><string>([0-9a-f-]{36})</string></value>\n")


def dumps_id_array(items):
    """dumps_response() of an array of job ids given as its items (ID_ITEM % job_id), ten times
    faster for the 10000 ids a submit may answer (canonical UUIDs: nothing to escape). items
    is taken a thousand at a time, so 100000 of them are never all in memory."""
    items, parts = iter(items), [_ID_ARRAY_HEAD]
    while True:
        chunk = "".join(itertools.islice(items, 1000))
        if not chunk:
            break
        parts.append(chunk.encode("ascii"))
    parts.append(_ID_ARRAY_TAIL)
    return _RelayedReply(b"".join(parts))


def parse_id_array(body):
    """The ids of a reply shaped as dumps_id_array() makes it; None for any other reply."""
    if not (body.startswith(_ID_ARRAY_HEAD) and body.endswith(_ID_ARRAY_TAIL)):
        return None
    items = body[len(_ID_ARRAY_HEAD):len(body) - len(_ID_ARRAY_TAIL)].decode("ascii", "replace")
    ids = _ID_ITEM.findall(items)
    return ids if len(ids) * 69 == len(items) else None  # 69 characters an item


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
    """xmlrpc.client's, with integers parsed by bounded_int and struct member names interned."""

    def end_int(self, data):
        self.append(bounded_int(data))
        self._value = 0

    def end_name(self, data):
        xmlrpc.client.Unmarshaller.end_string(self, data)
        self._stack[-1] = sys.intern(self._stack[-1])  # 100000 structs share their member names
    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)
    dispatch.update(dict.fromkeys(("i1", "i2", "i4", "i8", "int", "biginteger"), end_int))
    dispatch["name"] = end_name


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


def want_timeout(value, name="timeout"):
    seconds = want_number(value, name, minimum=0.001)
    if seconds > MAX_JOB_TIMEOUT:
        raise BadRequest("%s must be at most %d seconds" % (name, MAX_JOB_TIMEOUT))
    return seconds


def want_job_id(value, name="job_id"):
    """A job id made by a caller must be a UUID; returns its canonical (lower-case) form."""
    want_str(value, name, limit=64)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest("%s must be a UUID, not %s" % (name, _short(value)))


def want_args(args, name="args"):
    if not isinstance(args, list) or len(args) > 4096:
        raise BadRequest("%s must be a list of at most 4096 strings" % name)
    for i, arg in enumerate(args):
        want_str(arg, "%s[%d]" % (name, i), limit=65536)
    return args


def want_env(env, name="env"):
    env = want_struct(env, name)
    for key, value in env.items():
        want_str(key, name + " name", limit=256, empty=False)
        want_str(value, "%s value of %s" % (name, key), limit=65536)
        if "=" in key:
            raise BadRequest("%s name %s must not contain '='" % (name, _short(key)))
    return env


def parse_job_options(options):
    """Check a start() options struct; returns {args, env, cwd, timeout, job_id} with defaults."""
    options = want_struct(options, "options")
    unknown = sorted(set(options) - set(JOB_OPTIONS))
    if unknown:
        raise BadRequest("unknown option %s (known: %s)" % (_short(unknown[0]), ", ".join(JOB_OPTIONS)))
    timeout = options.get("timeout")
    return {
        "args": want_args(options.get("args", [])),
        "env": want_env(options.get("env", {})),
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


MAX_START_BATCH = 64          # jobs started by one start_many call
JOB_END_BACKLOG = 100000      # ended jobs a worker keeps to report while the scheduler is away
#: what a worker reports of an ended job: the scheduler keeps no more (and parses less)
JOB_END_KEYS = ("job_id", "state", "error_text", "exit_code", "signal", "pid", "started_at",
                "finished_at", "output_bytes")


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
        self._ended_jobs = queue.Queue()  # ended Jobs for the reporter thread; None stops it
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
                "start_many": self.start_many,
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
            for target, name in ((self._heartbeat_loop, "jobsched-heartbeat"),
                                 (self._report_loop, "jobsched-report")):
                thread = threading.Thread(target=target, name=name, daemon=True)
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
                failures += 1
                if failures == 1:
                    log.warning("cannot reach scheduler %s: %s (retrying)", scheduler.address, e)
                delay = min(30.0, 0.25 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            self._registered = registered
        scheduler.close()

    def _report_ended(self, job):
        if self.scheduler:
            self._ended_jobs.put(job)

    def _report_loop(self):
        """Tell the scheduler of each ended job at once (it starts a queued job in the slot),
        several per call when they end together. While the scheduler cannot be reached the ends
        wait, the oldest dropped past JOB_END_BACKLOG: a restarted scheduler learns them."""
        scheduler = RPCClient(self.scheduler, security=self.security, timeout=self.rpc_timeout)
        pending, failures, stopping = deque(), 0, False
        while not stopping or pending:
            try:
                while True:
                    job = self._ended_jobs.get(block=not pending and not stopping)
                    if job is None:
                        stopping = True
                    else:
                        pending.append(job)
            except queue.Empty:
                pass
            while len(pending) > JOB_END_BACKLOG:
                pending.popleft()
            batch = [pending[i] for i in range(min(len(pending), 200))]
            try:
                with self.jobs_lock:
                    structs = [job.to_struct() for job in batch]
                scheduler.call("job_ended", self.worker_id,
                               [{key: struct[key] for key in JOB_END_KEYS if key in struct}
                                for struct in structs])
                for _ in batch:
                    pending.popleft()
                failures = 0
            except JobschedError as e:
                failures += 1
                if failures == 1:
                    log.warning("cannot report ended jobs to scheduler %s: %s (retrying)",
                                scheduler.address, e)
                if stopping or self._closed.wait(min(5.0, 0.05 * 2 ** min(failures, 7))):
                    break
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
        self._ended_jobs.put(None)
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

    def start_many(self, items):
        """Start several jobs: items is an array of [command, path, options] (at most
        MAX_START_BATCH); answers, in order, each one's job_id or its fault as a struct
        {faultCode, faultString}."""
        if not isinstance(items, list) or len(items) > MAX_START_BATCH:
            raise BadRequest("items must be an array of at most %d [command, path, options]"
                             % MAX_START_BATCH)
        answers = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, list) or len(item) not in (2, 3):
                    raise BadRequest("items[%d] must be [command, path, options]" % i)
                answers.append(self.start(*item))
            except JobschedError as e:
                answers.append({"faultCode": e.code, "faultString": str(e)})
        return answers

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
        self._report_ended(job)
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
                 "client_tls")

    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.address = self.hostname = self.version = self.client = None
        self.slots, self.running, self.heartbeat, self.stop_grace = 1, 0, 0.0, 5.0
        self.last_seen = time.time()
        self.tls = self.deregistered = self.reported_offline = self.client_tls = False

    def online(self, now):
        if self.deregistered:
            return False
        return not self.heartbeat or now - self.last_seen <= MISSED_HEARTBEATS * self.heartbeat

    def to_struct(self, now):
        return without_none({
            "worker_id": self.worker_id, "address": self.address, "online": self.online(now),
            "slots": self.slots, "running": self.running, "last_seen": self.last_seen,
            "hostname": self.hostname, "version": self.version, "tls": self.tls,
            "heartbeat": self.heartbeat,
        })


# -- the queue: specs, entries, jobs, and the journal that keeps them --------------------------

MAX_SUBMIT_JOBS = 100000      # jobs one submit() may queue, arrays counted in full
QUEUE_HISTORY = 100000        # ended queue jobs (and ends of other jobs) the scheduler remembers
COMPACT_MIN_BYTES = MiB       # the queue's journal is never rewritten below this size
SCHEDULER_MAX_REQUEST = 32 * MiB  # a submit of 100000 one-line jobs is about 20 MB of XML


def default_scheduler_state_dir():
    return os.path.join(os.path.dirname(default_state_dir()), "scheduler")


def lock_state_dir(path, role):
    """Create path (mode 0700) and hold an exclusive flock on its ``lock`` file: ConfigError if
    another process holds it. Returns the lock file; closing it releases the lock."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        lock_file = open(os.path.join(path, "lock"), "a+")
    except OSError as e:
        raise ConfigError("cannot use state dir %s: %s" % (path, e.strerror))
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        raise ConfigError("state dir %s is in use by another %s" % (path, role))
    return lock_file


def _want_priority(value, name):
    priority = want_number(value, name, minimum=-2 ** 31, integer=True)
    if priority >= 2 ** 31:
        raise BadRequest("%s must be a 32-bit integer" % name)
    return priority


def _want_after(value, name):
    if not isinstance(value, list) or len(value) > MAX_SUBMIT_JOBS:
        raise BadRequest("%s must be an array of at most %d job ids" % (name, MAX_SUBMIT_JOBS))
    return [want_job_id(job_id, "%s[%d]" % (name, i)) for i, job_id in enumerate(value)]


def _want_array(value, name):
    count = want_number(value, name, minimum=1, integer=True)
    if count > MAX_SUBMIT_JOBS:
        raise BadRequest("%s must be at most %d" % (name, MAX_SUBMIT_JOBS))
    return count


#: the fields of a submit() spec: name -> check(value, "jobs[N].name"), answering the value kept
JOB_SPEC_FIELDS = {
    "command": lambda value, name: want_str(value, name, empty=False),
    "path": want_str,
    "args": want_args,
    "env": want_env,
    "cwd": want_str,
    "timeout": want_timeout,
    "worker_id": lambda value, name: want_str(value, name, limit=256),
    "priority": _want_priority,
    "after": _want_after,
    "array": _want_array,
    "name": want_str,
}


def expand_job_ids(keys, specs, form="%s"):
    """Yield form % job_id for each job of specs, given the keys JobQueue.submit() answered
    for them: one for a spec, one per index for an array, in order."""
    for key, spec in zip(keys, specs):
        if "array" in spec:
            template = form % (key + "%012x")
            for index in range(spec["array"]):
                yield template % index
        else:
            yield form % key


def parse_job_spec(spec, name):
    """Check one submit() spec against JOB_SPEC_FIELDS; answers it, its values made canonical
    in place (the queue keeps the request's own dicts: 100000 specs are 30 MB)."""
    spec = want_struct(spec, name)
    for key, value in spec.items():
        check = JOB_SPEC_FIELDS.get(key)
        if check is None:
            raise BadRequest("%s: unknown field %s (known: %s)"
                             % (name, _short(key), ", ".join(JOB_SPEC_FIELDS)))
        checked = check(value, "%s.%s" % (name, key))
        if checked is not value:
            spec[key] = checked
    if "command" not in spec:
        raise BadRequest("%s.command is required" % name)
    spec["command"] = sys.intern(spec["command"])  # the same command, many times over
    return spec


class QueueEntry:
    """One spec of a submit() call: one job, or an array of ``count`` jobs that differ only in
    ``JOBSCHED_ARRAY_INDEX``, whose ids are ``key`` (24 characters of a UUID) plus the index in
    the last 12 hex digits. An array's jobs become QueueJobs one at a time, as they are taken from
    the queue, so 10000 waiting jobs cost one object. Fields guarded by JobQueue.lock."""
    __slots__ = ("key", "seq", "submitted_at", "spec", "count", "next", "skip", "unmet",
                 "cancelled", "size")

    def __init__(self, key, seq, submitted_at, spec):
        self.key, self.seq, self.submitted_at = key, seq, submitted_at
        self.spec, self.count = spec, spec.get("array")  # spec: the fields given
        self.next = self.size = 0  # next index to take; bytes of its journal record
        self.unmet = 0         # dependencies not met yet; -1: all met before a restart
        self.skip = None       # indices >= next cancelled one by one
        self.cancelled = None  # the reason, once the whole entry is cancelled

    def job_id(self, index):
        return self.key if self.count is None else "%s%012x" % (self.key, index)

    def order(self, index):
        return (-self.spec.get("priority", 0), self.seq, index)

    def remaining(self):
        if self.cancelled is not None:
            return 0
        return (1 if self.count is None else self.count) - self.next - len(self.skip or ())

    def waits(self, index):
        """True if the job at index is still to be taken from the queue (not cancelled)."""
        return self.cancelled is None and index >= self.next and index not in (self.skip or ())

    def record(self):
        return dict(self.spec, id=self.key, seq=self.seq, at=self.submitted_at)

    @classmethod
    def from_record(cls, record):
        spec = dict(record)
        entry = cls(spec.pop("id"), spec.pop("seq"), spec.pop("at"), spec)
        entry.next = spec.pop("next", 0)
        entry.skip = set(spec.pop("skip", ())) or None
        entry.cancelled = spec.pop("cancelled", None)
        if spec.pop("met", None):
            entry.unmet = -1
        return entry

    def start_item(self, job_id, index):
        """[command, path, options] for the worker's start_many."""
        spec = self.spec
        options = {key: spec[key] for key in ("args", "cwd", "timeout") if spec.get(key)}
        options["job_id"] = job_id
        env = spec.get("env")
        if self.count is not None:
            env = dict(env or {}, JOBSCHED_ARRAY_INDEX=str(index))
        if env:
            options["env"] = env
        return [spec["command"], spec.get("path", ""), options]

    def extras(self):
        """What the scheduler adds to a worker's struct of one of these jobs."""
        return {"submitted_at": self.submitted_at, "name": self.spec.get("name", ""),
                "priority": self.spec.get("priority", 0)}

    def struct(self, job_id, state, error_text=""):
        struct = {"job_id": job_id, "worker_id": self.spec.get("worker_id", ""),
                  "command": self.spec["command"], "path": self.spec.get("path", ""),
                  "args": list(self.spec.get("args", ())),
                  "after": list(self.spec.get("after", ())),
                  "state": state, "done": state != "queued", "error": bool(error_text),
                  "error_text": error_text}
        struct.update(self.extras())
        return struct


#: the states a job ends in
JOB_END_STATES = ("succeeded", "failed", "stopped", "timeout", "lost", "cancelled")
#: what the scheduler keeps of an ended job, in this order
OUTCOME_KEYS = ("state", "error_text", "worker_id", "exit_code", "signal", "pid", "started_at",
                "finished_at", "output_bytes")


class QueueJob:
    """A job of a QueueEntry once taken from the queue: ``dispatching`` (a start or settle call
    is under way), ``unsettled`` (whether its worker started it is not known yet), ``running``,
    ``ended`` (``outcome``: the OUTCOME_KEYS values), or ``queued`` again after a worker
    refused it as full. Fields guarded by JobQueue.lock."""
    __slots__ = ("job_id", "entry", "index", "state", "worker_id", "outcome")

    def __init__(self, job_id, entry, index, state="dispatching", worker_id=None, outcome=None):
        self.job_id, self.entry, self.index = job_id, entry, index
        self.state, self.worker_id, self.outcome = state, worker_id, outcome

    def ended_struct(self):
        outcome = dict(zip(OUTCOME_KEYS, self.outcome))
        struct = self.entry.struct(self.job_id, outcome["state"], outcome["error_text"] or "")
        struct.update(without_none(outcome))
        struct.pop("after")
        return struct

    def record(self):
        return [self.job_id, self.entry.record(), self.index,
                "unsettled" if self.state == "dispatching" else self.state, self.worker_id,
                self.outcome]


_UNKNOWN = "?"        # JobQueue._state_of: a job the queue knows nothing of
_STARTING = "starting"  # JobQueue.cancel: the job is being handed to a worker
JOB_RECORD_BYTES = 200  # about what a QueueJob adds to its spec in a rewritten journal


class JobQueue:
    """The scheduler's queue: jobs waiting for a slot in order (priority, then submission),
    their dependencies, and the queue's jobs on workers until they end.

    With a state dir, ``<state_dir>/queue.journal`` holds it all, one JSON line per change,
    and after a crash (kill -9 included) start-up replays it:

    - submit() appends one line for all the specs of a call (an array is one record) and fsyncs
      once before it answers (group commit): an acknowledged job is never lost, and keeps its
      order, priority and dependencies;
    - before jobs are handed to a worker, their dispatch intents (job id, worker id) are appended
      and fsynced; at start-up each intent whose outcome is not in the journal is settled by
      asking that worker: query the job (running or ended), or if the worker does not have it,
      start it there again with the same job id, which the worker's idempotent start makes safe,
      so no job runs twice;
    - a cancel by stop() is fsynced before it is acknowledged; starts, ends, refusals and
      cancels that follow from dependencies are appended without fsync: what a crash loses of
      them is found again from the intents, the workers and the dependencies;
    - once the journal passes 4x the size of what is live (and COMPACT_MIN_BYTES), it is
      rewritten with the live records only (temp file, fsync, rename), so it never grows
      without bound.

    Without a state dir (``JobQueue()``, the library's ``Scheduler(state_dir=None)``) the
    queue lives in memory only. The Scheduler calls: submit, plan, started, jobs_ended, cancel,
    recheck and try_again (a worker registered or heartbeated), describe, listing, knows,
    wait_to_start, wait_any, dependencies_to_ask, close. Nothing does I/O while holding
    ``lock``."""

    def __init__(self, state_dir=None):
        self.state_dir = os.path.abspath(state_dir) if state_dir else None
        self.lock = threading.Lock()
        #: guards every field below up to the journal's, and every QueueEntry and QueueJob
        self.changed = threading.Condition(self.lock)  # notified when a job starts or ends
        self._ids = {}       # job id, or an array's key -> QueueEntry (not taken yet) or QueueJob
        self._entries = {}   # QueueEntry with jobs left to take -> None, in submission order
        self._heaps = {"": []}  # "" or a pinned worker_id -> heap of (order, item) ready to take
        self._requeued = {}  # QueueJobs back in the queue -> None
        self._waiters = {}   # job id -> [QueueEntry waiting for it to succeed]
        self._busy = {}      # worker_id -> {QueueJob} started or being started there, not ended
        self._full = set()   # workers that refused a job as full since their last reported end
        self._calling = set()  # workers with a settle call under way
        self._unsettled = {}  # worker_id -> {QueueJob: None} to ask it about: a start whose
        #                       outcome is not known, or a running job after it registered
        self._retry_at = {}  # worker_id -> time.monotonic() before which not to settle again
        self._history = deque()  # ended QueueJobs, cancelled or used-up QueueEntries, oldest first
        self._ended_elsewhere = {}  # job id -> state of an ended job not from the queue
        self._ended_order = deque()  # the ids in self._ended_elsewhere, oldest first
        self._ask = set()    # dependencies whose outcome is to be asked of the workers
        self._live_bytes = 0  # about what a rewrite of the journal would write
        self._ends = 0       # ends so far: those of jobs, and of whole entries cancelled
        self._ended_log = deque(maxlen=10000)  # the job id or entry key of the latest ends
        self.journal_lock = threading.Lock()
        #: guards self._journal (fd of queue.journal), self._journal_bytes, self._seq and
        #: self._pending (records of changes made, to append); taken before lock, never while
        #: holding it. Every change of the queue is made under it, so a rewrite sees exactly
        #: what the file says.
        self._journal, self._journal_bytes, self._seq, self._pending = None, 0, 0, {}
        self._lock_file = None
        if self.state_dir:
            self._lock_file = lock_state_dir(self.state_dir, "scheduler")
            try:
                self._load()
            except OSError as e:
                self.close()
                raise ConfigError("cannot use state dir %s: %s" % (self.state_dir, e.strerror or e))
            except BaseException:
                self.close()
                raise

    def close(self):
        with self.journal_lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def has_work(self):
        return bool(self._entries or self._requeued or self._unsettled)  # a hint: no lock

    # -- submit --------------------------------------------------------------------------------

    def submit(self, specs, dep_states):
        """Queue parsed specs (JOB_SPEC_FIELDS, kept as they are); dep_states maps dependencies
        the queue does not know to their state (None: not ended). Answers each spec's key (its
        job id, or the array's first 24 characters; see job_ids()), once they are on disk."""
        now, call_key = time.time(), str(uuid.uuid4())[:24]
        keys = [str(uuid.uuid4())[:24] if "array" in spec else "%s%012x" % (call_key, k)
                for k, spec in enumerate(specs)]
        with self.journal_lock:
            first, self._seq = self._seq, self._seq + len(specs)
            line = json.dumps({"b": {"ids": keys, "seq": first, "at": now, "specs": specs}},
                              separators=(",", ":")) + "\n"
            try:
                self._write_line(line, sync=True)
            except OSError as e:
                raise Unavailable("cannot write the queue journal in %s: %s"
                                  % (self.state_dir, e.strerror or e))
            with self.lock:
                for seq, (key, spec) in enumerate(zip(keys, specs), first):
                    entry = self._add(QueueEntry(key, seq, now, spec), len(line) // len(specs))
                    self._wait_for_dependencies(entry, dep_states)
            self._flush()
        return keys

    def _add(self, entry, size):
        entry.size = size
        self._ids[entry.key] = entry
        self._live_bytes += size
        if entry.cancelled is not None:
            self._remember(entry)
        elif entry.remaining() > 0:
            self._entries[entry] = None
        return entry

    def _wait_for_dependencies(self, entry, dep_states=None):
        """Count entry's unmet dependencies and wait for them, or cancel it if one failed
        (under lock). Unknown ones are looked up in dep_states, else asked of the workers."""
        met = entry.unmet == -1 or entry.next > 0  # known before a restart
        entry.unmet = 0
        for dep in () if met else entry.spec.get("after", ()):
            state = self._state_of(dep)
            if state is _UNKNOWN:
                state = (dep_states or {}).get(dep)
                if dep_states is None or dep not in dep_states:
                    self._ask.add(dep)
            if state == "succeeded":
                continue
            if state is not None:
                reason = "cancelled: dependency %s ended %s" % (dep, state)
                for job_id, _ in self._cancel_entry(entry, reason):
                    self._resolve(job_id, "cancelled")
                return
            entry.unmet += 1
            self._waiters.setdefault(dep, []).append(entry)
        if entry.unmet == 0:
            self._push(entry)

    def _push(self, item):
        entry = item if isinstance(item, QueueEntry) else item.entry
        spec = entry.spec
        target = spec.get("worker_id", "")
        heap = self._heaps.get(target)
        if heap is None:
            heap = self._heaps[target] = []
        index = -1 if item is entry else item.index  # an entry before its own requeued jobs
        heapq.heappush(heap, (-spec.get("priority", 0), entry.seq, index, item))

    # -- lookups (under lock) ------------------------------------------------------------------

    def _find(self, job_id):
        """(entry, index, QueueJob or None) of a job the queue knows, else None."""
        item = self._ids.get(job_id)
        if isinstance(item, QueueJob):
            return item.entry, item.index, item
        if item is not None:
            return item, 0, None
        entry = self._ids.get(job_id[:24]) if len(job_id) == 36 else None
        if entry is not None and entry.count is not None:
            try:
                index = int(job_id[24:], 16)
            except ValueError:
                return None
            if entry.next <= index < entry.count and entry.job_id(index) == job_id:
                return entry, index, None
        return None

    def _state_of(self, job_id):
        """A job's state once it has ended, None before, _UNKNOWN if the queue does not know it."""
        found = self._find(job_id)
        if found is None:
            return self._ended_elsewhere.get(job_id, _UNKNOWN)
        entry, index, job = found
        if job is None:
            return None if entry.waits(index) else "cancelled"
        return job.outcome[0] if job.state == "ended" else None

    def _position(self, entry, index):
        """1 + the number of queued jobs before entry's job at index (under lock)."""
        order, ahead = entry.order(index), 0
        for other in self._entries:
            if other is entry:
                ahead += max(0, index - other.next - sum(1 for i in other.skip or () if i < index))
            elif other.order(-1)[:2] < order[:2]:
                ahead += other.remaining()
        return 1 + ahead + sum(1 for job in self._requeued if job.entry.order(job.index) < order)

    def _reason(self, entry, online):
        for dep in entry.spec.get("after", ()):
            if self._state_of(dep) != "succeeded":
                return "waiting for %s" % dep
        worker_id = entry.spec.get("worker_id")
        if worker_id and worker_id not in online:
            return "waiting for worker %s (offline)" % worker_id
        return "waiting for a free slot"

    def _queued_struct(self, entry, index, job, online):
        job_id = entry.job_id(index)
        if job is not None and job.state != "queued":  # being handed to a worker
            struct = entry.struct(job_id, "queued")
            struct.update(position=0, reason="being started on worker %s" % job.worker_id)
            return struct
        if job is None and not entry.waits(index):
            return entry.struct(job_id, "cancelled", entry.cancelled or "cancelled")
        struct = entry.struct(job_id, "queued")
        struct.update(position=self._position(entry, index), reason=self._reason(entry, online))
        return struct

    def describe(self, job_id, online=()):
        """What the queue knows of job_id: (struct, None, None) for a job waiting, cancelled or
        ended; (None, worker_id, extras) for one on a worker (its struct is the worker's, plus
        extras); None if the queue does not know it."""
        with self.lock:
            found = self._find(job_id)
            if found is None:
                return None
            entry, index, job = found
            if job is not None and job.state == "ended":
                return job.ended_struct(), None, None
            if job is not None and job.state == "running":
                return None, job.worker_id, entry.extras()
            return self._queued_struct(entry, index, job, online), None, None

    def listing(self, online=()):
        """(structs of the waiting jobs in queue order, {job_id: extras} of the queue's jobs
        that reached a worker, structs of the ended ones, for those no worker lists)."""
        with self.lock:
            waiting = [(entry.order(i), entry, i, None) for entry in self._entries
                       for i in range(entry.next, entry.count or 1) if entry.waits(i)]
            waiting += [(job.entry.order(job.index), job.entry, job.index, job)
                        for job in self._requeued]
            waiting.sort(key=lambda item: item[0])
            structs = []
            for position, (_, entry, index, job) in enumerate(waiting, 1):
                struct = entry.struct(entry.job_id(index), "queued")
                struct.update(position=position, reason=self._reason(entry, online))
                structs.append(struct)
            extras, ended = {}, []
            for item in self._history:
                if isinstance(item, QueueJob):
                    ended.append(item.ended_struct())
                elif item.cancelled is not None:
                    ended += [item.struct(item.job_id(i), "cancelled", item.cancelled)
                              for i in range(item.count or 1)]
            for item in self._ids.values():
                if isinstance(item, QueueJob) and item.state != "queued":
                    extras[item.job_id] = item.entry.extras()
        return structs, extras, ended

    def wait_to_start(self, job_id, deadline):
        """Wait until the queue's job job_id is on a worker (answers its worker_id), has ended
        without one ("ended"), or deadline passes while it waits ("queued"); None if the queue
        does not know it."""
        with self.changed:
            while True:
                found = self._find(job_id)
                if found is None:
                    return None
                entry, index, job = found
                if job is None and not entry.waits(index):
                    return "ended"
                if job is not None and job.state in ("running", "ended"):
                    if job.state == "ended" and job.outcome[OUTCOME_KEYS.index("pid")] is None:
                        return "ended"  # never started: cancelled, or refused by its worker
                    return job.worker_id
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "queued"
                self.changed.wait(remaining)

    def wait_any(self, job_ids, deadline):
        """[(job_id, state)] of those job_ids that have ended, waiting until one has or deadline
        passes; ids unknown to the queue count as not ended. Once one ends, it waits 0.25 s more
        for others to end with it. After the first look at every id, only the jobs that ended
        since (or belong to an array cancelled since) are looked at again: waiting for 10000
        jobs costs no scan of 10000 per end."""
        by_key, ended, until = {}, {}, None
        for job_id in job_ids:
            by_key.setdefault(job_id, []).append(job_id)
            by_key.setdefault(job_id[:24], []).append(job_id)
        with self.changed:
            candidates = job_ids
            while True:
                seen = self._ends
                for job_id in candidates:
                    state = self._state_of(job_id)
                    if state is not None and state is not _UNKNOWN:
                        ended[job_id] = state
                now = time.monotonic()
                if ended and until is None:  # at once if they had ended before the call
                    until = now + (0.25 if candidates is not job_ids else 0.0)
                if now >= min(deadline, until or deadline):
                    return list(ended.items())
                self.changed.wait_for(lambda: self._ends != seen,
                                      min(deadline, until or deadline) - now)
                count = self._ends - seen
                if count > len(self._ended_log):
                    candidates = job_ids
                else:
                    keys = set(itertools.islice(reversed(self._ended_log), count))
                    candidates = [job_id for key in keys for job_id in by_key.get(key, ())]

    def knows(self, job_id):
        with self.lock:
            return self._state_of(job_id) is not _UNKNOWN

    # -- dispatch ------------------------------------------------------------------------------

    def plan(self, workers):
        """Hand waiting jobs to free slots: workers is [(worker_id, slots)] of the online ones,
        ties going to the first. Answers ({worker_id: [QueueJob]} to start, {worker_id:
        [QueueJob]} to settle), after the intents are on disk. A worker with jobs to settle
        gets nothing else until started(..., settle=True) is told how that went."""
        now = time.monotonic()
        starts, settles, free = {}, {}, {}
        with self.journal_lock:
            with self.lock:
                for worker_id, slots in workers:
                    if worker_id in self._calling:
                        continue
                    unsettled = self._unsettled.get(worker_id)
                    if unsettled:
                        if self._retry_at.get(worker_id, 0) <= now:
                            jobs = list(unsettled)[:MAX_START_BATCH]
                            for job in jobs:
                                del unsettled[job]
                                if job.state == "unsettled":
                                    job.state = "dispatching"
                            if not unsettled:
                                del self._unsettled[worker_id]
                            settles[worker_id] = jobs
                    elif worker_id not in self._full:
                        count = min(slots - len(self._busy.get(worker_id, ())), MAX_START_BATCH)
                        if count > 0:
                            free[worker_id] = count
                while free:
                    job, worker_id = self._take(free)
                    if job is None:
                        break
                    job.state, job.worker_id = "dispatching", worker_id
                    self._busy.setdefault(worker_id, set()).add(job)
                    starts.setdefault(worker_id, []).append(job)
                    free[worker_id] -= 1
                    if not free[worker_id]:
                        del free[worker_id]
                self._calling.update(settles)
            if starts:
                try:
                    self._write_line(json.dumps({"d": [[job.job_id, worker_id] for worker_id, jobs
                                                       in starts.items() for job in jobs]},
                                                separators=(",", ":")) + "\n", sync=True)
                except OSError as e:
                    log.error("cannot write dispatch intents to the queue journal: %s", e)
                    with self.lock:
                        for worker_id, jobs in starts.items():
                            for job in jobs:
                                self._requeue(job)
                    starts = {}
            self._maybe_compact()
        return starts, settles

    def _take(self, free):
        """The next job to start and its worker, given {worker_id: free slots}; (None, None)."""
        best = None
        for target in [""] + [worker_id for worker_id in free if worker_id in self._heaps]:
            heap = self._heaps[target]
            while heap and not self._ready(heap[0][3]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0][:3] < best[1][:3]):
                best = (target, heap[0])
        if best is None:
            return None, None
        target, (_, _, _, item) = best
        worker_id = target or max(free, key=free.get)
        heap = self._heaps[target]
        if isinstance(item, QueueJob):
            heapq.heappop(heap)
            del self._requeued[item]
            return item, worker_id
        entry, index = item, item.next
        while entry.skip and index in entry.skip:
            entry.skip.discard(index)
            index += 1
        entry.next = index + 1
        job = QueueJob(entry.job_id(index), entry, index)
        self._ids[job.job_id] = job
        self._live_bytes += entry.size + JOB_RECORD_BYTES
        if entry.remaining() == 0:
            heapq.heappop(heap)
            self._used_up(entry)
        return job, worker_id

    @staticmethod
    def _ready(item):
        return item.state == "queued" if isinstance(item, QueueJob) else item.remaining() > 0

    def _used_up(self, entry):
        """entry has no job left to take (under lock)."""
        del self._entries[entry]
        self._live_bytes -= entry.size
        if entry.count is not None and entry.cancelled is None:
            self._remember(entry)  # its key answers for the cancelled elements until forgotten

    def _requeue(self, job):
        self._busy[job.worker_id].discard(job)
        job.state = "queued"
        self._requeued[job] = None
        self._push(job)

    def started(self, worker_id, jobs, answers, settle=False):
        """Apply a worker's answers to a start (or settle) call, one per job: its job id (now
        running), a fault struct or JobschedError (fault 3: back in the queue and the worker
        counts as full; fault 2: the job failed with that reason; other faults: unsettled), or
        answers None: the call's outcome is unknown, so every job is unsettled."""
        with self.journal_lock:
            with self.lock:
                if settle:
                    self._calling.discard(worker_id)
                for job, answer in zip(jobs, answers or [None] * len(jobs)):
                    if job.state == "running" and settle and answer is None:  # not checked
                        self._unsettled.setdefault(worker_id, {})[job] = None
                        self._retry_at[worker_id] = time.monotonic() + 1.0
                    if job.state != "dispatching":
                        continue  # its end was reported before the answer came
                    if isinstance(answer, dict):
                        code, text = answer.get("faultCode"), str(answer.get("faultString"))
                    elif isinstance(answer, JobschedError):
                        code, text = answer.code, str(answer)
                    else:
                        code, text = None, ""
                    if isinstance(answer, str):
                        job.state = "running"
                        self._note("r", [job.job_id, worker_id])
                    elif code == UNAVAILABLE and not isinstance(answer, Unreachable):
                        self._requeue(job)
                        self._full.add(worker_id)
                        self._note("q", job.job_id)
                    elif code == BAD_REQUEST:
                        self._end(job, ("failed", text, worker_id) + (None,) * 6)
                    else:
                        job.state = "unsettled"
                        self._unsettled.setdefault(worker_id, {})[job] = None
                        self._retry_at[worker_id] = time.monotonic() + 1.0
                self.changed.notify_all()
            self._flush()

    def jobs_ended(self, worker_id, structs):
        """A worker's report of ended jobs (job structs); worker_id None: learnt by asking."""
        with self.journal_lock:
            with self.lock:
                self._full.discard(worker_id)
                for struct in structs:
                    job_id, state = struct.get("job_id"), struct.get("state")
                    if not isinstance(job_id, str) or state not in JOB_END_STATES:
                        continue
                    item = self._ids.get(job_id)
                    if isinstance(item, QueueJob):
                        if item.state == "ended" or worker_id not in (None, item.worker_id) \
                                or item.state == "queued":
                            continue
                        struct["worker_id"] = item.worker_id
                        self._end(item, tuple(struct.get(key) for key in OUTCOME_KEYS))
                    elif job_id not in self._ended_elsewhere:
                        self._ended_elsewhere[job_id] = sys.intern(state)
                        self._ended_order.append(job_id)
                        if len(self._ended_order) > QUEUE_HISTORY:
                            del self._ended_elsewhere[self._ended_order.popleft()]
                        self._ask.discard(job_id)
                        self._log_end(job_id)
                        self._resolve(job_id, state)
                self.changed.notify_all()
            self._flush()

    def _end(self, job, outcome):
        """job has ended (under lock): its slot is free; what waits on it is settled."""
        if job.state in ("dispatching", "unsettled", "running"):
            self._busy[job.worker_id].discard(job)
            self._unsettled.get(job.worker_id, {}).pop(job, None)
        elif job.state == "queued":
            self._requeued.pop(job, None)
        job.state, job.outcome = "ended", outcome
        self._note("e", [job.job_id] + list(outcome))
        self._log_end(job.job_id)
        self._remember(job)
        self._resolve(job.job_id, outcome[0])

    def _resolve(self, job_id, state):
        """Settle what waits on job_id, which ended in state: a job waiting for it starts once it
        has nothing else to wait for, or, if it did not succeed, is cancelled, and so on down
        the chain (under lock)."""
        ended = [(job_id, state)]
        while ended:
            dep, state = ended.pop()
            for entry in self._waiters.pop(dep, ()):
                if entry.cancelled is not None:
                    continue
                if state == "succeeded":
                    entry.unmet -= 1
                    if entry.unmet == 0:
                        self._note("m", entry.key)
                        self._push(entry)
                    continue
                reason = "cancelled: dependency %s ended %s" % (dep, state)
                ended += self._cancel_entry(entry, reason)

    def _cancel_entry(self, entry, reason):
        """Cancel every job entry has left (under lock; it has not started any); answers
        [(job id, "cancelled")] of those that something may wait for."""
        entry.cancelled = reason
        self._note("x", [entry.key, reason])
        if entry in self._entries:
            del self._entries[entry]  # its size stays live: it is history now
        self._remember(entry)
        self._log_end(entry.key)
        if entry.count is None:
            return [(entry.key, "cancelled")]
        return [(job_id, "cancelled") for job_id in list(self._waiters) if job_id[:24] == entry.key]

    def _remember(self, item):
        """Keep an ended job or a spent entry in the bounded history (under lock)."""
        self._history.append(item)
        while len(self._history) > QUEUE_HISTORY:
            old = self._history.popleft()
            key = old.job_id if isinstance(old, QueueJob) else old.key
            if self._ids.get(key) is old:
                del self._ids[key]
            if isinstance(old, QueueJob):
                self._live_bytes -= old.entry.size + JOB_RECORD_BYTES
            elif old.cancelled is not None:
                self._live_bytes -= old.size

    def cancel(self, job_id):
        """stop() of a job of the queue: True once cancelled (on disk), or if it had ended;
        the worker_id of a running one; _STARTING while it is handed to a worker; None if the
        queue does not know it."""
        with self.journal_lock:
            with self.lock:
                found = self._find(job_id)
                if found is None:
                    return None
                entry, index, job = found
                if job is not None and job.state == "running":
                    return job.worker_id
                if job is not None and job.state != "queued":
                    return True if job.state == "ended" else _STARTING
                if job is None and not entry.waits(index):
                    return True
                if job is not None:  # back in the queue after a refusal
                    self._end(job, ("cancelled", "cancelled") + (None,) * 7)
                elif entry.count is None:
                    self._cancel_entry(entry, "cancelled")
                    self._resolve(job_id, "cancelled")
                else:
                    self._cancel_element(entry, index)
                    self._note("x", [job_id, "cancelled"])
                    self._resolve(job_id, "cancelled")
                self.changed.notify_all()
            self._flush(sync=True)
        return True

    def recheck(self, worker_id):
        """worker_id registered (it, or the scheduler, restarted): ask it about the queue's
        jobs it runs before starting more there; one it no longer knows is lost."""
        with self.lock:
            for job in self._busy.get(worker_id, ()):
                if job.state == "running":
                    self._unsettled.setdefault(worker_id, {})[job] = None
            self._retry_at.pop(worker_id, None)

    def try_again(self, worker_id):
        """Offer worker_id jobs again although it refused one as full (its heartbeat came:
        an end report may have been lost)."""
        with self.lock:
            self._full.discard(worker_id)

    def _cancel_element(self, entry, index):
        """Cancel one job of an array before it is taken (under lock). It becomes an ended
        QueueJob, which answers for it once the array is used up."""
        job = QueueJob(entry.job_id(index), entry, index, "ended", None,
                       ("cancelled", "cancelled") + (None,) * 7)
        self._ids[job.job_id] = job
        self._live_bytes += entry.size + JOB_RECORD_BYTES
        self._remember(job)
        entry.skip = entry.skip or set()
        entry.skip.add(index)
        if entry.remaining() == 0:
            self._used_up(entry)
        self._log_end(job.job_id)

    def _log_end(self, key):
        self._ends += 1
        self._ended_log.append(key)

    def dependencies_to_ask(self):
        with self.lock:
            return sorted(self._ask)

    # -- the journal ---------------------------------------------------------------------------

    def _path(self):
        return os.path.join(self.state_dir, "queue.journal")

    def _note(self, kind, item):
        """Remember a change to append at the next _flush() (under journal_lock and lock).
        Kinds: s submitted specs, d dispatch intents, r running, q back in the queue, e ended,
        x cancelled, m dependencies met; j (rewrites only) a job and its state."""
        self._pending.setdefault(kind, []).append(item)

    def _flush(self, sync=False):
        """Append the changes noted, a line per kind (under journal_lock). If sync, they are on
        disk or this raises Unavailable; otherwise a failure is logged: what was not fsynced is
        found again after a crash from the intents, the workers and the dependencies."""
        pending, self._pending = self._pending, {}
        if not pending:
            return self._maybe_compact()
        try:
            self._write_line("".join(json.dumps({kind: items}, separators=(",", ":")) + "\n"
                                     for kind, items in pending.items()), sync)
        except OSError as e:
            if sync:
                raise Unavailable("cannot write the queue journal in %s: %s"
                                  % (self.state_dir, e.strerror or e))
            log.error("cannot append to the queue journal: %s", e)
        self._maybe_compact()

    def _write_line(self, text, sync):
        if self._journal is None:
            return
        data = text.encode("utf-8")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._journal, view):]
            if sync:
                os.fsync(self._journal)
        except OSError:
            os.ftruncate(self._journal, self._journal_bytes)  # no half line before the next
            raise
        self._journal_bytes += len(data)

    def _maybe_compact(self):
        """Rewrite the journal if it is past 4x what is live (under journal_lock, once memory
        holds every change the journal does)."""
        with self.lock:
            live = self._live_bytes
        if self._journal is not None and self._journal_bytes > 4 * max(live, COMPACT_MIN_BYTES):
            self._compact()

    def _compact(self):
        """Rewrite the journal with what is live (under journal_lock): temp file, fsync, rename."""
        # Every change waits for journal_lock: what is read here stays as it is meanwhile.
        with self.lock:
            entries = list(self._entries) + [item for item in self._history if isinstance(
                item, QueueEntry) and item.cancelled is not None]
            jobs = [item for item in self._ids.values() if isinstance(item, QueueJob)]
        lines = []
        for start in range(0, len(entries), 1000):
            specs = []
            for entry in entries[start:start + 1000]:
                record = entry.record()
                record.update(without_none({
                    "next": entry.next or None, "skip": sorted(entry.skip or ()) or None,
                    "cancelled": entry.cancelled,
                    "met": 1 if entry.unmet == 0 and entry.spec.get("after") else None}))
                specs.append(record)
            lines.append(json.dumps({"s": specs}, separators=(",", ":")) + "\n")
        for start in range(0, len(jobs), 1000):
            lines.append(json.dumps({"j": [job.record() for job in jobs[start:start + 1000]]},
                                    separators=(",", ":")) + "\n")
        data = "".join(lines).encode("utf-8")
        path = self._path()
        try:
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(path + ".tmp", path)
            directory = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            log.error("cannot rewrite the queue journal: %s (it keeps growing)", e)
            return
        os.close(self._journal)
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._journal_bytes = len(data)
        with self.lock:
            self._live_bytes = len(data)
        log.debug("queue journal rewritten: %d bytes, %d waiting entries, %d jobs",
                 len(data), len(entries), len(jobs))

    def _load(self):
        """Replay the journal; rewrite it if it is 4x what is live."""
        path, good = self._path(), 0
        try:
            with open(path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # cut short by a crash: never acknowledged
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except ValueError:
                        log.warning("ignoring an unreadable line of %s", path)
                        continue
                    try:
                        self._replay(record, len(line))
                    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                        log.warning("ignoring a bad record of %s: %s", path, e)
                    good += len(line)
        except FileNotFoundError:
            pass
        self._journal = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.ftruncate(self._journal, good)  # a line cut short is no line: the next starts clean
        self._journal_bytes = good
        with self.lock:
            for item in list(self._ids.values()):
                if not isinstance(item, QueueJob):
                    continue
                self._live_bytes += item.entry.size + JOB_RECORD_BYTES
                if item.state in ("dispatching", "unsettled", "running"):
                    self._busy.setdefault(item.worker_id, set()).add(item)
                if item.state in ("dispatching", "unsettled"):
                    item.state = "unsettled"
                    self._unsettled.setdefault(item.worker_id, {})[item] = None
                elif item.state == "queued":
                    self._requeued[item] = None
                    self._push(item)
            for entry in list(self._entries):
                self._wait_for_dependencies(entry)
            live = self._live_bytes
        with self.journal_lock:
            self._pending = {}  # what follows from the journal is found again at each start
            if self._journal_bytes > 4 * max(live, COMPACT_MIN_BYTES):
                self._compact()
        with self.lock:
            waiting = sum(entry.remaining() for entry in self._entries) + len(self._requeued)
            unsettled = sum(map(len, self._unsettled.values()))
        if waiting or unsettled:
            log.info("queue: %d jobs waiting, %d to settle with their workers", waiting, unsettled)

    def _replay(self, record, size):
        """Apply one journal line to memory (at start-up, before anything else runs)."""
        batch = record.get("b")
        entries = [QueueEntry(key, seq, batch["at"], spec) for seq, (key, spec) in enumerate(
            zip(batch["ids"], batch["specs"]), batch["seq"])] if batch else []
        entries += [QueueEntry.from_record(spec) for spec in record.get("s", ())]
        for entry in entries:
            self._seq = max(self._seq, entry.seq + 1)
            if entry.key not in self._ids:
                self._add(entry, size // len(entries))
        spent = {}
        for job_id, spec, index, state, worker_id, outcome in record.get("j", ()):
            entry = self._ids.get(spec["id"])
            if not isinstance(entry, QueueEntry) or entry.seq != spec["seq"]:
                entry = spent.get(spec["id"]) or QueueEntry.from_record(spec)
                spent[spec["id"]] = entry
            job = QueueJob(job_id, entry, index, state, worker_id,
                           tuple(outcome) if outcome else None)
            self._ids[job_id] = job
            if state == "ended":
                self._remember(job)
        for job_id, worker_id in record.get("d", ()):
            self._replay_state(job_id, "unsettled", worker_id)
        for job_id, worker_id in record.get("r", ()):
            self._replay_state(job_id, "running", worker_id)
        for job_id in record.get("q", ()):
            self._replay_state(job_id, "queued")
        for end in record.get("e", ()):
            job = self._replay_state(end[0], "ended")
            if job is not None:
                job.outcome = tuple(end[1:])
                self._remember(job)
        for key in record.get("m", ()):
            entry = self._ids.get(key)
            if isinstance(entry, QueueEntry) and entry.cancelled is None:
                entry.unmet = -1
        for key, reason in record.get("x", ()):
            item = self._ids.get(key)
            if isinstance(item, QueueEntry) and (len(key) == 24 or item.count is None):
                if item.cancelled is None:
                    self._cancel_entry(item, reason)
                continue
            found = self._find(key)
            if found is not None and found[2] is None and found[0].waits(found[1]):
                self._cancel_element(found[0], found[1])

    def _replay_state(self, job_id, state, worker_id=None):
        """Move a job to state, making it from its entry if need be; never back from ended."""
        found = self._find(job_id)
        if found is None:
            return None
        entry, index, job = found
        if job is None:
            job = QueueJob(job_id, entry, index)
            self._ids[job_id] = job
            entry.next = max(entry.next, index + 1)
            if entry.skip:
                entry.skip = {i for i in entry.skip if i >= entry.next} or None
            if entry in self._entries and entry.remaining() == 0:
                self._used_up(entry)
        if job.state == "ended":
            return None
        job.state = state
        if worker_id is not None:
            job.worker_id = worker_id
        return job


class Scheduler(_Role):
    """The cluster's front door: a registry of workers, a router for their jobs, and a queue.

    Library use: ``Scheduler(listen="127.0.0.1:0", state_dir=DIR)``, then start_serving() (or
    ``with``), ``address``, close(). RPCs: register, deregister, heartbeat, job_ended, start,
    submit, stop, query, output, wait, jobs, workers, info; JSON routes POST /start /submit /stop
    /query, GET /workers /jobs. The queue (see JobQueue) is kept in ``state_dir``; without one,
    in memory only. Workers register again after a restart; jobs it does not know are asked of
    the online workers in parallel."""

    def __init__(self, listen=DEFAULT_SCHEDULER, rpc_timeout=10.0,
                 max_request=SCHEDULER_MAX_REQUEST, read_timeout=30.0, token=None, tls_cert=None,
                 tls_key=None, tls_ca=None, insecure=False, security=None, state_dir=None):
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
        self._dispatch_wanted = threading.Event()  # wakes the dispatcher thread
        #: held by the one thread asking the workers how lost dependencies ended
        self._asking = threading.Lock()
        self.server = RPCServer(listen, self.security, {
            "register": self.register, "deregister": self.deregister,
            "heartbeat": self.heartbeat, "start": self.start, "stop": self.stop,
            "query": functools.partial(self.query, relay=True),
            "output": functools.partial(self.output, relay=True),
            "jobs": self.jobs,
            "workers": self.workers, "info": self.info,
            "submit": lambda jobs: dumps_id_array(expand_job_ids(*self._submit(jobs), ID_ITEM)),
            "wait": self.wait, "job_ended": self.job_ended,
        }, json_routes={
            ("POST", "/start"): self._json_start, ("POST", "/stop"): self._json_stop,
            ("POST", "/query"): self._json_query, ("POST", "/submit"): self._json_submit,
            ("GET", "/workers"): lambda request: (200, {"workers": self.workers()}),
            ("GET", "/jobs"): lambda request: (200, {"jobs": self.jobs()}),
        }, max_request=max_request, read_timeout=read_timeout)
        try:
            self.queue = JobQueue(state_dir)
        except BaseException:
            self.server.server_close()
            raise
        self._threads = []

    def start_serving(self):
        self._threads.append(self.server.serve_in_thread())
        watcher = threading.Thread(target=self._watch_workers, name="jobsched-watch", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        dispatcher = threading.Thread(target=self._dispatch_loop, name="jobsched-dispatch",
                                      daemon=True)
        dispatcher.start()
        self._threads.append(dispatcher)
        log.info("scheduler listening on %s (queue %s)", self.address,
                 "in " + self.queue.state_dir if self.queue.state_dir else "in memory only")
        return self

    def close(self):
        if self._closed.is_set():
            return
        self._closed.set()
        self._dispatch_wanted.set()
        self.server.close()
        for thread in self._threads:
            thread.join(timeout=3.0)
        with self.workers_lock:
            clients = [rec.client for rec in self._workers.values() if rec.client]
        for client in clients:
            client.close()
        self.queue.close()
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
        rec.last_seen = time.time()
        rec.deregistered = False

    def register(self, address, info=None):
        """Add a worker at address (HOST:PORT); returns its worker_id (``info.worker_id`` if given)."""
        want_str(address, "address", limit=512, empty=False)
        parse_address(address)
        info = want_struct(info if info is not None else {}, "info")
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
        self.queue.recheck(worker_id)
        self._dispatch_wanted.set()
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
        with self.workers_lock:
            rec = self._workers.get(worker_id)
            if rec is None or rec.deregistered:
                raise NotFound("unknown worker %s" % _short(worker_id))
            came_back = rec.reported_offline
            self._update(rec, info)
            rec.reported_offline = False
        if came_back:
            log.info("worker %s back online", worker_id)
        if self.queue.has_work():
            self.queue.try_again(worker_id)
            self._dispatch_wanted.set()
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

    def _pick_worker(self, tried):
        """The untried online worker with the most free slots, ties taken round-robin.

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
                        and rec.online(now):
                    best, best_free = rec, free
            if best is not None:
                best.running += 1  # until its next heartbeat tells the truth
            return best

    def start(self, worker_id, command, path, options=None):
        """Start a job on worker_id, or on the worker with the most free slots if it is ""."""
        want_str(worker_id, "worker_id", limit=256)
        want_str(command, "command", empty=False)
        want_str(path, "path")
        if options is not None:
            parse_job_options(options)  # refuse bad input here, not as a failure to forward it
        params = (command, path) + ((options,) if options is not None else ())
        if worker_id:
            rec = self._online_worker(self._worker(worker_id))
            job_id = rec.client.call("start", *params)
            with self.workers_lock:
                rec.running += 1
        else:
            tried = set()
            while True:
                rec = self._pick_worker(tried)
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
        """stop(job_id) or stop(worker_id, job_id): true once the job has ended (a queued job:
        once it is cancelled)."""
        job_id = ids[-1] if ids and isinstance(ids[-1], str) else ""
        deadline = time.monotonic() + self.rpc_timeout
        while job_id:
            where = self.queue.cancel(job_id)
            if where is None:
                break  # not a job of the queue
            if where is True:
                return True
            if where is not _STARTING:
                ids = (where, job_id)
                break
            if self.queue.wait_to_start(job_id, min(deadline, time.monotonic() + 0.1)) == "queued" \
                    and time.monotonic() >= deadline:
                raise Unavailable("job %s is being started on a worker that does not answer"
                                  % job_id)
        rec, job_id = self._route(ids)
        return rec.client.call("stop", job_id, timeout=self.rpc_timeout + rec.stop_grace + 1)

    def query(self, *ids, relay=False):
        """query(job_id) or query(worker_id, job_id): the job's struct (the RPC relays a
        worker's reply unparsed; a queue job's gains submitted_at, name and priority)."""
        queued = ids and isinstance(ids[-1], str) and self.queue.knows(ids[-1])
        found = self.queue.describe(ids[-1], self._online_ids()) if queued else None
        if found is None:
            rec, job_id = self._route(ids)
            return rec.client.call("query", job_id, relay=relay)
        struct, worker_id, extras = found
        if struct is None:
            struct = self._online_worker(self._worker(worker_id)).client.call("query", ids[-1])
            struct.update(extras)
        return struct

    def _online_ids(self):
        now = time.time()
        with self.workers_lock:
            return {rec.worker_id for rec in self._workers.values() if rec.online(now)}

    def output(self, job_id, offset, max_bytes, wait_seconds=0, *, relay=False):
        """The job's output from offset, as the worker's output() answers it.

        The RPC passes relay=True: the worker's reply (up to a MiB of base64) goes on unparsed."""
        wait = min(want_number(wait_seconds, "wait_seconds"), MAX_WAIT_SECONDS)
        want_number(offset, "offset", integer=True)
        want_number(max_bytes, "max_bytes", integer=True)
        deadline = time.monotonic() + wait
        where = self.queue.wait_to_start(job_id, deadline) if isinstance(job_id, str) else None
        if where in ("queued", "ended"):  # no output: while queued, or never started
            return {"data": xmlrpc.client.Binary(b""), "offset": offset, "eof": where == "ended"}
        if where is not None:
            rec = self._online_worker(self._worker(where))
        else:
            rec, job_id = self._route((job_id,))
        wait = max(0.0, deadline - time.monotonic())
        return rec.client.call("output", job_id, offset, max_bytes, wait,
                               timeout=self.rpc_timeout + wait, relay=relay)

    def jobs(self):
        """The queue's waiting jobs in queue order, then every job of every online worker
        (asked in parallel), then the queue's ended jobs that no worker listed."""
        waiting, extras, ended = self.queue.listing(self._online_ids())
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
        listed = set()
        for job in jobs:
            listed.add(job["job_id"])
            if job["job_id"] in extras:
                job.update(extras[job["job_id"]])
        return waiting + jobs + [job for job in ended if job["job_id"] not in listed]

    # -- the queue -----------------------------------------------------------------------------

    def submit(self, jobs):
        """Queue jobs: ``jobs`` is an array of specs (see JOB_SPEC_FIELDS); answers their job
        ids in order, once they are on disk. All or nothing: a bad spec is fault 2 naming it,
        an unknown job in ``after`` or an unknown ``worker_id`` fault 1."""
        return list(expand_job_ids(*self._submit(jobs)))

    def _submit(self, jobs):
        """submit(), answering JobQueue.submit()'s keys and the specs they stand for."""
        if not isinstance(jobs, list):
            raise BadRequest("jobs must be an array of job specs")
        specs = [parse_job_spec(spec, "jobs[%d]" % i) for i, spec in enumerate(jobs)]
        if sum(spec.get("array", 1) for spec in specs) > MAX_SUBMIT_JOBS:
            raise BadRequest("at most %d jobs per submit, arrays counted in full" % MAX_SUBMIT_JOBS)
        with self.workers_lock:
            known_workers = set(self._workers)
        dep_states = {}
        for i, spec in enumerate(specs):
            if spec.get("worker_id") and spec["worker_id"] not in known_workers:
                raise NotFound("jobs[%d].worker_id: worker not found: %s"
                               % (i, _short(spec["worker_id"])))
            for dep in spec.get("after", ()):
                if dep in dep_states or self.queue.knows(dep):
                    continue
                try:  # a job started without the queue: its worker knows how it is doing
                    rec, _ = self._route((dep,))
                    struct = rec.client.call("query", dep)
                except JobschedError as e:
                    message = "unknown job %s" % dep if isinstance(e, NotFound) else str(e)
                    raise type(e)("jobs[%d].after: %s" % (i, message))
                dep_states[dep] = struct["state"] if struct.get("done") else None
        keys = self.queue.submit(specs, dep_states)
        self._dispatch_wanted.set()
        return keys, specs

    def job_ended(self, worker_id, jobs):
        """A worker's report of jobs that ended (their structs, or JOB_END_KEYS of them), sent
        at once: the scheduler starts queued jobs in the freed slots and settles what waits on
        them; true."""
        want_str(worker_id, "worker_id", limit=256)
        if not isinstance(jobs, list):
            raise BadRequest("jobs must be an array of job structs")
        self.queue.jobs_ended(worker_id, [want_struct(job, "jobs[%d]" % i)
                                          for i, job in enumerate(jobs)])
        self._dispatch_wanted.set()
        return True

    def wait(self, job_ids, wait_seconds=0):
        """Wait until one of job_ids has ended or wait_seconds (at most 60) pass; answers
        [{job_id, state}] of those that have ended ([] if none has yet)."""
        if not isinstance(job_ids, list) or len(job_ids) > MAX_SUBMIT_JOBS:
            raise BadRequest("job_ids must be an array of at most %d job ids" % MAX_SUBMIT_JOBS)
        for i, job_id in enumerate(job_ids):
            want_str(job_id, "job_ids[%d]" % i, limit=256, empty=False)
        wait = min(want_number(wait_seconds, "wait_seconds"), MAX_WAIT_SECONDS)
        deadline = time.monotonic() + wait
        ended = []
        for job_id in job_ids:
            if not self.queue.knows(job_id):  # started without the queue: ask its worker
                struct = self.query(job_id)
                if struct["done"]:
                    ended.append({"job_id": job_id, "state": struct["state"]})
        if ended:
            return ended
        return [{"job_id": job_id, "state": state}
                for job_id, state in self.queue.wait_any(job_ids, deadline)]

    def _dispatch_loop(self):
        """Hand queued jobs to free slots whenever one may have freed: woken by submit,
        job_ended, register, heartbeat and each finished call, else once a second. Each call
        to a worker runs in a thread of its own (at most one per free slot), so a slow worker
        holds up no other and a worker starts several batches at once."""
        turn = 0
        while True:
            self._dispatch_wanted.wait(1.0)
            self._dispatch_wanted.clear()
            if self._closed.is_set():
                return
            try:
                now, turn = time.time(), turn + 1
                with self.workers_lock:
                    workers = [(rec.worker_id, rec.slots, rec.client)
                               for rec in self._workers.values()
                               if rec.online(now) and rec.client is not None]
                first = turn % len(workers) if workers else 0
                workers = workers[first:] + workers[:first]  # ties go round
                starts, settles = self.queue.plan([worker[:2] for worker in workers])
                for worker_id, _, client in workers:
                    for calls, settle in ((starts, False), (settles, True)):
                        if worker_id in calls:
                            _thread.start_new_thread(self._call_worker, (
                                worker_id, client, calls[worker_id], settle))
                if self.queue.dependencies_to_ask() and self._asking.acquire(blocking=False):
                    _thread.start_new_thread(self._ask_dependencies, ())
            except Exception:
                log.exception("internal error in the dispatcher")

    def _call_worker(self, worker_id, client, jobs, settle):
        """Start jobs on a worker (settle: first ask it about each), then tell the queue."""
        answers = None
        try:
            answers = [None] * len(jobs)
            to_start = list(range(len(jobs)))
            if settle:
                to_start, ended = [], []
                for i, job in enumerate(jobs):
                    try:
                        struct = client.call("query", job.job_id)
                    except NotFound:
                        if job.state == "running":  # its worker lost it (a new state dir?)
                            ended.append({"job_id": job.job_id, "state": "lost", "error_text":
                                          "lost: worker %s no longer knows the job" % worker_id})
                        else:
                            to_start.append(i)  # never started there: start it, same id
                        continue
                    except Unavailable:
                        continue  # still unknown
                    answers[i] = job.job_id
                    if struct.get("done"):
                        ended.append(struct)
                self.queue.jobs_ended(worker_id, ended)
            if to_start:
                items = [jobs[i].entry.start_item(jobs[i].job_id, jobs[i].index) for i in to_start]
                try:
                    replies = client.call("start_many", items)
                except Unreachable:
                    replies = [None] * len(items)  # it may have started them: settle later
                except JobschedError as e:
                    replies = [e] * len(items)
                for i, reply in zip(to_start, replies):
                    answers[i] = reply
        except Exception:
            log.exception("internal error while starting jobs on worker %s", worker_id)
        finally:
            self.queue.started(worker_id, jobs, answers, settle)
            self._dispatch_wanted.set()

    def _ask_dependencies(self):
        """Ask the workers how the dependencies the queue lost track of (a restart) ended."""
        try:
            for job_id in self.queue.dependencies_to_ask():
                try:
                    rec, _ = self._route((job_id,))
                    struct = rec.client.call("query", job_id)
                except JobschedError:
                    continue  # its worker is not back yet: asked again later
                if struct.get("done"):
                    self.queue.jobs_ended(None, [struct])
        except Exception:
            log.exception("internal error while asking about dependencies")
        finally:
            self._closed.wait(2.0)  # at most one round every two seconds
            self._asking.release()

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

    def _json_submit(self, request):
        self._fields(request, ("jobs",))
        return 201, {"job_ids": self.submit(request["jobs"])}

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
    worker (start, submit, stop, query, output, wait, jobs, workers, info, register, deregister,
    heartbeat), plus follow(). Same arguments as the RPCs; see RPCClient for addresses and
    errors."""

    # Scheduler and worker share start, stop, query, output and jobs.
    def start(self, *args):
        """Worker: start(command, path[, options]); scheduler: start(worker_id, command, path[, options])."""
        return self.call("start", *args)

    def submit(self, jobs):
        """Scheduler: queue job specs; their job ids, in order."""
        # The scheduler parses about 20000 specs a second, and more on a fast machine.
        reply = self.call("submit", jobs, relay=True, timeout=self.timeout + len(jobs) / 5000.0)
        job_ids = parse_id_array(reply)
        if job_ids is None:  # a fault, or another server's way of writing the array
            try:
                job_ids = xmlrpc.client.loads(reply)[0][0]
            except xmlrpc.client.Fault as fault:
                raise error_from_fault(fault) from None
            except (pyexpat.ExpatError, xmlrpc.client.ResponseError, IndexError):
                raise Unreachable("%s sent a reply that is not XML-RPC" % self.address) from None
        return job_ids

    def wait(self, job_ids, wait_seconds=30):
        """Scheduler: [{job_id, state}] of those job_ids that have ended, once one has (or
        after wait_seconds)."""
        return self.call("wait", list(job_ids), wait_seconds, timeout=self.timeout + wait_seconds)

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
                          security=_security_from_args(args), state_dir=args.state_dir)
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


def _queue_spec(args, words):
    """The submit() spec of one command line (words), with the job options given."""
    spec = _start_options(args)
    spec.update(command=words[0], args=words[1:])
    spec.update(path=args.path, worker_id=args.worker)
    for key in ("name", "priority", "after", "array"):  # run has none of these
        spec[key] = getattr(args, key, None)
    return {key: value for key, value in spec.items() if value}


def _submit_from_args(client, args):
    """Queue the job of a run command line; says once on stderr if it has to wait."""
    if not args.command:
        raise ConfigError("no command given: jobsched %s [options] -- COMMAND [ARG...]" % args.cmd)
    (job_id,) = client.submit([_queue_spec(args, args.command)])
    job = client.query(job_id)
    if job["state"] == "queued" and job.get("position", 0) >= 1:
        print("jobsched: job %s queued (position %d: %s)"
              % (job_id, job["position"], job["reason"]), file=sys.stderr, flush=True)
    return job_id


def _read_job_lines(path):
    """The command lines of a --file: one job a line, split like a shell would, blank lines
    and # comments skipped."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read %s: %s" % (path, getattr(e, "strerror", None) or e))
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError("%s, line %d: %s" % (path, number, e))
        if words:
            jobs.append(words)
    if not jobs:
        raise ConfigError("%s holds no job" % path)
    return jobs


def cmd_submit(args):
    if args.file and args.command:
        raise ConfigError("give either --file FILE or -- COMMAND [ARG...], not both")
    if not args.file and not args.command:
        raise ConfigError("no command given: jobsched submit [options] -- COMMAND [ARG...], "
                          "or --file FILE")
    lines = _read_job_lines(args.file) if args.file else [args.command]
    specs = [_queue_spec(args, words) for words in lines]
    client = _client_from_args(args)
    per_call = max(1, MAX_SUBMIT_JOBS // (args.array or 1))
    for start in range(0, len(specs), per_call):
        job_ids = client.submit(specs[start:start + per_call])
        sys.stdout.write("".join(job_id + "\n" for job_id in job_ids))
    sys.stdout.flush()
    return 0


def cmd_wait(args):
    client = _client_from_args(args)
    pending = dict.fromkeys(args.job_id or [job["job_id"] for job in client.jobs()
                                            if not job["done"]])
    status = 0
    while pending:  # ask about 10000 at a time: each call carries its ids
        for ended in client.wait(list(itertools.islice(pending, 10000)), 30):
            if ended["job_id"] in pending:
                del pending[ended["job_id"]]
                print("%s %s" % (ended["job_id"], ended["state"]), flush=True)
                status = status or int(ended["state"] != "succeeded")
    return status


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
    job_id = _submit_from_args(client, args)
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
    job = client.query(job_id)
    if job["state"] in ("failed", "cancelled") and "exit_code" not in job and "signal" not in job:
        print("jobsched: error: %s" % job["error_text"], file=sys.stderr)  # it never started
    return job_exit_status(job)


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
    jobs = _client_from_args(args).jobs()
    _print_table([job for job in jobs if not args.state or job["state"] == args.state], [
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

    def max_request(sub, default):
        sub.add_argument("--max-request", metavar="BYTES", type=_positive(int), default=default,
                         help="largest request body accepted (default: %(default)s)")

    sub = command("scheduler", "run the scheduler", cmd_scheduler, (security, server))
    sub.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_SCHEDULER, help="(default: %(default)s)")
    sub.add_argument("--state-dir", metavar="DIR", default=default_scheduler_state_dir(),
                     help="the queue's journal, locked by one scheduler (default: %(default)s)")
    max_request(sub, SCHEDULER_MAX_REQUEST)

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
    max_request(sub, MiB)

    def job_options(sub):
        sub.add_argument("--worker", metavar="ID", default="", help="worker to run on (default: the one with most free slots)")
        sub.add_argument("--path", default="", help="script path passed after COMMAND (default: none)")
        sub.add_argument("--cwd", metavar="DIR", help="working directory of the job")
        sub.add_argument("--env", metavar="K=V", action="append", default=[], help="add to the job's environment (repeatable)")
        sub.add_argument("--timeout", metavar="SECONDS", type=_positive(float), help="stop the job after this long")
        sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    job_options(command("start", "start a job and print its id", cmd_start))
    job_options(command("run", "queue a job, stream its output, exit with its exit code", cmd_run))
    sub = command("submit", "queue jobs and print their ids, one a line", cmd_submit)
    sub.add_argument("--name", help="free text for people")
    sub.add_argument("--priority", type=int, default=0,
                     help="higher starts first, equal ones in submission order "
                          "(default: %(default)s)")
    sub.add_argument("--after", metavar="JOB_ID", action="append", default=[],
                     help="start only once this job has succeeded (repeatable)")
    sub.add_argument("--array", metavar="N", type=_positive(int),
                     help="N jobs, each with JOBSCHED_ARRAY_INDEX=0..N-1 in its environment")
    sub.add_argument("--file", metavar="FILE",
                     help="one job per line of FILE ('-': stdin), split like a shell command line; "
                          "blank lines and # comments skipped")
    job_options(sub)
    sub = command("wait", "wait until jobs have ended, printing 'JOB_ID STATE' as each does; "
                  "exit 0 if all succeeded", cmd_wait)
    sub.add_argument("job_id", nargs="*", help="(default: every queued and running job)")
    sub = command("stop", "stop a job (TERM, then KILL after the grace period)", cmd_stop)
    sub.add_argument("job_id")
    sub = command("query", "show a job's state", cmd_query)
    sub.add_argument("job_id")
    sub.add_argument("--json", action="store_true", help="print the job struct as JSON")
    sub = command("logs", "write a job's output to stdout", cmd_logs)
    sub.add_argument("job_id")
    sub.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    sub.add_argument("--offset", type=int, default=0, help="start at this byte (default: %(default)s)")
    sub = command("jobs", "list the queued jobs, then the jobs of every online worker", cmd_jobs)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--state", help="only jobs in this state (queued, running, succeeded, ...)")
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
