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
import array
import base64
import binascii
import bisect
import datetime
import email.utils
import errno
import fcntl
import fnmatch
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import inspect
import io
import itertools
import ipaddress
import json
import logging
import os
import platform
import pyexpat
import queue
import random
import re
import resource
import select
import selectors
import shlex
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import _thread
import time
import urllib.parse
import uuid
import xmlrpc.client
import xmlrpc.server
from collections import deque

try:
    import ssl
except ImportError:  # a Python built without OpenSSL still runs plain HTTP
    ssl = None

__version__ = "1.1.0"
__all__ = [
    "JobschedError", "NotFound", "BadRequest", "Unavailable", "Unreachable", "OutcomeUnknown",
    "Refused", "Unauthorized",
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
JOB_INDEX_SEGMENT = 16384     # the newest job ids it keeps as strings, before packing them
JOURNAL_LIMIT = 4 * MiB       # a worker's journal of started jobs is rewritten past this size
EARLY_HEARTBEAT_GAP = 0.1     # the least time between two heartbeats of a worker
FAN_OUT_THREADS = 64          # the most threads a start_all calls workers from
IDLE_SWEEP_SECONDS = 2.5      # how often the scheduler closes its idle pooled connections


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


class Refused(Unreachable):
    """The peer refused the request at the HTTP level with a status that asking again cannot
    change (4xx but 408 and 429): not a jobsched server, a proxy on the way, or a wrong token.
    Clients that ride out an unreachable peer do not retry it."""


class Unauthorized(Refused):
    """The peer answered HTTP 401: the token is missing or wrong."""


class _TooLarge(BadRequest):
    """The peer answered HTTP 413: the request is over its --max-request."""


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


class _RelayedReply:
    """A whole XML-RPC reply (``body``, bytes) written already: a peer's, passed on unparsed
    (the scheduler relaying output), or one made faster than the marshaller would. A wrapper,
    not a bytes subclass: making one would copy a MiB of output each time."""
    __slots__ = ("body",)

    def __init__(self, body):
        self.body = body


_FAULT_CODE = re.compile(rb"<name>faultCode</name>\s*<value>\s*<(?:int|i4|i8)>\s*(-?[0-9]{1,9})")


def relayed_fault_code(reply):
    """The fault code of a relayed reply, 0 if it is not a fault (a fault's head is short)."""
    if b"<fault>" not in reply[:120]:
        return 0
    match = _FAULT_CODE.search(reply)
    return int(match.group(1)) if match else INTERNAL


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


_OUTPUT_MEMBER = re.compile(rb"<member>\s*<name>(data|offset|eof)</name>\s*<value>\s*"
                            rb"<(base64|int|i4|i8|double|boolean)>([^<]*)</\2>\s*</value>\s*</member>")


_OUTPUT_HEAD = (b"<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><struct>\n"
                b"<member>\n<name>data</name>\n<value><base64>")


def dumps_output_reply(reply):
    """dumps_response() of an output() reply ({data, offset, eof}, data a Binary) as bytes,
    the base64 written once: the marshaller copied a MiB chunk's 1.4 MB four more times."""
    offset = reply["offset"]
    return b"".join((_OUTPUT_HEAD, base64.b64encode(reply["data"].data), (
        "</base64></value>\n</member>\n<member>\n<name>offset</name>\n<value>%s</value>\n"
        "</member>\n<member>\n<name>eof</name>\n<value><boolean>%d</boolean></value>\n"
        "</member>\n</struct></value>\n</param>\n</params>\n</methodResponse>\n"
        % ("<double>%r</double>" % offset if isinstance(offset, float) else "<int>%d</int>" % offset,
           reply["eof"])).encode("ascii")))


def parse_output_reply(body):
    """{data, offset, eof} of an output() reply, read with one regular expression instead of
    expat (a MiB of base64 costs the parser a dozen milliseconds); None for any other reply."""
    if b"<fault>" in body[:200]:
        return None
    begin, end = body.find(b"<base64>"), body.find(b"</base64>")
    if not 0 <= begin < end:
        return None
    data = memoryview(body)[begin + 8:end]  # found by find(), a fifth of a regex's scan
    members = {name: (kind, text) for name, kind, text
               in _OUTPUT_MEMBER.findall(body[:begin + 8] + body[end:])}
    if len(members) != 3 or members[b"data"] != (b"base64", b""):
        return None
    try:
        return {"data": binascii.a2b_base64(data),
                "offset": int(float(members[b"offset"][1])),
                "eof": members[b"eof"][1].strip() == b"1"}
    except (ValueError, binascii.Error):
        return None


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

    def end_methodName(self, data):
        if self._methodname is not None:  # the stdlib takes the last: a reader may take the first
            raise BadRequest("more than one methodName")
        xmlrpc.client.Unmarshaller.end_methodName(self, data)
    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)
    dispatch.update(dict.fromkeys(("i1", "i2", "i4", "i8", "int", "biginteger"), end_int))
    dispatch["name"] = end_name
    dispatch["methodName"] = end_methodName


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


_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def _uuid_int(text):
    """The UUID that text is in canonical form (as str(uuid.UUID(...))) as an int, else None."""
    return int(text.replace("-", ""), 16) if _UUID_TEXT.match(text) else None


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


def on_key(on):
    """A hashable form of a job's ``on``: the queue keeps one heap per distinct constraint."""
    return ("on",) + tuple(sorted(on.items()))


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


_DIGITS = re.compile(r"[0-9]+\Z")


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
    if not _DIGITS.match(port):
        raise ConfigError("address %s is not HOST:PORT" % shown)
    if len(port) > 5 or int(port) > 65535:
        raise ConfigError("address %s: port out of range (at most 65535)" % shown)
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
        if not stat.S_ISREG(mode):
            raise ConfigError("token file %s is not a regular file" % path)
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
#: what RPCServer.quick_request() looks for in the bytes a parked connection has received: an
#: XML-RPC call whose first element names its method (the parser refuses a second name)
_QUICK_START = re.compile(rb"POST /(?:RPC2)? HTTP/1\.[01]\r\n")
_QUICK_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,5})[ \t]*\r\n", re.IGNORECASE)
_QUICK_METHOD = re.compile(
    rb"(?:<\?xml[^>]*\?>)?\s*<methodCall>\s*<methodName>([A-Za-z_]+)</methodName>")
_PEEK = int(socket.MSG_PEEK)  # an int: enum flags cost a call each time


_date = (0, "")  # (second, its HTTP date): formatted once a second, not once an answer


def http_date():
    """The HTTP Date header's value for now."""
    global _date
    now = int(time.time())
    date = _date
    if date[0] != now:
        date = _date = now, email.utils.formatdate(now, usegmt=True)
    return date[1]


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


class PageRequest:
    """What a page route sees of a request: verb, path (percent-decoded), query (name -> first
    value), headers (a Headers) and body (bytes)."""
    __slots__ = ("verb", "path", "query", "headers", "body")

    def __init__(self, verb, path, query, headers, body):
        self.verb, self.path, self.headers, self.body = verb, urllib.parse.unquote(path), headers, body
        self.query = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}

    def accepts_html(self):
        return "text/html" in self.headers.get("Accept", "")


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
    only_methods = None  # else the only methods it may call (a set of names)

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
        if not _DIGITS.match(length):
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
            self._reply(200, self.server.dispatch_xmlrpc(body, self.only_methods), "text/xml")
        else:
            self._page("POST", body)

    def do_GET(self):
        if not self._authorized():
            return
        route = self.server.json_routes.get(("GET", self.path.partition("?")[0]))
        if route is None:
            self._page("GET", b"")
        else:
            self._reply_json(*self.server.call_json(route, b""))

    def _page(self, verb, body):
        path, _, query = self.path.partition("?")
        route = self.server.page_route(verb, path)
        if route is None:
            self._reply_json(404, {"error": "no such route: %s %s" % (verb, _short(path))})
            return
        status, body, content_type, headers = self.server.call_page(
            route, PageRequest(verb, path, query, self.headers, body))
        self._reply(status, body, content_type, headers=headers)

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
            deadline = self.reader.deadline  # the reply forgets it
            self._refuse(413, "request body over %d bytes" % self.server.max_request)
            return self._drop_body(int(length), deadline)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True
            return None
        return body

    def _drop_body(self, length, deadline):
        """Read the body of a request refused before it was read, and drop it, until the
        request's deadline and for REFUSED_BODY_SECONDS at most: a client still sending it then
        reads the refusal, where a close with its bytes unread would reset the connection under
        it (RFC 9112, 9.6)."""
        self.reader.deadline = min(deadline or float("inf"),
                                   time.monotonic() + REFUSED_BODY_SECONDS)
        try:
            self.wfile.flush()  # the refusal goes out first
            while length > 0:
                dropped = len(self.rfile.read1(min(length, 65536)))
                if not dropped:
                    break
                length -= dropped
        except OSError:  # timed out, or reset
            pass

    def _refuse(self, status, message):
        self._reply_json(status, {"error": message}, close=True)
        return None

    def _reply_json(self, status, obj, close=False):
        self._reply(status, json.dumps(obj).encode("utf-8"), "application/json", close=close)

    def _reply(self, status, body, content_type, close=False, headers=()):
        """Write the answer in one write (head and body together: one segment, one wakeup)."""
        self.reader.finish()
        head = ["%s %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                % (self.protocol_version, status, http.client.responses.get(status, ""),
                   self.server_version, http_date(), content_type, len(body))]
        head.extend("%s: %s\r\n" % header for header in headers)
        if close:
            head.append("Connection: close\r\n")
            self.close_connection = True
        head.append("\r\n")
        head = "".join(head).encode("latin-1")
        if len(body) < 65536:
            self.wfile.write(head + body)
        else:  # two writes rather than a copy of a MiB
            self.wfile.write(head)
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # one line per event, not per request

    def log_message(self, format, *args):
        log.debug("%s: %s", self.client_address[0], format % args)


class _ReceivedRequest(io.BytesIO):
    """The reader of a request received whole before its handler began (no deadline to keep)."""
    deadline = None

    def start(self):
        pass

    def finish(self):
        pass


class _Sender:
    """A connection's writer that sends each write at once, nothing buffered: on a non-blocking
    socket, what does not go out whole raises BlockingIOError (the peer is not reading)."""
    closed = False

    def __init__(self, connection):
        self.write = connection.sendall

    def flush(self):
        pass

    def close(self):
        pass


class _InlineRequestHandler(RequestHandler):
    """Answers one request whose bytes were received already (``received``), on the thread that
    received them, and leaves the connection as it is unless the answer closes it."""

    def __init__(self, connection, client_address, server, received):
        self.received = received
        super().__init__(connection, client_address, server)

    def setup(self):
        self.connection = self.request  # non-blocking: see _Sender
        self.timeout = self.server.read_timeout
        self.reader = self.rfile = _ReceivedRequest(self.received)
        self.wfile = _Sender(self.connection)
        self.only_methods = self.server.inline_methods

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        if self.rfile.tell() != len(self.received):
            self.close_connection = True  # read otherwise than it was framed: trust neither


TRIM_SECONDS = 5.0
REFUSED_BODY_SECONDS = 10.0  # how long the body of a request refused as too large is read
IDLE_THREAD_SECONDS = 5.0  # a thread that served a woken connection waits this long for another
#: INLINE_SLOW_IN_A_ROW inline answers each slower than INLINE_SLOW_SECONDS (the parking thread
#: waited for the interpreter's lock behind a busy thread) send the quick requests of the next
#: INLINE_PAUSE_SECONDS to threads again
INLINE_SLOW_SECONDS = 0.005
INLINE_SLOW_IN_A_ROW = 3
INLINE_PAUSE_SECONDS = 1.0
MALLOC_ARENAS = 2          # glibc's malloc arenas in a scheduler or worker process (M_ARENA_MAX)


@functools.lru_cache(maxsize=None)
def _glibc(name):
    """The C library's function ``name`` if it is glibc's (ctypes releases the GIL while it
    runs), else None."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc: the tuning below means nothing elsewhere
        return getattr(libc, name)
    except (ImportError, OSError, AttributeError):
        return None


def release_free_memory():
    """Give the free pages of the C heap back to the system: glibc keeps what a peak freed (the
    reply listing 100000 jobs, a relayed MiB of output) in the process otherwise."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def limit_malloc_arenas():
    """At most MALLOC_ARENAS malloc arenas: glibc gives each busy thread one of up to 8 per core,
    and each keeps its own free memory (8 MB less for a scheduler with 1000 workers). Python's
    own allocator serves small objects under the GIL; few calls reach malloc at all."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX, from malloc.h


def positional_arity(signature):
    """(least, most) positional arguments a call with this signature takes (most may be inf)."""
    least, most = 0, 0
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            most = float("inf")
        elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            most += 1
            least += parameter.default is parameter.empty
        elif parameter.default is parameter.empty:  # a required keyword-only one: never callable
            return 1, 0
    return least, most


def _expired(items, cutoff, running=True):
    """The keys of (key, since) items, oldest first, up to the first since > cutoff (all of
    them if not running): a thousand parked connections are not all looked at each time."""
    expired = []
    for key, since in items:
        if running and since > cutoff:
            break
        expired.append(key)
    return expired


class RPCServer(socketserver.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
    """Threaded XML-RPC + JSON server: a thread per busy connection, TLS handshakes in it.

    A kept-alive connection quiet for ``park_after`` seconds gives up its thread and waits in
    one selector thread for its next request (a thousand heartbeating workers would otherwise
    hold a thousand threads). After ``read_timeout`` seconds of silence it is closed in stages
    (RFC 9112, 9.6): close_notify (TLS) and FIN first, then read and dropped until the client
    closes too, for ``read_timeout`` seconds at most. A client that sends its next request in
    that time reads a clean close and reconnects instead of seeing a reset. A request that has
    come whole on a parked plain connection and calls one of ``inline_methods`` (quick ones,
    which wait for no I/O and no long-held lock: the scheduler's heartbeat) is answered on the
    parking thread itself, and the connection stays parked.

    Callers use serve_in_thread(), close() and ``address``. The roles fill ``methods``
    (name -> callable; nothing else is callable), ``json_routes``
    ((verb, path) -> callable(request dict) -> (status, reply dict)) and ``page_routes``
    ((verb, path) -> callable(PageRequest) -> (status, body bytes, content type, headers); a
    path ending in ``*`` matches every path that starts with what precedes it). With ``metrics``
    set (a Metrics), each XML-RPC call is counted by method and fault code, and timed."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops connections under 16 concurrent clients
    park_after = 0.25
    _inline_paused_until, _inline_slow = 0.0, 0  # see INLINE_SLOW_SECONDS; the parking thread's

    def __init__(self, listen, security, methods, json_routes=None, max_request=MiB,
                 read_timeout=30.0, page_routes=None, metrics=None, inline_methods=()):
        _, host, port, _ = parse_address(listen)
        security.check_listen(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.security = security
        self.ssl_context = security.server_context()
        self.methods = dict(methods)
        self.inline_methods = frozenset(inline_methods)
        self._quick_names = frozenset(name.encode() for name in inline_methods)
        self._signatures = {name: inspect.signature(func) for name, func in self.methods.items()}
        self._arity = {name: positional_arity(signature)
                       for name, signature in self._signatures.items()}
        self.json_routes = dict(json_routes or {})
        self.page_routes = dict(page_routes or {})
        self.metrics = metrics
        self.max_request = max_request
        self.read_timeout = read_timeout
        self._unauthorized_peers = set()  #: peers already logged as unauthorized; guarded by the GIL (set.add)
        self._park_lock = threading.Lock()
        #: guards self._to_park (connections handed to the parking thread), self._parking and
        #: sends on self._wake_parking (a socketpair while the parking thread runs)
        self._to_park, self._parking = [], False
        self._woken_lock = threading.Condition(threading.Lock())
        #: guards self._woken (woken connections for the idle threads to take, oldest first)
        #: and self._idle (threads waiting for one); its notify() wakes an idle thread
        self._woken, self._idle = deque(), 0
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
        # shutdown() waits for serve_forever() to look at its flag: every 0.05 s, so that a
        # signalled scheduler or worker exits at once
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="jobsched-accept", daemon=True)
        thread.start()
        self._serving = True
        return thread

    _trimmed_at = 0.0

    def service_actions(self):
        """Called by serve_forever() between polls: every TRIM_SECONDS, hand the memory that a
        peak freed back to the system."""
        now = time.monotonic()
        if now - self._trimmed_at >= TRIM_SECONDS:
            self._trimmed_at = now
            release_free_memory()

    def close(self):
        if getattr(self, "_serving", False):  # shutdown() waits for a serve_forever() to end
            self.shutdown()
        with self._park_lock:
            if self._parking:
                self._parking = False
                self._wake()  # the parking thread closes the pair
        with self._woken_lock:  # the idle threads end now, and nothing is left for them
            woken, self._woken = self._woken, deque()
            self._woken_lock.notify_all()
        for connection, _ in woken:
            self.shutdown_request(connection)
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

    def _serve_woken(self, connection, client_address):
        """Serve a parked connection whose next request has come, on an idle thread of an
        earlier one, else on a new thread (a heartbeat every 2 s from each of 1000 workers
        would otherwise start and end 500 threads a second)."""
        with self._woken_lock:
            if self._idle > len(self._woken):
                self._woken.append((connection, client_address))
                self._woken_lock.notify()
                return
        try:  # threading.Thread.start() would wait here for the thread to run
            _thread.start_new_thread(self._serve_and_stay, (connection, client_address))
        except RuntimeError:  # no thread to be had: drop the connection, not the loop
            self.shutdown_request(connection)

    def _serve_and_stay(self, connection, client_address):
        """Serve the connection, then the next woken one, until none comes for IDLE_THREAD
        seconds (or the server closes)."""
        while True:
            self.serve_connection(connection, client_address)
            with self._woken_lock:
                self._idle += 1
                deadline = time.monotonic() + IDLE_THREAD_SECONDS
                while not self._woken:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._parking:
                        self._idle -= 1
                        return
                    self._woken_lock.wait(remaining)
                self._idle -= 1
                connection, client_address = self._woken.popleft()

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
                connection = key.fileobj
                client_address, _ = parked.pop(connection)
                received = self.quick_request(connection)
                if received is None:  # a thread serves it
                    selector.unregister(connection)
                    self._serve_woken(connection, client_address)
                elif self._serve_inline(connection, client_address, received):
                    parked[connection] = client_address, time.monotonic()
                else:
                    selector.unregister(connection)
                    self.shutdown_request(connection)
            with self._park_lock:
                arrived, self._to_park, running = self._to_park, [], self._parking
            now = time.monotonic()
            for connection, client_address in arrived:
                try:
                    selector.register(connection, selectors.EVENT_READ)
                    parked[connection] = client_address, now
                except (ValueError, OSError):  # closed under us
                    self.shutdown_request(connection)
            # Both dicts are in the order of arrival: the expired ones are first.
            for connection in _expired(((c, since) for c, (_, since) in parked.items()),
                                       now - self.read_timeout, running):
                del parked[connection]
                if running and self._half_close(connection):
                    closing[connection] = now
                else:
                    selector.unregister(connection)
                    self.shutdown_request(connection)
            for connection in _expired(closing.items(), now - self.read_timeout, running):
                del closing[connection]
                selector.unregister(connection)
                connection.close()
            if not running:
                selector.close()
                with self._park_lock:
                    self._wake_parking.close()
                wakeup.close()
                return

    def quick_request(self, connection):
        """The bytes of the request a parked connection has received, if they are all there and
        call one of ``inline_methods`` (else None, and nothing is read): answering it on the
        parking thread saves the hand-over to another and back (about half of a heartbeat's CPU
        with a thousand workers). Plain connections only: TLS ones cannot be peeked at."""
        if not self.inline_methods or type(connection) is not socket.socket:  # TLS: SSLSocket
            return None
        if self._inline_paused_until and time.monotonic() < self._inline_paused_until:
            return None
        if connection.gettimeout() != 0.0:
            connection.settimeout(0.0)  # nothing waits here (a thread taking over sets its own)
        try:
            data = connection.recv(8192, _PEEK)
        except OSError:
            return None
        end = data.find(b"\r\n\r\n")
        length = _QUICK_LENGTH.search(data, 0, end + 2) if end > 0 else None
        if length is None or not _QUICK_START.match(data):
            return None
        size = end + 4 + int(length.group(1))
        method = _QUICK_METHOD.match(data, end + 4, size)
        if size > len(data) or method is None or method.group(1) not in self._quick_names:
            return None
        try:
            return connection.recv(size)  # all there: seen above
        except OSError:
            return b""

    def _serve_inline(self, connection, client_address, received):
        """Answer a quick request (see quick_request); false if the connection is to be closed,
        as it is when the answer cannot be sent whole at once (a peer that reads nothing).
        While another thread keeps the interpreter busy (a large submit being parsed), each of
        the answer's system calls waits for its lock: one thread answering them all would fall
        behind the heartbeats of a thousand workers, so they go to threads again for a while."""
        began = time.monotonic()
        try:
            handler = _InlineRequestHandler(connection, client_address, self, received)
            return not handler.close_connection
        except Exception:
            self.handle_error(connection, client_address)
            return False
        finally:
            now = time.monotonic()
            self._inline_slow = self._inline_slow + 1 if now - began > INLINE_SLOW_SECONDS else 0
            if self._inline_slow >= INLINE_SLOW_IN_A_ROW:  # not one late wakeup: a busy process
                self._inline_paused_until, self._inline_slow = now + INLINE_PAUSE_SECONDS, 0

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
        if self.metrics is None:
            return self._call(func, name, params)
        began, code = time.monotonic(), INTERNAL
        try:
            result = self._call(func, name, params)
            code = relayed_fault_code(result.body) if isinstance(result, _RelayedReply) else 0
            return result
        except JobschedError as e:
            code = e.code
            raise
        finally:
            self.metrics.observe_rpc(name, code, time.monotonic() - began)

    def _call(self, func, name, params):
        least, most = self._arity[name]
        if not least <= len(params) <= most:  # what Signature.bind() would refuse, at a tenth
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

    def dispatch_xmlrpc(self, body, only=None):
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
            if only is not None and name not in only:  # quick_request() let it through
                raise InternalError("%s taken for a quick call: send it again" % _short(name))
            result = self.call(name, params)
            if isinstance(result, _RelayedReply):
                return result.body
            try:
                return dumps_response(result)
            except (TypeError, OverflowError):
                log.exception("cannot marshal the result of %s", name)
                raise InternalError("internal error in %s (see the server's log)" % name)
        except JobschedError as e:
            return xmlrpc.client.dumps(xmlrpc.client.Fault(e.code, str(e))).encode("utf-8")

    def page_route(self, verb, path):
        route = self.page_routes.get((verb, path))
        if route is None:
            for (route_verb, pattern), candidate in self.page_routes.items():
                if route_verb == verb and pattern.endswith("*") and path.startswith(pattern[:-1]):
                    return candidate
        return route

    def call_page(self, route, request):
        """(status, body, content type, headers) of a page route; errors as one line of text."""
        try:
            return route(request)
        except JobschedError as e:
            status, message = HTTP_STATUS[e.code], str(e)
        except Exception:
            log.exception("internal error in %s %s", request.verb, _short(request.path))
            status, message = 500, "internal error (see the server's log)"
        return status, (message + "\n").encode("utf-8"), "text/plain; charset=utf-8", ()

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


class _Transport:
    """One kept-alive HTTP(S) connection to one server, with a timeout and the token on every
    request. A request goes out in one sendall() (head and body together: one segment, one
    wakeup of the server); the answer is read by _Response.

    After a failed request, ``sent`` tells whether the whole request had been written (the server
    may have acted on it) or not (it certainly did not)."""

    def __init__(self, host, port, tls_context, authorization, timeout):
        self.host, self.port = host, port
        self.tls_context = tls_context
        self.timeout = timeout
        self.relay = False  # return the reply as a _RelayedReply instead of parsing it
        self.sent = False
        self.idle_since = 0.0  # time.monotonic() when last put back in its pool
        self.generation = 0    # of its RPCClient's pool
        self.sock = None
        head = "POST /RPC2 HTTP/1.1\r\nHost: %s\r\nUser-Agent: jobsched/%s\r\n" \
               "Content-Type: text/xml\r\n" % (format_address(host, port), __version__)
        if authorization:
            head += "Authorization: %s\r\n" % authorization
        self._head = (head + "Content-Length: ").encode("latin-1")

    def connect(self):
        sock = create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self, response=None):
        """Close the connection (and the answer being read from it, which holds its socket)."""
        if response is not None:
            response.close()
        sock, self.sock = self.sock, None
        if sock is not None:
            send_close_notify(sock)
            sock.close()

    def closed_by_peer(self):
        """True if the idle connection has something to read: the server closed it (or sent junk)."""
        if self.sock is None:
            return False
        if hasattr(select, "poll"):  # select() cannot take a descriptor above FD_SETSIZE
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([self.sock], [], [], 0)[0])

    def request(self, body):
        """The call's result as a 1-tuple (or a _RelayedReply); Fault for a fault answer,
        ProtocolError for an HTTP status other than 200. The request is sent again only when a
        kept-alive connection turns out to have been closed by the server before any byte of
        the answer (as HTTP clients do: the server most likely closed it while it was idle)."""
        message = self._head + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        self.sent = False
        for retry in (False, True):
            reused = self.sock is not None
            sent_before = self.sent
            response = None
            try:
                if self.sock is None:
                    self.connect()
                self.sock.sendall(message)
                self.sent = True
                response = _Response(self.sock, method="POST")
                response.begin()
                break
            except _CLOSED_BY_PEER:
                self.close(response)
                if retry or not reused:
                    raise
            except BaseException as e:
                self.close(response)
                if not reused and is_tls_alert(e):  # the handshake failed after all
                    self.sent = sent_before
                raise
        try:
            reply = response.read()  # whole: the stdlib fed it to expat 1 KiB at a time
        except BaseException:
            self.close(response)
            raise
        response.close()
        if response.will_close or response.status != 200:
            self.close()
        if response.status != 200:
            raise xmlrpc.client.ProtocolError(format_address(self.host, self.port) + "/RPC2",
                                              response.status, _http_reason(response, reply),
                                              dict(response.getheaders()))
        if self.relay:
            return (_RelayedReply(reply),)
        try:
            return loads_request(reply)[0]
        except xmlrpc.client.Fault:
            raise
        except BaseException:
            self.close()
            raise

    def set_timeout(self, seconds):
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _http_reason(response, body):
    """The reason phrase of an HTTP error answer, with the "error" of a jobsched JSON body."""
    try:
        said = json.loads(body.decode("utf-8"))["error"] if len(body) < 4096 else None
    except (ValueError, KeyError, TypeError):  # not jobsched's JSON: the phrase alone
        said = None
    reason = _CONTROL_CHARS.sub(" ", response.reason or "").strip()
    said = " ".join(_CONTROL_CHARS.sub(" ", said).split()) if isinstance(said, str) else ""
    if not said:
        return reason
    return "%s (%s)" % (reason, said if len(said) <= 200 else said[:200] + "...")


_CONNECTION_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ResponseError,
                      pyexpat.ExpatError) + (
    (ssl.CertificateError,) if ssl is not None else ())


class RPCClient:
    """Calls one jobsched server: ``call(method, *params)``.

    Thread-safe: each call borrows a kept-alive connection from a small pool, so one RPCClient
    can serve many threads. Faults raise the JobschedError subclass of their code, and so does
    a request too large for the server (HTTP 413: BadRequest, as sending it again cannot help).
    A peer that cannot be reached raises Unreachable when the request certainly was not acted on
    (refused, failed TLS handshake, another HTTP error status), and its subclass OutcomeUnknown
    when it was sent and no answer came (timed out, connection lost). A connection idle for
    ``idle_timeout`` seconds is closed rather than used (servers close theirs after 30 s).
    ``address`` is HOST:PORT, or https://HOST:PORT, or http://user:TOKEN@HOST:PORT."""
    max_idle = 16
    idle_timeout = 25.0
    check_after = 1.0  # an idle connection older than this is checked for a close before use

    def __init__(self, address=DEFAULT_SCHEDULER, token=None, tls_ca=None, tls_cert=None,
                 tls_key=None, timeout=10.0, security=None):
        scheme, host, port, password = parse_address(address)
        self._host, self._port = host, port
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
            result = transport.request(request)[0]
        except xmlrpc.client.Fault as fault:
            self._release(transport, timeout)
            raise error_from_fault(fault) from None
        except xmlrpc.client.ProtocolError as e:
            transport.close()
            if e.errcode == 401:
                raise Unauthorized("%s refused the request: missing or wrong token (HTTP 401); "
                                   "give the cluster's token with --token-file FILE or "
                                   "JOBSCHED_TOKEN_FILE" % self.address) from None
            if e.errcode == 413:
                raise _TooLarge("%s refused the request: larger than its --max-request (HTTP "
                                 "413); send less in one call, or raise its --max-request"
                                 % self.address) from None
            status = ("HTTP %d %s" % (e.errcode, e.errmsg)).rstrip()
            if 400 <= e.errcode < 500 and e.errcode not in (408, 429):
                raise Refused("%s refused the request: %s; is it a jobsched server, and is this "
                              "its address (no proxy on the way)?" % (self.address, status)) from None
            if e.errcode >= 500:  # never jobsched's own: a proxy, which may have passed it on
                raise OutcomeUnknown("%s answered %s" % (self.address, status)) from None
            raise Unreachable("%s answered %s" % (self.address, status)) from None
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
            transport = _Transport(self._host, self._port, self._tls_context, self._authorization,
                                   self.timeout)
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

#: the variables that mark a job's processes (and what a restarted worker looks for)
JOB_ID_VARIABLE, WORKER_ID_VARIABLE = "JOBSCHED_JOB_ID", "JOBSCHED_WORKER_ID"


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
            line = f.read()
        return line[line.rindex(b")") + 2:].split()[19].decode()
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


def leader_exited(pid):
    """True once the child pid has exited; it is not reaped (a zombie keeps its group id taken)."""
    if not hasattr(os, "waitid"):
        return False  # macOS before Python 3.13: only the waiter knows
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member runs as another user
    if not os.path.isdir("/proc"):
        return True
    # Zombies count for killpg(); an init that does not reap would keep them for ever.
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
                if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                    return True
            except (OSError, ValueError, IndexError):
                pass
    return False


def wait_group_gone(pgid, timeout=2.0):
    """Wait until no live process is left in a SIGKILLed process group; false on timeout."""
    deadline, delay = time.monotonic() + timeout, 0.0005
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    return True


def find_job_processes(worker_id):
    """[(pid, job_id, start token)] of the processes whose environment marks them as jobs of
    worker_id: Linux reads /proc/PID/environ (this user's processes), macOS asks ``ps -E``."""
    marker = ("%s=%s" % (WORKER_ID_VARIABLE, worker_id)).encode()
    prefix = JOB_ID_VARIABLE.encode() + b"="
    found = []
    if os.path.isdir("/proc"):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    variables = f.read().split(b"\0")
            except OSError:
                continue  # gone, or another user's
            if marker in variables:
                job_ids = [v[len(prefix):] for v in variables if v.startswith(prefix)]
                if job_ids:
                    found.append((int(name), job_ids[0].decode("ascii", "replace")))
        return [(pid, job_id, process_start_time(pid)) for pid, job_id in found]
    try:  # macOS: the environment follows the command, as NAME=VALUE words
        listing = subprocess.run(["ps", "-E", "-ww", "-x", "-o", "pid=", "-o", "command="],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 timeout=30).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot list processes to find the jobs of the last run: %s", e)
        return []
    for line in listing.splitlines():
        pid, _, words = line.strip().partition(" ")
        words = words.split()
        if pid.isdigit() and int(pid) != os.getpid() and marker.decode() in words:
            job_ids = [w[len(prefix):] for w in words if w.startswith(prefix.decode())]
            if job_ids:
                found.append((int(pid), job_ids[0], None))
    return found


def lock_state_dir(path, role):
    """Create path (mode 0700) and hold an exclusive flock on its ``lock`` file: ConfigError if
    another process holds it. Returns the lock file; closing it releases the lock.

    A process killed a moment ago may leave a child between fork and exec that still holds the
    lock for a few milliseconds: it is tried for a second before the dir is called taken."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        lock_file = open(os.path.join(path, "lock"), "a+")
    except OSError as e:
        raise ConfigError("cannot use state dir %s: %s" % (path, e.strerror))
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock_file
        except OSError:
            if time.monotonic() > deadline:
                lock_file.close()
                raise ConfigError("state dir %s is in use by another %s" % (path, role))
            time.sleep(0.02)


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
            self._spawn, self._spawnp = libc.posix_spawn, libc.posix_spawnp
            self._encoded = {}  # (name, value) -> b"name=value": most of every job's env repeats
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
        if env is None:
            env = os.environ
        spawn = self._spawn
        if executable is None and os.sep not in argv[0] and env.get("PATH") == os.environ.get("PATH"):
            # The PATH search of posix_spawnp (execvp's, in the child) is the job's own here,
            # and costs no stat() per directory in the worker.
            spawn, path = self._spawnp, os.fsencode(argv[0])
        else:
            path = self._find(argv[0], executable, cwd, env)
        args = [os.fsencode(a) for a in argv]
        encoded = self._encoded
        if len(encoded) > 10000:  # jobs with ever new env values: start afresh
            encoded.clear()
        envp = []
        for item in env.items():
            line = encoded.get(item)
            if line is None:
                line = encoded[item] = os.fsencode(item[0]) + b"=" + os.fsencode(item[1])
            envp.append(line)
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
            err = spawn(ctypes.byref(pid), path, actions, attr, c_argv, c_envp)
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
                 "finished_at", "output_bytes", "stop_reason", "finished", "exited")

    def __init__(self, job_id, worker_id, command, path, args):
        self.job_id, self.worker_id = job_id, worker_id
        self.command, self.path, self.args = command, path, args
        self.pid = self.proc_start = self.process = self.exit_code = self.signal = None
        self.finished_at = self.output_bytes = self.stop_reason = None
        self.started_at = time.time()
        self.state = "running"
        self.error_text = ""
        self.finished = threading.Event()
        self.exited = False  # the leader has exited: from then on nothing signals its group

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
        """The job as one line of JSON, for the journal and the record file."""
        record = self.to_struct()
        record["proc_start"] = self.proc_start
        return json.dumps(without_none(record)).encode("utf-8") + b"\n"

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
JOB_END_GAP = 0.01            # s between two reports of ended jobs: a burst of ends goes in one
#: what a worker reports of an ended job: the scheduler keeps no more (and parses less)
JOB_END_KEYS = ("job_id", "state", "error_text", "exit_code", "signal", "pid", "started_at",
                "finished_at", "output_bytes")


def default_state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "jobsched", "worker")


#: the job files of a state dir: a job id (a UUID) and a suffix
_JOB_FILE = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                       r"(\.out|\.json|\.json\.tmp)\Z")


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror or e)


class WorkerStateDir:
    """A worker's state directory: what survives the worker, and how.

    Its files, and the only ones it ever touches: ``lock`` (flock()ed while a worker uses the
    directory), ``worker_id`` (kept across restarts), ``journal``, per job ``<job_id>.out`` (the
    job's stdout and stderr, appended by the job itself) and ``<job_id>.json`` (its final record),
    and these names plus ``.tmp`` while they are written (then renamed: whole or absent).

    Intent first: before a job is spawned, its line is appended to the journal in one write()
    (begin()); the line is kept, through every rewrite of the journal, until the job's final
    record is written. A record that cannot be written (disk full) keeps the job in the journal
    with its final line, and is written by a later record(), by close(), or at the next start.
    So a worker killed at any moment finds on restart (load()) every job it may have spawned:
    a job with a record has ended; one with a journal line and an output file may still be
    running, or had ended when only its final line got written. Retention (expire()) removes an
    output before its record. Nothing is fsync()ed: this holds when the worker dies, not when
    the machine does (after a power loss the newest lines, records and output may be missing).

    The worker calls load() and open_journal() once, then begin() before it spawns a job and
    abandon() if no job came of it; record() when a job ends; expire(); close() last."""

    def __init__(self, path, keep_jobs):
        self.path, self.keep_jobs = path, keep_jobs
        self.lock = threading.Lock()
        #: guards self._journal (fd of the journal), self._journal_bytes, self._unrecorded,
        #: self._unwritten and self._finished
        self._journal, self._journal_bytes = None, 0
        self._unrecorded = {}     # job_id -> its journal line, until its record is written
        self._unwritten = set()   # ended jobs whose record is still to be written
        self._finished = deque()  # ids of jobs with a record, oldest first, for keep_jobs
        self._lock_file = self._lock()
        try:
            self.worker_id = self._load_worker_id()
        except OSError as e:  # disk full or read-only: a configuration error, not a traceback
            self._lock_file.close()
            raise ConfigError("cannot use state dir %s: %s" % (self.path, e.strerror or e))

    def _lock(self):
        return lock_state_dir(self.path, "worker")

    def _load_worker_id(self):
        path = os.path.join(self.path, "worker_id")
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

    def load(self):
        """What the last run left: (records of ended jobs, records of jobs it may have left
        running), lists of dicts. The journal's last line for a job wins; a record file wins over
        the journal. An output file that neither names is a job whose line was lost: it comes back
        too, nameless, rather than be deleted."""
        lines, records, outputs = {}, {}, {}
        try:
            with open(os.path.join(self.path, "journal"), "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line.decode("utf-8"))
                        lines[record["job_id"]] = record
                    except (ValueError, KeyError, TypeError):
                        pass  # the last line, cut short by a crash
        except FileNotFoundError:
            pass
        for name in os.listdir(self.path):
            path = os.path.join(self.path, name)
            match = _JOB_FILE.match(name)
            if name in ("journal.tmp", "worker_id.tmp") or match and match.group(2) == ".json.tmp":
                _remove(path)  # a write the last run did not finish
            elif match and match.group(2) == ".out":
                outputs[match.group(1)] = path
            elif match:
                try:
                    with open(path, "rb") as f:
                        record = json.loads(f.read().decode("utf-8"))
                    if not isinstance(record, dict) or record.get("job_id") != match.group(1):
                        raise ValueError("not the record of job %s" % match.group(1))
                    records[match.group(1)] = record
                except (OSError, ValueError) as e:
                    log.warning("ignoring unreadable job record %s: %s", path, e)
        for job_id in set(records) - set(outputs):  # expire() removed the output, then we died
            _remove(os.path.join(self.path, job_id + ".json"))
            del records[job_id]
        unsettled = []
        for job_id in set(outputs) - set(records):
            record = lines.get(job_id)
            if not isinstance(record, dict):
                try:
                    started_at = os.stat(outputs[job_id]).st_mtime
                except OSError:
                    started_at = time.time()
                record = {"job_id": job_id, "worker_id": self.worker_id, "command": "",
                          "path": "", "args": [], "started_at": started_at}
            unsettled.append(record)
        return list(records.values()), unsettled

    def open_journal(self, finished):
        """Open the journal for appending (its old lines stay until compact_journal());
        finished: the ids of the jobs with a record, oldest first."""
        self._finished.extend(finished)
        self._journal = os.open(os.path.join(self.path, "journal"),
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._journal_bytes = os.fstat(self._journal).st_size

    def compact_journal(self):
        """Rewrite the journal with the lines of the jobs that have no record yet; if that cannot
        be written, the old journal stays (it holds those lines too)."""
        with self.lock:
            try:
                self._rewrite_journal()
            except OSError as e:
                log.warning("cannot rewrite the journal in %s: %s", self.path, e.strerror or e)

    def _rewrite_journal(self):
        lines = list(self._unrecorded.values())
        path = os.path.join(self.path, "journal")
        write_atomically(path, b"".join(lines))
        os.close(self._journal)
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._journal_bytes = sum(map(len, lines))

    def _append(self, line):
        """Append a line in one write(), or nothing (a failed write is cut off); under self.lock."""
        try:
            if os.write(self._journal, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(self._journal, self._journal_bytes)
            raise
        self._journal_bytes += len(line)

    def begin(self, job_id, line):
        """Write down that a job is about to be spawned: its journal line, then its empty output
        file, whose fd (O_APPEND) is returned. Unavailable if either cannot be written."""
        with self.lock:
            if self._journal is None:
                raise Unavailable("worker is shutting down")
            try:
                if self._journal_bytes > JOURNAL_LIMIT:
                    self._rewrite_journal()
                self._append(line)
            except OSError as e:
                raise Unavailable("cannot write job record in %s: %s" % (self.path, e.strerror))
            self._unrecorded[job_id] = line
        try:
            return os.open(self.output_path(job_id),
                           os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as e:
            with self.lock:
                self._unrecorded.pop(job_id, None)  # a line without an output file means nothing
            raise Unavailable("cannot write job output in %s: %s" % (self.path, e.strerror))

    def abandon(self, job_id):
        """Settle the intent of a job that was not spawned: its output file goes, then its line."""
        _remove(self.output_path(job_id))
        with self.lock:
            self._unrecorded.pop(job_id, None)

    def output_path(self, job_id):
        return os.path.join(self.path, job_id + ".out")

    def output_size(self, job_id):
        try:
            return os.stat(self.output_path(job_id)).st_size
        except OSError:
            return 0

    def record(self, job_id, line):
        """Write an ended job's record (line: Job.to_record()); true once it is written. The
        records that could not be written before are tried again first."""
        self.retry()
        return self._record(job_id, line)

    def retry(self):
        """Try again to write the records that could not be written."""
        with self.lock:
            if not self._unwritten:
                return
            due = [(job_id, self._unrecorded[job_id]) for job_id in self._unwritten]
            self._unwritten = set()  # taken: one writer per record file at a time
        for job_id, line in due:
            self._record(job_id, line)

    def _record(self, job_id, line):
        try:
            write_atomically(os.path.join(self.path, job_id + ".json"), line)
        except OSError as e:
            with self.lock:
                first = self._unrecorded.get(job_id) != line
                self._unrecorded[job_id] = line  # the final line, for every rewrite of the journal
                self._unwritten.add(job_id)
                if first and self._journal is not None:
                    try:
                        self._append(line)  # so the next start knows how the job ended
                    except OSError:
                        pass
            if first:
                log.error("cannot write the record of job %s: %s; it stays in the journal and "
                          "is tried again", job_id, e.strerror or e)
            return False
        with self.lock:
            self._unrecorded.pop(job_id, None)
            self._finished.append(job_id)  # only now may expire() remove its files
        return True

    def expire(self, forget):
        """Remove the oldest recorded jobs beyond keep_jobs: forget(job_id), then the output file,
        then the record (a crash in between leaves a record without output: load() removes it)."""
        while True:
            with self.lock:
                if len(self._finished) <= self.keep_jobs:
                    return
                job_id = self._finished.popleft()
            forget(job_id)
            _remove(self.output_path(job_id))
            _remove(os.path.join(self.path, job_id + ".json"))

    def close(self):
        """Try the unwritten records once more, keep the journal lines of the jobs still without
        one, and let go of the directory."""
        self.retry()
        with self.lock:
            if self._journal is not None:
                if self._unwritten:
                    try:
                        self._rewrite_journal()
                    except OSError:
                        pass  # their lines are in the old journal, if there was room
                os.close(self._journal)
                self._journal = None
        self._lock_file.close()


class JobTimeouts:
    """The jobs' timeouts, kept by one thread instead of a threading.Timer each.

    add(job_id, seconds) when a job starts, cancel(job_id) when it ends (an ended job holds
    nothing); on_timeout(job_id) runs in a thread of its own, as a stop takes its grace period."""

    def __init__(self, on_timeout):
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        #: guards self._deadlines, self._heap, self._thread and self._closed
        self._changed = threading.Condition(self._lock)
        self._deadlines = {}  # job_id -> time.monotonic() deadline
        self._heap = []       # (deadline, job_id), cancelled ones included until compacted
        self._thread = None
        self._closed = False

    def add(self, job_id, seconds):
        deadline = time.monotonic() + seconds
        with self._lock:
            if self._closed:
                return
            self._deadlines[job_id] = deadline
            heapq.heappush(self._heap, (deadline, job_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jobsched-timeouts",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][1] == job_id:
                self._changed.notify()  # sooner than what the thread waits for

    def cancel(self, job_id):
        with self._lock:
            if self._deadlines.pop(job_id, None) is None:
                return
            if len(self._heap) > 2 * len(self._deadlines) + 64:
                self._heap = [(deadline, job) for job, deadline in self._deadlines.items()]
                heapq.heapify(self._heap)

    def close(self):
        with self._lock:
            self._closed = True
            self._deadlines, self._heap = {}, []
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)

    def _run(self):
        while True:
            due = []
            with self._lock:
                while not self._closed and not due:
                    now = time.monotonic()
                    while self._heap and self._heap[0][0] <= now:
                        deadline, job_id = heapq.heappop(self._heap)
                        if self._deadlines.get(job_id) == deadline:
                            del self._deadlines[job_id]
                            due.append(job_id)
                    if not due:
                        self._changed.wait(min(self._heap[0][0] - now, 3600.0)
                                           if self._heap else None)
                if self._closed:
                    return
            for job_id in due:
                threading.Thread(target=self._on_timeout, args=(job_id,),
                                 name="jobsched-timeout", daemon=True).start()


class Worker(_Role):
    """Runs jobs on this host: each in its own session, output appended to
    ``<state_dir>/<job_id>.out``, a record in ``<job_id>.json``, a waiter thread per job.

    Library use: ``Worker(listen="127.0.0.1:0", scheduler=ADDR, state_dir=DIR)``, then
    start_serving() (or ``with``), ``address``, ``worker_id``, close(). ``scheduler=None`` runs it
    standalone. ``labels`` adds to the built-in labels host, os and arch (see worker_labels()).
    ``fatal_error`` says why it stopped heartbeating, if the scheduler refused its token or its
    registration (it keeps serving). RPCs: start, stop, query, output, jobs, info."""

    def __init__(self, listen=DEFAULT_WORKER, scheduler=DEFAULT_SCHEDULER, advertise=None,
                 state_dir=None, slots=None, stop_grace=5.0, heartbeat=2.0, keep_jobs=10000,
                 allow=(), jobs_dir=None, rpc_timeout=10.0, max_request=MiB, read_timeout=30.0,
                 token=None, tls_cert=None, tls_key=None, tls_ca=None, insecure=False,
                 security=None, allow_env=(), spawn_method=None, labels=None):
        self.security = security or Security(token, tls_cert, tls_key, tls_ca, insecure)
        self.labels = worker_labels(labels)
        self.spawner = Spawner(spawn_method)
        self.slots = slots if slots is not None else (os.cpu_count() or 1)
        self.stop_grace, self.heartbeat, self.keep_jobs = stop_grace, heartbeat, keep_jobs
        self.rpc_timeout = rpc_timeout
        self.scheduler = scheduler
        self.jobs_dir = os.path.realpath(jobs_dir) if jobs_dir else None
        self.allowed = {self._resolve_executable(c, os.environ.get("PATH")) or c for c in allow}
        # With --allow, the environment could run something else (LD_PRELOAD, BASH_ENV, ...).
        self.allow_env = tuple(allow_env)
        self._env_restricted = bool(allow or allow_env)
        self.state_dir = os.path.abspath(state_dir or default_state_dir())
        # No credential reaches a job: none of the worker's JOBSCHED_* variables are passed on.
        self._base_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSCHED_")}
        self.jobs_lock = threading.Lock()
        #: guards self._jobs, self._starting, self._running, self._unreported, self._closing
        #: and every Job's state, exited and stop_reason
        self._job_changed = threading.Condition(self.jobs_lock)  # notified when a job ends
        self._jobs = {}
        self._running = 0
        self._unreported = 0  # ended jobs whose end the scheduler has not acknowledged yet
        self._starting = set()  # job ids being spawned: a second start of one waits for the first
        self._closing = False
        self._closed = threading.Event()
        self._beat_now = threading.Event()  # set by close(), and after an end report (below)
        # Heartbeats begun and answered (or failed): one not answered before an end report was
        # sent may reach the scheduler after it, counting those jobs again; another follows.
        self._beats = self._beats_answered = 0  # written by the heartbeat thread only
        self._ended_jobs = queue.Queue()  # ended Jobs for the reporter thread; None stops it
        self._registered = False  # written by the heartbeat thread only
        self.metrics = Metrics()
        self._timeouts = JobTimeouts(self._timed_out)
        if advertise:
            want_host_port(advertise, "--advertise")
        self.state = WorkerStateDir(self.state_dir, keep_jobs)
        self.worker_id = self.state.worker_id
        try:
            try:
                self._load_jobs()
            except OSError as e:  # disk full or read-only: a configuration error, not a traceback
                raise ConfigError("cannot use state dir %s: %s" % (self.state_dir, e.strerror or e))
            self.server = RPCServer(listen, self.security, {
                "start": self.start, "stop": self.stop, "query": self.query,
                "output": self._output_reply, "jobs": self.jobs, "info": self.info,
                "start_many": self.start_many,
            }, max_request=max_request, read_timeout=read_timeout,
                page_routes={("GET", "/metrics"): lambda request: metrics_reply(worker_metrics(self))})
        except BaseException:
            self.state.close()
            raise
        if advertise:
            self.advertise = advertise
        else:
            host, port = self.server.address.rsplit(":", 1)
            if host in ("0.0.0.0", "[::]", ""):
                host = socket.gethostname()
            self.advertise = "%s:%s" % (host, port)
        self._threads = []

    # -- restart -------------------------------------------------------------------------------

    def _load_jobs(self):
        """Bring back the jobs of the last run and settle what it left: every process of a job
        without a record is SIGKILLed, and the job recorded as lost (or as it ended, when its
        final line got into the journal)."""
        finished, unsettled = self.state.load()
        jobs = sorted(self._jobs_from(finished), key=lambda j: j.finished_at or 0)
        self._jobs.update((job.job_id, job) for job in jobs)
        self.state.open_journal([job.job_id for job in jobs])
        unsettled = self._jobs_from(unsettled)
        leaders = self._kill_leftovers(set(self._jobs), unsettled)
        for job in unsettled:
            if job.state == "running":
                job.state, job.finished_at = "lost", time.time()
                job.error_text = "lost: the worker restarted while the job was running"
                job.pid = job.pid or leaders.get(job.job_id)
                job.output_bytes = self.state.output_size(job.job_id)
                log.info("job %s lost: the worker restarted while it was running", job.job_id)
            job.finished = _ENDED
            self._jobs[job.job_id] = job
            self.state.record(job.job_id, job.to_record())
        self.state.compact_journal()
        self._expire_jobs()

    @staticmethod
    def _jobs_from(records):
        jobs = []
        for record in records:
            try:
                jobs.append(Job.from_record(record))
            except (KeyError, TypeError, AttributeError) as e:
                log.warning("ignoring unreadable record of job %s: %s", record.get("job_id"), e)
        return jobs

    def _kill_leftovers(self, recorded, unsettled):
        """SIGKILL the process group of every process marked as a job of this worker whose job
        has no record, and wait for them to die; returns {job_id: pid} of the jobs' leaders found.

        Journal lines of earlier versions name the pid instead (checked against its start time).
        A job process the last run was spawning when it died shows its marks only once it has
        exec'd, which a loaded machine may delay: while a started job has no process found, the
        processes are looked for again, for up to 0.75 s."""
        groups, leaders, killed = set(), {}, set()
        wanted = {job.job_id for job in unsettled if job.state == "running"}
        for delay in (0.05, 0.1, 0.2, 0.4, None):
            for pid, job_id, start_time in find_job_processes(self.worker_id):
                if pid in killed or job_id in recorded or (
                        start_time and process_start_time(pid) != start_time):
                    continue  # a finished job's process that left its group, or the pid was reused
                try:
                    pgid = os.getpgid(pid)
                except OSError:
                    continue
                if pgid == pid:
                    leaders[job_id] = pid
                if pgid != os.getpgrp():
                    signal_group(pgid, signal.SIGKILL)
                    groups.add(pgid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                killed.add(pid)
                log.info("killed process %d of job %s, left running by the last run", pid, job_id)
            if delay is None or wanted <= set(leaders):
                break
            time.sleep(delay)
        for job in unsettled:
            if job.state == "running" and job.pid and job.proc_start is not None:
                current = process_start_time(job.pid)
                if current is None or current == job.proc_start:
                    signal_group(job.pid, signal.SIGKILL)
                    groups.add(job.pid)
        for pgid in groups:
            wait_group_gone(pgid, timeout=1.0)
        return leaders

    def _expire_jobs(self):
        """Forget the oldest recorded jobs beyond keep_jobs, then remove their files."""
        def forget(job_id):
            with self.jobs_lock:
                self._jobs.pop(job_id, None)
        self.state.expire(forget)

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
        return self._info(unreported=False)

    def _info(self, unreported):
        """info(); for a heartbeat (unreported true), ``running`` also counts the
        ended jobs whose end report the scheduler has not answered yet: it takes one off per
        reported end, whether the report comes before or after the heartbeat."""
        with self.jobs_lock:
            running = self._running + (self._unreported if unreported else 0)
        return {
            "worker_id": self.worker_id, "address": self.advertise, "online": True,
            "slots": self.slots, "running": running, "last_seen": time.time(),
            "hostname": socket.gethostname(), "version": __version__,
            "heartbeat": self.heartbeat, "tls": self.security.serves_tls,
            "stop_grace": self.stop_grace, "labels": dict(self.labels),
        }

    def _heartbeat_loop(self):
        """Register, then heartbeat; never give up on an unreachable scheduler, only on one that
        refuses our token (fatal_error). The scheduler's count of running jobs stays true between
        heartbeats from the ends the reporter thread sends at once (see _report_loop)."""
        scheduler = RPCClient(self.scheduler, security=self.security, timeout=self.rpc_timeout)
        registered, failures, delay, last_beat = False, 0, 0.0, 0.0
        ever_registered = False  # a refusal is fatal only before: after, the jobs go on
        while True:
            if registered and not failures:
                self._beat_now.wait(delay)
                self._beat_now.clear()
                self._closed.wait(max(0.0, last_beat + EARLY_HEARTBEAT_GAP - time.monotonic()))
            else:
                self._closed.wait(delay)
            if self._closed.is_set():
                break
            last_beat = time.monotonic()
            try:
                if registered:
                    self._call_counting(scheduler, "heartbeat", self.worker_id)
                else:
                    self._call_counting(scheduler, "register", self.advertise)
                    log.info("registered with scheduler %s as %s", scheduler.address, self.worker_id)
                    registered = ever_registered = True
                failures, delay = 0, self.heartbeat
            except NotFound:  # the scheduler restarted and forgot us: same id, at once
                registered, delay = False, 0.0
            except Unauthorized:
                self.fatal_error = ("scheduler %s refused this worker's token (HTTP 401): give the "
                                    "cluster's token with --token-file FILE or JOBSCHED_TOKEN_FILE"
                                    % scheduler.address)
                log.error("%s; no longer trying to register", self.fatal_error)
                self._registered = False
                break
            except Exception as e:  # JobschedError, or a peer that is not a jobsched scheduler
                if isinstance(e, (BadRequest, Refused)) and not ever_registered:  # for good
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

    def _call_counting(self, scheduler, method, first):
        """A heartbeat or register call with this worker's struct, counted in _beats and
        _beats_answered."""
        self._beats += 1
        try:
            scheduler.call(method, first, self._info(unreported=True))
        finally:
            self._beats_answered = self._beats

    def _report_ended(self, job):
        if self.scheduler:
            self._ended_jobs.put(job)

    def _take_ended(self, pending, block):
        """Move the ended jobs waiting for the report loop into pending; true if close() asked
        the loop to stop."""
        stopping = False
        try:
            while True:
                job = self._ended_jobs.get(block=block and not stopping and not pending)
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
        except queue.Empty:
            pass
        return stopping

    def _report_loop(self):
        """Tell the scheduler of each ended job at once (it starts a queued job in the slot),
        several per call when they end together. While the scheduler cannot be reached the ends
        wait, the oldest dropped past JOB_END_BACKLOG: a restarted scheduler learns them."""
        scheduler = RPCClient(self.scheduler, security=self.security, timeout=self.rpc_timeout)
        pending, failures, stopping, sent_at = deque(), 0, False, 0.0
        while not stopping or pending:
            stopping = self._take_ended(pending, block=not pending and not stopping) or stopping
            pause = sent_at + JOB_END_GAP - time.monotonic()
            if pause > 0 and not stopping:  # an end after a report waits out the gap, with others
                time.sleep(pause)
                stopping = self._take_ended(pending, block=False)
            sent_at = time.monotonic()
            dropped = max(0, len(pending) - JOB_END_BACKLOG)
            if dropped:  # never reported: a restarted scheduler learns them from jobs()
                for _ in range(dropped):
                    pending.popleft()
                with self.jobs_lock:
                    self._unreported -= dropped
            batch = [pending[i] for i in range(min(len(pending), 200))]
            try:
                with self.jobs_lock:
                    structs = [job.to_struct() for job in batch]
                answered = self._beats_answered
                scheduler.call("job_ended", self.worker_id,
                               [{key: struct[key] for key in JOB_END_KEYS if key in struct}
                                for struct in structs])
                with self.jobs_lock:
                    self._unreported -= len(batch)
                if self._beats != answered:  # that heartbeat may count these jobs: one more
                    self._beat_now.set()
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
            while self._starting:  # no start outlives close(): each ends in the list below
                self._job_changed.wait()
            # Running jobs, and ended ones whose waiter is still writing: none outlives close().
            running = [job for job in self._jobs.values() if not job.finished.is_set()]
        self.server.close()
        stoppers = [threading.Thread(target=self._stop_job, args=(job, "stopped")) for job in running]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self._timeouts.close()
        self._closed.set()
        self._beat_now.set()
        self._ended_jobs.put(None)
        if self._registered:  # here, not in the heartbeat thread: it may be stuck in a call
            # Briefly (a scheduler that does not answer sees the worker offline after three
            # missed heartbeats), but long enough for a busy one, and for a TLS handshake.
            scheduler = RPCClient(self.scheduler, security=self.security,
                                  timeout=min(2.0, self.rpc_timeout or 2.0))
            try:
                scheduler.call("deregister", self.worker_id)
            except JobschedError as e:
                log.warning("could not deregister: %s", e)
            scheduler.close()
        for thread in self._threads:  # daemon threads: one stuck in a call is not waited for
            thread.join(timeout=0.1)
        self.state.close()
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

    def _job_env(self, env):
        """The worker's environment without JOBSCHED_*, plus the job's env; with --allow or
        --allow-env, only names that --allow-env allows."""
        for name in env:
            if name in (JOB_ID_VARIABLE, WORKER_ID_VARIABLE):
                raise BadRequest("env %s is set by the worker" % name)
            if self._env_restricted and not any(fnmatch.fnmatchcase(name, allowed)
                                                for allowed in self.allow_env):
                raise BadRequest("env %s is not allowed on this worker (see --allow-env)"
                                 % _short(name))
        job_env = dict(self._base_env)
        job_env.update(env)
        return job_env

    def start(self, command, path, options=None):
        """Start ``[command] + ([path] if path else []) + args``; no shell. Returns the job_id."""
        want_str(command, "command", empty=False)
        want_str(path, "path")
        opts = parse_job_options(options if options is not None else {})
        env = self._job_env(opts["env"])
        if self.allowed:
            executable = self._resolve_executable(command, env.get("PATH"))
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
        self.metrics.inc("jobsched_jobs_started_total")
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
        """Write down the intent, spawn the job marked with its ids, start its waiter."""
        job = Job(job_id, self.worker_id, command, path, opts["args"])
        env[JOB_ID_VARIABLE], env[WORKER_ID_VARIABLE] = job_id, self.worker_id
        out = self.state.begin(job_id, job.to_record())
        try:
            job.process = self.spawner.spawn(argv, out, opts["cwd"], env, opts.get("executable"))
        except OSError as e:
            self.state.abandon(job_id)
            reason = "%s%s" % (e.strerror or e, ": " + str(e.filename) if e.filename else "")
            if isinstance(e, FileNotFoundError) and " " in argv[0] \
                    and e.filename in (None, argv[0]):
                reason += " (commands do not go through a shell: use sh -c '...')"
            raise BadRequest(self._cannot_start(argv, reason))
        except (ValueError, TypeError) as e:
            self.state.abandon(job_id)
            raise BadRequest(self._cannot_start(argv, e))
        finally:
            os.close(out)
        job.pid = job.process.pid
        with self.jobs_lock:
            self._jobs[job_id] = job
        if opts["timeout"] is not None:
            self._timeouts.add(job_id, opts["timeout"])
        # threading.Thread.start() would wait for the new thread to run: a quarter of a start.
        _thread.start_new_thread(self._wait_for, (job,))
        return job

    def _cannot_start(self, argv, reason):
        return "cannot start %s on worker %s (%s): %s" % (_short(argv[0]), self.worker_id,
                                                          socket.gethostname(), reason)

    def _wait_for(self, job):
        """The waiter: once the leader has exited, SIGKILL what is left of its process group,
        reap it, record the outcome under the lock, then write it down."""
        held = False  # the leader is an unreaped zombie: its group id cannot be reused
        if hasattr(os, "waitid"):
            try:
                os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)
                held = True
            except ChildProcessError:
                pass
        else:  # macOS before Python 3.13: reap first; the group id is then free again
            job.process.wait()
        with self.jobs_lock:
            job.exited = True  # from now on neither stop nor timeout signals the group
        killed = held or not hasattr(os, "waitid")  # macOS: after reaping, a window of microseconds
        if killed:
            signal_group(job.pid, signal.SIGKILL)  # no process outlives the job in its group
        returncode = job.process.wait()
        if killed and not wait_group_gone(job.pid):
            log.warning("job %s: processes of its group still alive 2 s after SIGKILL", job.job_id)
        self._timeouts.cancel(job.job_id)
        output_bytes = self.state.output_size(job.job_id)  # final: no writer is left in the group
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
            self._unreported += bool(self.scheduler)  # until _report_loop has told it
            # Under jobs_lock, so that a scrape sees these bytes in the counter or in the job.
            self.metrics.job_ended(job.state, job.finished_at - job.started_at, output_bytes)
            self._job_changed.notify_all()
            record = job.to_record()
        self._report_ended(job)  # to the scheduler at once: its queue may use the slot
        self.state.record(job.job_id, record)
        log.info("job %s %s%s", job.job_id, job.state, ": " + job.error_text if job.error_text else "")
        self._expire_jobs()
        job.finished.set()
        job.finished = _ENDED  # waiters hold the set Event; later ones get the shared one

    def _get(self, job_id):
        return lookup(self._jobs, self.jobs_lock, job_id, "job")

    def _signal_running(self, job, signum, reason):
        """Signal the job's process group if its leader has not exited; true if sent.

        Under jobs_lock, with job.exited false and the leader not a zombie yet, the waiter has
        not reaped it, so the group id is the job's. A job whose leader exited first is recorded
        as it ended, never as stopped."""
        with self.jobs_lock:
            if job.done or job.exited or job.process is None or leader_exited(job.pid):
                return False
            if job.stop_reason is None:
                job.stop_reason = reason
            signal_group(job.pid, signum)
            return True

    def _stop_job(self, job, reason):
        """TERM the group, KILL it after the grace period; true once the job has ended."""
        if not self._signal_running(job, signal.SIGTERM, reason):
            return job.finished.wait(self.stop_grace + 3.0)  # ended, or its waiter is finishing
        log.info("job %s: stopping (%s)", job.job_id, reason)
        if not job.finished.wait(self.stop_grace):
            self._signal_running(job, signal.SIGKILL, reason)
            return job.finished.wait(3.0)
        return True

    def _timed_out(self, job_id):
        with self.jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None:
            self._stop_job(job, "timeout")

    def stop(self, job_id):
        """TERM the job's process group, KILL it after the grace period; true once it has ended."""
        if not self._stop_job(self._get(job_id), "stopped"):
            raise Unavailable("job %s has not ended 3 s after SIGKILL" % job_id)
        return True

    def query(self, job_id):
        """The job's struct."""
        return self._struct(self._get(job_id))

    def _struct(self, job):
        with self.jobs_lock:
            struct = job.to_struct()
        if not struct["done"]:
            struct["output_bytes"] = wire_int(self.state.output_size(job.job_id))
            struct["stop_grace"] = self.stop_grace  # how long a stop of it may take
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

    def _output_reply(self, job_id, offset, max_bytes, wait_seconds=0):
        """output() as the RPC answers it (see dumps_output_reply)."""
        return _RelayedReply(dumps_output_reply(self.output(job_id, offset, max_bytes,
                                                            wait_seconds)))

    def _read_output(self, job_id, offset, max_bytes):
        try:
            with open(self.state.output_path(job_id), "rb") as f:
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
                 "client", "client_tls", "labels")

    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.address = self.hostname = self.version = self.client = None
        self.slots, self.running, self.heartbeat, self.stop_grace = 1, 0, 0.0, 5.0
        self.last_seen, self.seen_at = time.time(), time.monotonic()
        self.tls = self.deregistered = self.reported_offline = self.client_tls = False
        self.labels = {}  # replaced as a whole, never changed in place

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
            "heartbeat": self.heartbeat, "labels": self.labels,
        })


# -- the queue: specs, entries, jobs, and the journal that keeps them --------------------------

MAX_SUBMIT_JOBS = 100000      # jobs one submit() may queue, arrays counted in full
QUEUE_HISTORY = 100000        # ended queue jobs (and ends of other jobs) the scheduler remembers
#: the refusal of a change asked for after the scheduler closed its journal
SCHEDULER_SHUTTING_DOWN = ("the scheduler is shutting down: nothing was done; "
                           "try again once it is back")
COMPACT_MIN_BYTES = MiB       # the queue's journal is never rewritten below this size
SCHEDULER_MAX_REQUEST = 64 * MiB  # a submit of 100000 `true N` jobs, ids included, is 34 MB of XML


def default_scheduler_state_dir():
    return os.path.join(os.path.dirname(default_state_dir()), "scheduler")


def _want_bool(value, name):
    if not isinstance(value, bool):
        raise BadRequest("%s must be a boolean, not %s" % (name, type(value).__name__))
    return value


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
    "on": lambda value, name: parse_on(value, name),
    "all": lambda value, name: _want_bool(value, name),
    "job_id": want_job_id,
}


def _key_of_given(job_id, spec):
    """The queue's key of a spec whose job id the caller gave: the id, or for an array (whose
    id ends in -000000000000) its first 24 characters."""
    return job_id[:24] if "array" in spec else job_id


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
    if "job_id" in spec:
        if spec.get("all"):
            raise BadRequest("%s.job_id cannot be given with all (a job per worker)" % name)
        if "array" in spec and not spec["job_id"].endswith("-000000000000"):
            raise BadRequest("%s.job_id of an array must end in -000000000000 (it is the id of "
                             "index 0; the others count up in its last 12 digits)" % name)
    spec["command"] = sys.intern(spec["command"])  # the same command, many times over
    return spec


class QueueEntry:
    """One spec of a submit() call: one job, or an array of ``count`` jobs that differ only in
    ``JOBSCHED_ARRAY_INDEX``, whose ids are ``key`` (24 characters of a UUID) plus the index in
    the last 12 hex digits. An array's jobs become QueueJobs one at a time, as they are taken from
    the queue, so 10000 waiting jobs cost one object. Fields guarded by JobQueue.lock."""
    __slots__ = ("key", "seq", "submitted_at", "spec", "count", "next", "skip", "unmet",
                 "cancelled", "size", "met", "too_large_on")

    def __init__(self, key, seq, submitted_at, spec):
        self.key, self.seq, self.submitted_at = key, seq, submitted_at
        self.spec, self.count = spec, spec.get("array")  # spec: the fields given
        self.next = self.size = 0  # next index to take; bytes of its journal record
        self.unmet = 0         # dependencies not met yet; -1: all met before a restart
        self.skip = None       # indices >= next cancelled one by one
        self.cancelled = None  # the reason, once the whole entry is cancelled
        self.met = None        # the dependencies met so far, while others are not
        self.too_large_on = None  # workers that refused its start as over their --max-request

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
        entry.met = set(spec.pop("met_deps", ())) or None
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


def _without(worker_ids, refused):
    """worker_ids (a sequence) less those in refused (a set, often empty: then worker_ids)."""
    return [worker_id for worker_id in worker_ids if worker_id not in refused] if refused else worker_ids


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
        self._heaps = {"": []}  # "", a pinned worker_id or an on_key() -> heap of (order, item)
        self._labels = {}  # worker_id -> labels of the online workers, as of the last plan()
        #: (heap target, frozenset of workers that refused it as too large) -> heap of items
        #: taken out of their heap until a worker that may take them has a free slot
        self._parked = {}
        self._parked_stale = False  # a job was cancelled: parked ones may no longer wait
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
        self._journal, self._journal_bytes, self._seq, self._pending = None, 0, 0, []
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
            self._closed = True  # a request still being served must not be acknowledged now
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
        with self.journal_lock:
            had = self.had(specs)  # a caller's job id submitted again is not queued again
            keys = [_key_of_given(spec.pop("job_id"), spec) if "job_id" in spec
                    else str(uuid.uuid4())[:24] if "array" in spec else "%s%012x" % (call_key, k)
                    for k, spec in enumerate(specs)]
            new = [(key, spec) for k, (key, spec) in enumerate(zip(keys, specs)) if k not in had]
            if not new:
                return keys
            first, self._seq = self._seq, self._seq + len(new)
            line = json.dumps({"b": {"ids": [key for key, _ in new], "seq": first, "at": now,
                                     "specs": [spec for _, spec in new]}},
                              separators=(",", ":")) + "\n"
            try:
                self._write_line(line, sync=True)
            except OSError as e:
                raise self._unwritten(e)
            with self.lock:
                for seq, (key, spec) in enumerate(new, first):
                    entry = self._add(QueueEntry(key, seq, now, spec), len(line) // len(new))
                    self._wait_for_dependencies(entry, dep_states)
            self._flush()
        return keys

    def had(self, specs):
        """The indices of the parsed specs whose ``job_id`` (given by the caller) this queue has
        had: the same spec submitted again, its answer lost, not to be queued twice. Fault 2 if
        such an id, or one of an array's, was another job's, or twice in specs."""
        given = [spec["job_id"] for spec in specs if "job_id" in spec]
        if len(set(given)) < len(given):
            raise BadRequest("a job_id is given twice in one submit")
        if not given:
            return set()
        with self.lock:
            return {k for k, spec in enumerate(specs) if "job_id" in spec and self._had(spec)}

    def _had(self, spec):
        job_id, canonical = spec["job_id"], functools.partial(json.dumps, sort_keys=True)
        key = _key_of_given(job_id, spec)
        item = self._ids.get(key) if "array" in spec else None
        found = (item, 0, None) if isinstance(item, QueueEntry) else self._find(job_id)
        if found is None:
            taken = [job_id] if "array" not in spec else (
                "%s%012x" % (key, i) for i in range(spec["array"]))
            for one in taken:  # an array's ids may have been given to single jobs
                if one in self._ids or one in self._ended_elsewhere:
                    raise BadRequest("job_id %s is taken by another job: give each job a new "
                                     "UUID" % one)
            return False
        mine = {name: value for name, value in spec.items() if name != "job_id"}
        if found[0].key != key or canonical(found[0].spec) != canonical(mine):  # as on disk
            raise BadRequest("job_id %s is taken by another job: give each job a new UUID"
                             % job_id)
        return True

    def _add(self, entry, size):
        """Know entry, which takes about size bytes of a line (an array: its own size, which
        each of its jobs' records repeats in a rewritten journal)."""
        if entry.count is not None and entry.count > 1:
            size = len(json.dumps(entry.record(), separators=(",", ":")))
        entry.size = size
        self._ids[entry.key] = entry
        if entry.cancelled is not None:
            self._live_bytes += size
            self._remember(entry)
        elif entry.remaining() > 0:
            self._live_bytes += size
            self._entries[entry] = None
        elif entry.count is not None:  # a used-up array, from a rewritten journal
            self._remember(entry)
        return entry

    def _wait_for_dependencies(self, entry, dep_states=None):
        """Count entry's unmet dependencies and wait for them, or cancel it if one failed
        (under lock). Unknown ones are looked up in dep_states, else asked of the workers."""
        met = entry.unmet == -1 or entry.next > 0  # known before a restart
        entry.unmet = 0
        for dep in () if met else entry.spec.get("after", ()):
            if entry.met and dep in entry.met:
                continue  # met before a restart (the queue may have forgotten dep since)
            state = self._state_of(dep)
            if state is _UNKNOWN:
                state = (dep_states or {}).get(dep)
                if dep_states is None or dep not in dep_states:
                    self._ask.add(dep)
            if state == "succeeded":
                self._met(entry, dep)
                continue
            if state is not None:
                reason = "cancelled: dependency %s ended %s" % (dep, state)
                for job_id, _ in self._cancel_entry(entry, reason):
                    self._resolve(job_id, "cancelled")
                return
            entry.unmet += 1
            self._waiters.setdefault(dep, []).append(entry)
        if entry.unmet == 0:
            if not met and entry.spec.get("after"):
                self._note("m", entry.key)  # met already: its dependencies may be forgotten
            self._push(entry)

    def _met(self, entry, dep):
        """One of entry's dependencies has succeeded, others may not have: noted, so that a
        restart knows it when the queue has forgotten dep (under lock)."""
        if entry.met is None:
            entry.met = set()
        if dep not in entry.met:
            entry.met.add(dep)
            self._note("n", [entry.key, dep])

    def _push(self, item):
        entry = item if isinstance(item, QueueEntry) else item.entry
        spec = entry.spec
        target = spec.get("worker_id") or (on_key(spec["on"]) if spec.get("on") else "")
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
        on = entry.spec.get("on")
        if on and not any(labels_match(labels, on) for labels in online.values()):
            return "no online worker matches %s" % format_labels(on)
        if entry.too_large_on:
            refused = sorted(entry.too_large_on)
            named = ", ".join(refused[:3]) + (" and %d more" % (len(refused) - 3) if len(refused) > 3
                                              else "")
            if any(worker_id not in entry.too_large_on and (not on or labels_match(labels, on))
                   for worker_id, labels in online.items()):
                return "waiting for a free slot on a worker other than %s (over their " \
                       "--max-request)" % named
            return "no online worker takes it: over the --max-request of %s" % named
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

    def describe(self, job_id, online=None):
        """What the queue knows of job_id: (struct, None, None) for a job waiting, cancelled or
        ended; (None, worker_id, extras) for one on a worker (its struct is the worker's, plus
        extras); None if the queue does not know it. online: {worker_id: labels} of the online
        workers, which say why a job waits."""
        online = online or {}
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

    def __len__(self):
        """The number of jobs waiting in the queue (for a slot, a dependency or a worker)."""
        with self.lock:
            return sum(entry.remaining() for entry in self._entries) + len(self._requeued)

    def first_waiting(self, online, limit):
        """Structs of the first ``limit`` waiting jobs, in queue order."""
        return self.listing(online, limit)[0]

    def listing(self, online=None, limit=None):
        """(structs of the waiting jobs in queue order (the first ``limit`` only, if given),
        {job_id: extras} of the queue's jobs that reached a worker, structs of the ended ones,
        for those no worker lists); online as for describe()."""
        online = online or {}
        with self.lock:
            waiting = [(entry.order(i), entry, i, None) for entry in self._entries
                       for i in range(entry.next, entry.count or 1) if entry.waits(i)]
            waiting += [(job.entry.order(job.index), job.entry, job.index, job)
                        for job in self._requeued]
            if limit is not None:
                waiting = heapq.nsmallest(limit, waiting, key=lambda item: item[0])
                structs = []
                for position, (_, entry, index, job) in enumerate(waiting, 1):
                    struct = entry.struct(entry.job_id(index), "queued")
                    struct.update(position=position, reason=self._reason(entry, online))
                    structs.append(struct)
                return structs, {}, []
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
        """Hand waiting jobs to free slots: workers is [(worker_id, slots, labels)] of the online
        ones, ties going to the first. Answers ({worker_id: [QueueJob]} to start, {worker_id:
        [QueueJob]} to settle), after the intents are on disk. A worker with jobs to settle
        gets nothing else until started(..., settle=True) is told how that went."""
        now = time.monotonic()
        starts, settles, free = {}, {}, {}
        with self.journal_lock:
            with self.lock:
                self._labels = {worker_id: labels for worker_id, _, labels in workers}
                for worker_id, slots, _ in workers:
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
                self._unpark(free)
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
                    if not self._closed:
                        log.error("cannot write dispatch intents to the queue journal: %s", e)
                    with self.lock:
                        for worker_id, jobs in starts.items():
                            for job in jobs:
                                self._requeue(job)
                    starts = {}
            self._maybe_compact()
        return starts, settles

    def _take(self, free):
        """The next job to start and its worker, given {worker_id: free slots}; (None, None).
        A heap's target is "" (any worker), a pinned worker_id, or an on_key() (the workers
        whose labels match)."""
        best = None
        targets = [""] + [worker_id for worker_id in free if worker_id in self._heaps]
        targets += [key for key in self._heaps if isinstance(key, tuple) and self._heaps[key]]
        for target in targets:
            heap = self._heaps[target]
            takers = self._takers(target, free)
            if not takers:
                continue  # no free worker matches: every job of this heap waits
            while heap and (not self._ready(heap[0][3]) or not self._fits(heap[0][3], takers)):
                item = heapq.heappop(heap)
                if self._ready(item[3]):  # too large for every free worker that may take it
                    refused = frozenset(self._entry_of(item[3]).too_large_on)
                    heapq.heappush(self._parked.setdefault((target, refused), []), item)
            if heap and (best is None or heap[0][:3] < best[1][:3]):
                best = (target, heap[0], takers)
        if best is None:
            return None, None
        target, (_, _, _, item), takers = best
        worker_id = max(self._fits(item, takers), key=free.get)
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

    def _takers(self, target, free, refused=frozenset()):
        """The workers of free (ids) that may take the jobs of the heap of target: its pinned
        worker, those whose labels match, or any; less those in refused."""
        if isinstance(target, tuple):
            takers = self._matching(target, free)
        else:
            takers = free if not target else (target,) if target in free else ()
        return _without(takers, refused)

    @staticmethod
    def _entry_of(item):
        return item if isinstance(item, QueueEntry) else item.entry

    def _fits(self, item, takers):
        """The workers of takers (ids) that a heap's item is not too large for."""
        return _without(takers, self._entry_of(item).too_large_on)

    def _unpark(self, free):
        """Put back in their heaps as many of the parked jobs as the workers of free that may
        take them have free slots, first ones first (under lock): a round costs one test per
        set of refusing workers, plus the jobs it puts back. After a cancel, the parked jobs
        that no longer wait are dropped."""
        stale, self._parked_stale = self._parked_stale, False
        for key in list(self._parked):
            group = self._parked.get(key)
            if group is None:
                continue
            if stale:
                group[:] = [item for item in group if self._ready(item[3])]
                heapq.heapify(group)
            takers = self._takers(key[0], free, key[1])
            room = sum(free[worker_id] for worker_id in takers)
            while group and room > 0:
                item = heapq.heappop(group)
                if not self._ready(item[3]):
                    continue
                refused = frozenset(self._entry_of(item[3]).too_large_on)
                if refused != key[1]:  # refused by more workers since: back if one may take it
                    if self._takers(key[0], free, refused):
                        heapq.heappush(self._heaps[key[0]], item)
                    else:
                        heapq.heappush(self._parked.setdefault((key[0], refused), []), item)
                    continue
                heapq.heappush(self._heaps[key[0]], item)
                room -= 1
            if not group:
                del self._parked[key]

    def _elsewhere(self, entry, refusing):
        """True if an online worker besides refusing, and those entry was too large for, may
        take entry's jobs (under lock)."""
        if entry.spec.get("worker_id"):
            return False
        on, refused = entry.spec.get("on"), entry.too_large_on or ()
        return any(worker_id != refusing and worker_id not in refused and
                   (not on or labels_match(labels, on)) for worker_id, labels in self._labels.items())

    def _matching(self, key, workers):
        """The workers (ids) whose labels match the on_key() key."""
        on = dict(key[1:])
        return [worker_id for worker_id in workers
                if labels_match(self._labels.get(worker_id, {}), on)]

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
                    elif isinstance(answer, _TooLarge) and self._elsewhere(job.entry, worker_id):
                        job.entry.too_large_on = (job.entry.too_large_on or set()) | {worker_id}
                        self._requeue(job)
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
        """A worker's report of ended jobs (job structs); worker_id None: learnt by asking.
        After close() a report is refused (Unavailable), not taken unwritten: its worker keeps
        it and tells the restarted scheduler."""
        with self.journal_lock:
            if self._closed and self.state_dir and worker_id is not None:
                raise Unavailable(SCHEDULER_SHUTTING_DOWN)
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
                if entry.cancelled is not None or entry not in self._entries:
                    continue  # cancelled, or each of its jobs cancelled one by one
                if state == "succeeded":
                    entry.unmet -= 1
                    if entry.unmet == 0:
                        self._note("m", entry.key)
                        self._push(entry)
                    else:
                        self._met(entry, dep)
                    continue
                reason = "cancelled: dependency %s ended %s" % (dep, state)
                ended += self._cancel_entry(entry, reason)

    def _cancel_entry(self, entry, reason):
        """Cancel every job entry has left (under lock; it has not started any); answers
        [(job id, "cancelled")] of those that something may wait for."""
        entry.cancelled = reason
        self._parked_stale = bool(self._parked)
        self._note("x", [entry.key, reason])
        if entry in self._entries:
            del self._entries[entry]  # its size stays live: it is history now
        self._remember(entry)
        self._log_end(entry.key)
        if entry.count is None:
            return [(entry.key, "cancelled")]
        return [(job_id, "cancelled")
                for job_id in sorted(self._waiters) if job_id[:24] == entry.key]

    def _bytes_to_keep(self):
        """About what a rewrite of the journal would write, counted afresh (under lock): the
        waiting entries, the cancelled ones still remembered, and a record for each job known."""
        return (sum(entry.size for entry in self._entries)
                + sum(item.size for item in self._history
                      if not isinstance(item, QueueJob) and item.cancelled is not None)
                + sum(item.entry.size + JOB_RECORD_BYTES for item in self._ids.values()
                      if isinstance(item, QueueJob)))

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
                self._parked_stale = bool(self._parked)
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
        x cancelled, m dependencies met, n one dependency met; j (rewrites only) a job and
        its state. Kept in the
        order made: a restart replays the history as it was remembered."""
        self._pending.append((kind, item))

    def _flush(self, sync=False):
        """Append the changes noted, in order, a line per run of one kind (under journal_lock).
        If sync, they are on disk or this raises Unavailable; otherwise a failure is logged: what
        was not fsynced is found again after a crash from the intents, the workers and the
        dependencies."""
        pending, self._pending = self._pending, []
        if not pending:
            return self._maybe_compact()
        try:
            self._write_line("".join(
                json.dumps({kind: [item for _, item in run]}, separators=(",", ":")) + "\n"
                for kind, run in itertools.groupby(pending, key=lambda note: note[0])), sync)
        except OSError as e:
            if sync:
                raise self._unwritten(e)
            if not self._closed:  # else what a crash would lose: found again at start-up
                log.error("cannot append to the queue journal: %s", e)
        self._maybe_compact()

    def _unwritten(self, e):
        """The fault for a change that could not be written (OSError e): nothing was done."""
        if e.errno == errno.ESHUTDOWN:
            return Unavailable(e.strerror)
        return Unavailable("cannot write the queue journal in %s: %s"
                           % (self.state_dir, e.strerror or e))

    _closed = False  # set by close(); under journal_lock

    def _write_line(self, text, sync):
        if self._journal is None:
            if self._closed and self.state_dir:  # a request still served after close()
                raise OSError(errno.ESHUTDOWN, SCHEDULER_SHUTTING_DOWN)
            return  # in memory only, or replaying the journal
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
            # The waiting entries; then the history (ended jobs, cancelled and used-up entries)
            # in its order, so that a restart forgets what this queue would have forgotten
            # next; then the jobs that have not ended.
            entries = list(self._entries)
            history = [item for item in self._history
                       if self._ids.get(item.job_id if isinstance(item, QueueJob) else item.key)
                       is item]
            jobs = [item for item in self._ids.values()
                    if isinstance(item, QueueJob) and item.state != "ended"]
        items = entries + history + jobs
        lines = []
        for _, run in itertools.groupby(enumerate(items), lambda pair: (
                isinstance(pair[1], QueueJob), pair[0] // 1000)):  # a kind, 1000 at most a line
            run = [item for _, item in run]
            if isinstance(run[0], QueueJob):
                lines.append(json.dumps({"j": [job.record() for job in run]},
                                        separators=(",", ":")) + "\n")
            else:
                lines.append(json.dumps({"s": [self._entry_record(entry) for entry in run]},
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

    @staticmethod
    def _entry_record(entry):
        """An entry as a rewritten journal keeps it: its spec and how far it has got."""
        record = entry.record()
        record.update(without_none({
            "next": entry.next or None, "skip": sorted(entry.skip or ()) or None,
            "cancelled": entry.cancelled,
            "met": 1 if entry.unmet == 0 and entry.spec.get("after") else None,
            "met_deps": sorted(entry.met) if entry.met and entry.unmet else None}))
        return record

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
            self._live_bytes = self._bytes_to_keep()  # replay's own count forgot what it never had
            for item in list(self._ids.values()):
                if not isinstance(item, QueueJob):
                    continue
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
            self._pending = []  # what follows from the journal is found again at each start
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
            old = self._ids.get(entry.key)
            if old is None or batch:  # submitted: a new id, or one forgotten and given again,
                if isinstance(old, QueueEntry) and old.count is not None:  # which is the one
                    for index in range(old.count):  # its ids name from now on
                        job = self._ids.get(old.job_id(index))
                        if isinstance(job, QueueJob) and job.entry is not entry:
                            del self._ids[job.job_id]
                self._add(entry, size // len(entries))
        spent, jobs = {}, record.get("j", ())
        for job_id, spec, index, state, worker_id, outcome in jobs:
            self._seq = max(self._seq, spec["seq"] + 1)  # no entry of it may be left waiting
            entry = self._ids.get(spec["id"])
            if not isinstance(entry, QueueEntry) or entry.seq != spec["seq"]:
                if spec["id"] not in spent:  # its size: its job's share of the line, less a job's
                    spent[spec["id"]] = QueueEntry.from_record(spec)
                    spent[spec["id"]].size = max(0, size // len(jobs) - JOB_RECORD_BYTES)
                entry = spent[spec["id"]]
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
        for key, dep in record.get("n", ()):
            entry = self._ids.get(key)
            if isinstance(entry, QueueEntry) and entry.cancelled is None:
                entry.met = (entry.met or set()) | {dep}
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


# -- the index of placed jobs -----------------------------------------------------------------

class JobIndex:
    """Which worker each job was placed on, for about the newest JOB_INDEX_LIMIT job ids. In
    memory only: after a restart, a job the scheduler does not know is asked of the online
    workers, and their answers fill the index again.

    The newest JOB_INDEX_SEGMENT ids are a dict of strings. Then they are packed into a segment:
    sorted arrays of the two 64-bit halves of each UUID and of the worker's number, 20 bytes a
    job instead of about 130 as a string in a dict. (An id that is not a UUID in canonical form,
    which only a worker of another make could list, stays a string in the segment's dict.) A
    lookup tries the dict, then the segments newest first; past the limit, the oldest segment
    is dropped whole. Not thread-safe: the scheduler calls it under its workers_lock."""

    def __init__(self):
        self._newest = {}          # job_id -> worker number
        self._segments = deque()   # (highs, lows, numbers, others), oldest first
        self._packed = 0           # ids in the segments
        self._numbers = {}         # worker_id -> its number, for as long as the scheduler runs
        self._worker_ids = []      # number -> worker_id

    def __len__(self):
        return len(self._newest) + self._packed

    def add(self, job_id, worker_id):
        number = self._numbers.get(worker_id)
        if number is None:
            number = self._numbers[worker_id] = len(self._worker_ids)
            self._worker_ids.append(worker_id)
        elif self.get(job_id) == worker_id:
            return  # known: listed again, it takes no room
        self._newest[job_id] = number  # a segment's older entry for the id no longer counts
        if len(self._newest) >= JOB_INDEX_SEGMENT:
            self._pack()

    def get(self, job_id, default=None):
        number = self._newest.get(job_id)
        if number is None:
            number = self._find(job_id)
        return default if number is None else self._worker_ids[number]

    def _find(self, job_id):
        n = _uuid_int(job_id)
        for highs, lows, numbers, others in reversed(self._segments):
            if n is None:
                if job_id in others:
                    return others[job_id]
                continue
            high, low = n >> 64, n & 0xFFFFFFFFFFFFFFFF
            i = bisect.bisect_left(highs, high)
            while i < len(highs) and highs[i] == high:
                if lows[i] == low:
                    return numbers[i]
                i += 1
        return None

    def _pack(self):
        pairs, others = [], {}
        for job_id, number in self._newest.items():
            n = _uuid_int(job_id)
            if n is None:
                others[job_id] = number
            else:
                pairs.append((n, number))
        pairs.sort()
        self._segments.append((array.array("Q", [n >> 64 for n, _ in pairs]),
                               array.array("Q", [n & 0xFFFFFFFFFFFFFFFF for n, _ in pairs]),
                               array.array("I", [number for _, number in pairs]), others))
        self._packed += len(self._newest)
        self._newest = {}
        while len(self) > JOB_INDEX_LIMIT and self._segments:
            highs, _, _, others = self._segments.popleft()
            self._packed -= len(highs) + len(others)


class Scheduler(_Role):
    """The cluster's front door: a registry of workers, a router for their jobs, and a queue.

    Library use: ``Scheduler(listen="127.0.0.1:0", state_dir=DIR)``, then start_serving() (or
    ``with``), ``address``, close(). RPCs: register, deregister, heartbeat, job_ended, start,
    start_all, submit, stop, query, output, wait, jobs, workers, info; JSON routes POST /start
    /start_all /submit /stop /query, GET /workers /jobs, and the status pages. The queue (see
    JobQueue) is kept in ``state_dir``; without one, in memory only. Workers register again
    after a restart; jobs it does not know are asked of the online workers in parallel."""

    def __init__(self, listen=DEFAULT_SCHEDULER, rpc_timeout=10.0,
                 max_request=SCHEDULER_MAX_REQUEST, read_timeout=30.0, token=None, tls_cert=None,
                 tls_key=None, tls_ca=None, insecure=False, security=None, state_dir=None):
        self.security = security or Security(token, tls_cert, tls_key, tls_ca, insecure)
        self.rpc_timeout = rpc_timeout
        self.workers_lock = threading.Lock()
        #: guards self._workers, self._job_index, self._round_robin and every WorkerRecord
        self._workers = {}     # worker_id -> WorkerRecord, in registration order
        self._job_index = JobIndex()
        self._round_robin = 0
        self._closed = threading.Event()
        self.metrics = Metrics()
        self._began = time.time()  # jobs that ended before are not counted as finished
        self._dispatch_wanted = threading.Event()  # wakes the dispatcher thread
        #: workers whose heartbeat came while jobs were queued, for the dispatcher to offer jobs
        #: to again; guarded by the GIL (set.add, set.pop)
        self._heard = set()
        #: held by the one thread asking the workers how lost dependencies ended
        self._asking = threading.Lock()
        self.server = RPCServer(listen, self.security, {
            "register": self.register, "deregister": self.deregister,
            "heartbeat": self.heartbeat, "start": self.start, "stop": self.stop,
            "start_all": self.start_all,
            "query": functools.partial(self.query, relay=True),
            "output": functools.partial(self.output, relay=True),
            "jobs": self.jobs,
            "workers": self.workers, "info": self.info,
            "submit": lambda jobs: dumps_id_array(expand_job_ids(*self._submit(jobs), ID_ITEM)),
            "wait": self.wait, "job_ended": self.job_ended,
        }, json_routes={
            ("POST", "/start"): self._json_start, ("POST", "/stop"): self._json_stop,
            ("POST", "/start_all"): self._json_start_all,
            ("POST", "/query"): self._json_query, ("POST", "/submit"): self._json_submit,
            ("GET", "/workers"): lambda request: (200, {"workers": self.workers()}),
            ("GET", "/jobs"): lambda request: (200, {"jobs": self.jobs()}),
        }, max_request=max_request, read_timeout=read_timeout,
            page_routes=StatusPages(self).routes(), metrics=self.metrics,
            inline_methods=("heartbeat",))
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
        """Log each worker that goes silent, once, and close the connections to it; every
        IDLE_SWEEP_SECONDS, close the connections idle for RPCClient.idle_timeout (a pass over
        1000 workers' pools takes milliseconds of the GIL: not twice a second)."""
        next_sweep = 0.0
        while not self._closed.wait(0.5):
            now, silent, clients = time.monotonic(), [], []
            sweep = now >= next_sweep
            if sweep:
                next_sweep = now + IDLE_SWEEP_SECONDS
            with self.workers_lock:
                for rec in self._workers.values():
                    online = rec.online(now)
                    if not online and not rec.reported_offline and not rec.deregistered:
                        silent.append((rec.worker_id, now - rec.seen_at, rec.client))
                    elif sweep and online and rec.client is not None:
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
        if "labels" in info:
            want_info_labels(info)
            fields["labels"] = info["labels"]
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
        self.queue.recheck(worker_id)
        self._dispatch_wanted.set()
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
        """A worker's periodic sign of life; fault 1 "unknown worker" asks it to register again.
        Answered on the server's parking thread when it comes on a parked connection: nothing
        here may wait for I/O or for a lock held long."""
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
        if self.queue.has_work():
            self._heard.add(worker_id)  # not queue.try_again() here: see _dispatch_loop
            self._dispatch_wanted.set()
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
                "hostname": socket.gethostname(), "queued": len(self.queue)}

    def _worker(self, worker_id):
        return lookup(self._workers, self.workers_lock, worker_id, "worker")

    def _online_worker(self, rec, job_id=None):
        """rec if it is online; else fault 3 naming it, when it was last seen (and the job)."""
        now = time.monotonic()
        with self.workers_lock:
            if rec.online(now):
                return rec
            address, silent = rec.address, now - rec.seen_at
        raise Unavailable("%sworker %s (%s, last seen %d s ago) is offline" % (
            "job %s: " % job_id if job_id else "", rec.worker_id, address, round(silent)))

    def _no_worker_took(self, refusals):
        """Fault 3's message when no worker took a job; refusals: [(worker_id, error)], in order."""
        now = time.monotonic()
        with self.workers_lock:
            registered = len(self._workers)
            online = [rec for rec in self._workers.values() if rec.online(now)]
            slots = sum(rec.slots for rec in online)
        if not online or not refusals:
            return "no worker is online (%d registered, %d online)" % (registered, len(online))
        # Worker.start's own words for a full worker; any other refusal is worth reporting.
        others = [(worker_id, e) for worker_id, e in refusals
                  if not str(e).startswith("worker is full")]
        if others:
            return "worker %s refused the job: %s" % others[-1]
        return "no worker has a free slot (%d online, all %d slots busy)" % (len(online), slots)

    def _remember(self, *pairs):
        """Index (job_id, worker_id) pairs, forgetting the oldest past JOB_INDEX_LIMIT; a
        thousand at a time, so that a long listing lets heartbeats and starts in between."""
        for at in range(0, len(pairs), 1000):
            with self.workers_lock:
                for job_id, worker_id in pairs[at:at + 1000]:
                    self._job_index.add(job_id, worker_id)

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
            for rec in itertools.chain(itertools.islice(records, first, None),
                                       itertools.islice(records, first)):
                free = rec.slots - rec.running
                if best_free is not None and free <= best_free:
                    continue  # the cheap test first: a thousand records are looked at
                if rec.worker_id not in tried and rec.online(now) and (accept is None or accept(rec)):
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
        options, on = split_on(options)
        options = {key: value for key, value in parse_job_options(
            options if options is not None else {}).items() if value}
        job_id, placed = options.get("job_id"), None
        if job_id is None:  # named here: placed nowhere yet
            job_id = options["job_id"] = str(uuid.uuid4())
        else:
            with self.workers_lock:
                placed = self._job_index.get(job_id)
        if placed and worker_id not in ("", placed):
            raise BadRequest("job %s was placed on worker %s, not %s" % (job_id, placed, _short(worker_id)))
        if placed or worker_id:
            rec = self._online_worker(self._worker(placed or worker_id))
            self._check_on(rec, on)
            with self.workers_lock:
                rec.running += 1
            return self._start_on(rec, command, path, options)
        tried, refusals, accept = set(), [], self._acceptor(on)
        while True:
            rec = self._pick_worker(tried, accept)
            if rec is None:
                raise Unavailable(self._no_worker_took(refusals))
            try:
                return self._start_on(rec, command, path, options)
            except OutcomeUnknown:
                raise
            except (Unavailable, _TooLarge) as e:  # full, disk full, shutting down, never
                # reached, or the job over its --max-request: next
                log.info("worker %s refused a job: %s", rec.worker_id, e)
                tried.add(rec.worker_id)
                refusals.append((rec.worker_id, e))

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
        self.metrics.inc("jobsched_jobs_started_total")
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
            return self._online_worker(self._worker(worker_id), job_id), job_id
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
            reply = rec.client.call("query", job_id, relay=relay)
            self._count_finished([job_end(reply, job_id)])
            return reply
        struct, worker_id, extras = found
        if struct is None:
            struct = self._online_worker(self._worker(worker_id), ids[-1]).client.call(
                "query", ids[-1])
            struct.update(extras)
        return struct

    def _online_ids(self):
        """{worker_id: labels} of the online workers."""
        now = time.monotonic()
        with self.workers_lock:
            return {rec.worker_id: rec.labels for rec in self._workers.values() if rec.online(now)}

    def output(self, job_id, offset, max_bytes, wait_seconds=0, *, relay=False):
        """The job's output from offset, as the worker's output() answers it.

        The RPC passes relay=True: the worker's reply (up to a MiB of base64) goes on unparsed."""
        wait = min(want_number(wait_seconds, "wait_seconds"), MAX_WAIT_SECONDS)
        offset = want_number(offset, "offset", integer=True)
        max_bytes = min(want_number(max_bytes, "max_bytes", integer=True), MAX_OUTPUT_CHUNK)
        deadline = time.monotonic() + wait
        where = self.queue.wait_to_start(job_id, deadline) if isinstance(job_id, str) else None
        if where in ("queued", "ended"):  # no output: while queued, or never started
            return {"data": xmlrpc.client.Binary(b""), "offset": wire_int(offset),
                    "eof": where == "ended"}
        if where is not None:
            rec = self._online_worker(self._worker(where), job_id)
        else:
            rec, job_id = self._route((job_id,))
        wait = max(0.0, deadline - time.monotonic())
        return rec.client.call("output", job_id, wire_int(offset), max_bytes, wait,
                               timeout=self.rpc_timeout + wait, relay=relay)

    def jobs(self):
        """The queue's waiting jobs in queue order, then every job of every online worker
        (asked in parallel), then the queue's ended jobs that no worker listed."""
        waiting, extras, ended = self.queue.listing(self._online_ids())
        jobs, placed = [], []
        for rec, result in self._ask_online("jobs"):
            if isinstance(result, list):
                jobs.extend(result)
                # Index fresh copies: the listing's own strings would keep the memory of the
                # whole parsed listing allocated (100000 jobs: 150 MB of RSS instead of 15 MB).
                placed.extend((job["job_id"].encode().decode(), rec.worker_id) for job in result)
            else:
                log.warning("worker %s did not list its jobs: %s", rec.worker_id, result)
        self._remember(*placed)
        self._count_finished([(job["job_id"], job.get("state", ""), job["finished_at"])
                              for job in jobs if job.get("finished_at", 0) >= self._began])
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
        if any("all" in spec for spec in specs):
            specs = self._spread(specs)
        if sum(spec.get("array", 1) for spec in specs) > MAX_SUBMIT_JOBS:
            raise BadRequest("at most %d jobs per submit, arrays counted in full" % MAX_SUBMIT_JOBS)
        had = self.queue.had(specs)  # sent again: checked when it was queued (before a restart)
        given = [spec["job_id"] for k, spec in enumerate(specs)
                 if "job_id" in spec and k not in had]
        with self.workers_lock:  # held for lookups only: 100000 specs are read outside it
            known_workers = set(self._workers)
            started = {job_id: self._job_index.get(job_id) for job_id in given}
        dep_states = {}
        for i, spec in enumerate(specs):
            if i in had:
                continue
            if started.get(spec.get("job_id")):
                raise BadRequest("jobs[%d].job_id %s is taken by a job placed on worker %s: "
                                 "give each job a new UUID"
                                 % (i, spec["job_id"], started[spec["job_id"]]))
            if spec.get("worker_id") and spec["worker_id"] not in known_workers:
                raise NotFound("jobs[%d].worker_id: worker not found: %s"
                               % (i, _short(spec["worker_id"])))
            if spec.get("worker_id") and spec.get("on"):
                self._check_on(self._worker(spec["worker_id"]), spec["on"])
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

    def _spread(self, specs):
        """Each spec with ``all`` true stands for one job per matching online worker, pinned to
        it (fault 3 if none matches); specs with ``all`` false are as they were."""
        spread = []
        for i, spec in enumerate(specs):
            if not spec.pop("all", False):
                spread.append(spec)
                continue
            if spec.get("worker_id"):
                raise BadRequest("jobs[%d]: all and worker_id exclude each other" % i)
            try:
                records = self._matching_online(spec.get("on") or {})
            except Unavailable as e:
                raise Unavailable("jobs[%d].all: %s" % (i, e))
            spread.extend(dict(spec, worker_id=rec.worker_id) for rec in records)
        return spread

    def job_ended(self, worker_id, jobs):
        """A worker's report of jobs that ended (their structs, or JOB_END_KEYS of them), sent
        at once: the scheduler starts queued jobs in the freed slots and settles what waits on
        them; true."""
        want_str(worker_id, "worker_id", limit=256)
        if not isinstance(jobs, list):
            raise BadRequest("jobs must be an array of job structs")
        jobs = [want_struct(job, "jobs[%d]" % i) for i, job in enumerate(jobs)]
        self.queue.jobs_ended(worker_id, jobs)
        with self.workers_lock:
            rec = self._workers.get(worker_id)
            if rec is not None:  # until its next heartbeat tells the truth
                rec.running = max(0, rec.running - len(jobs))
        if self.queue.has_work():  # a queued job may take the slot; else no thread to wake
            self._dispatch_wanted.set()
        self._count_finished([(job["job_id"], job.get("state", ""), job.get("finished_at", 0))
                              for job in jobs if isinstance(job.get("job_id"), str)])
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
                # heartbeat() leaves this to us: it runs on the server's parking thread, which
                # must not wait for the queue's lock while a round holds it
                while self._heard:
                    self.queue.try_again(self._heard.pop())
                if self.queue.has_work():  # else not one look at a thousand workers
                    turn = self._dispatch(turn + 1)
                if self.queue.dependencies_to_ask() and self._asking.acquire(blocking=False):
                    _thread.start_new_thread(self._ask_dependencies, ())
            except Exception:
                log.exception("internal error in the dispatcher")

    def _dispatch(self, turn):
        """One round of _dispatch_loop: plan, and call the workers that get jobs."""
        now = time.monotonic()
        with self.workers_lock:
            workers = [(rec.worker_id, rec.slots, rec.labels, rec.client)
                       for rec in self._workers.values()
                       if rec.online(now) and rec.client is not None]
        first = turn % len(workers) if workers else 0
        workers = workers[first:] + workers[:first]  # ties go round
        starts, settles = self.queue.plan([worker[:3] for worker in workers])
        for worker_id, _, _, client in workers:
            for calls, settle in ((starts, False), (settles, True)):
                if worker_id in calls:
                    _thread.start_new_thread(self._call_worker, (
                        worker_id, client, calls[worker_id], settle))
        return turn

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
                try:
                    self.queue.jobs_ended(worker_id, ended)
                except Unavailable:
                    pass  # shutting down: settled again after the restart
            if to_start:
                items = [jobs[i].entry.start_item(jobs[i].job_id, jobs[i].index) for i in to_start]
                replies = self._start_many(client, items)
                for i, reply in zip(to_start, replies):
                    answers[i] = reply
                started = sum(isinstance(reply, str) for reply in replies)
                if started:
                    self.metrics.inc("jobsched_jobs_started_total", amount=started)
        except Exception:
            log.exception("internal error while starting jobs on worker %s", worker_id)
        finally:
            self.queue.started(worker_id, jobs, answers, settle)
            self._dispatch_wanted.set()

    def _start_many(self, client, items):
        """The worker's reply to start_many(items), one per item: a job id, a fault, or None
        (the outcome is unknown). A call over the worker's --max-request is sent again in
        halves; a job too large for it alone fails with the worker's refusal."""
        try:
            return client.call("start_many", items)
        except _TooLarge as e:
            if len(items) == 1:
                return [e]
            half = len(items) // 2
            return self._start_many(client, items[:half]) + self._start_many(client, items[half:])
        except Unreachable:
            return [None] * len(items)  # it may have started them: settle later
        except JobschedError as e:
            return [e] * len(items)

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

    def _count_finished(self, ends):
        """Count each (job_id, state, finished_at) once in jobsched_jobs_finished_total, if the
        job ended since this scheduler started: it learns of ends from the workers' reports
        (job_ended), and from query and jobs."""
        self.metrics.inc_once("jobsched_jobs_finished_total", [
            (job_id, (state,)) for job_id, state, finished_at in filter(None, ends)
            if finished_at >= self._began])

    def _queued_for_page(self, limit):
        """The first ``limit`` queued jobs for the status page: structs with job_id, position,
        reason and what to run."""
        return self.queue.first_waiting(self._online_ids(), limit)

    # -- placement by labels, fan-out ----------------------------------------------------------

    def _matching_online(self, on):
        """The online workers whose labels match on, in registration order; fault 3 if none."""
        now = time.monotonic()
        with self.workers_lock:
            records = [rec for rec in self._workers.values()
                       if rec.online(now) and labels_match(rec.labels, on)]
        if not records:
            raise Unavailable("no online worker matches %s" % format_labels(on) if on
                              else self._no_worker_took([]))
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
            for rec in records:
                rec.running += 1  # held for _start_on, which gives it back if not started
        placed = [(rec, str(uuid.uuid4())) for rec in records]
        results = self._call_each(placed, lambda rec, job_id: self._start_on(
            rec, command, path, dict(options, job_id=job_id)))
        answer, started = [], 0
        for (rec, job_id), hostname, result in zip(placed, hostnames, results):
            entry = without_none({"worker_id": rec.worker_id, "hostname": hostname})
            if isinstance(result, OutcomeUnknown):
                entry["job_id"], entry["error"] = job_id, str(result)
            elif isinstance(result, JobschedError):
                entry["error"] = str(result)
            else:
                entry["job_id"] = result
                started += 1
            answer.append(entry)
        log.info("start_all: %s started on %d of %d workers", _short(command), started, len(placed))
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
# Status page and metrics
# ---------------------------------------------------------------------------------------------

#: name -> (type, label names, help) of every metric family, in the order they are written
METRIC_FAMILIES = {
    "jobsched_workers": ("gauge", ("state",), "Workers the scheduler knows, by state."),
    "jobsched_worker_slots": ("gauge", ("worker_id", "host"),
                              "Slots of each worker, as of its last heartbeat."),
    "jobsched_worker_running": ("gauge", ("worker_id", "host"),
                                "Jobs running on each worker, as of its last heartbeat and the "
                                "starts since."),
    "jobsched_jobs_queued": ("gauge", (), "Jobs waiting in the scheduler's queue."),
    "jobsched_jobs_running": ("gauge", (), "Jobs running on this worker."),
    "jobsched_slots": ("gauge", (), "Jobs this worker runs at once, at most."),
    "jobsched_jobs_started_total": ("counter", (), "Jobs started since this process started."),
    "jobsched_jobs_finished_total": ("counter", ("state",),
                                     "Jobs seen ending since this process started, by state."),
    "jobsched_rpc_requests_total": ("counter", ("method", "code"),
                                    "XML-RPC requests served, by method and fault code "
                                    "(0: no fault)."),
    "jobsched_rpc_duration_seconds": ("histogram", ("method",),
                                      "Time spent serving an XML-RPC request, by method."),
    "jobsched_job_duration_seconds": ("histogram", (), "Run time of the jobs that ended."),
    "jobsched_output_bytes_total": ("counter", (), "Bytes of output the jobs wrote."),
    "process_resident_memory_bytes": ("gauge", (), "Resident memory size in bytes."),
    "process_cpu_seconds_total": ("counter", (), "Total user and system CPU time spent in seconds."),
    "process_open_fds": ("gauge", (), "Number of open file descriptors."),
    "process_start_time_seconds": ("gauge", (),
                                   "Start time of the process since unix epoch in seconds."),
}
HISTOGRAM_BUCKETS = {
    "jobsched_rpc_duration_seconds": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "jobsched_job_duration_seconds": (0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                                      10800.0, 43200.0, 86400.0),
}
FINISHED_STATES = ("succeeded", "failed", "stopped", "timeout", "lost")  # always written, 0 or not
COUNTED_IDS_LIMIT = 100000    # job ids the scheduler remembers as counted in finished_total
PAGE_JOBS = 100               # finished (and queued) jobs the status page lists
PAGE_OUTPUT = MiB             # output shown on a job's page: all of it, or the last MiB


def escape_label(value):
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(names, values):
    if not names:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (name, escape_label(value))
                             for name, value in zip(names, values))


def metric_number(value):
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Metrics:
    """One process's counters and histograms for ``GET /metrics``.

    Counters only grow while the process lives: nothing survives a restart (Prometheus reads the
    drop to zero as one). Callers use inc(), inc_once(), observe_rpc(), job_ended() and
    samples(). The lock is a leaf: it may be taken under another lock and never takes one."""

    def __init__(self):
        self.lock = threading.Lock()
        #: guards self._counters ((name, label values) -> number), self._histograms ((name,
        #: label values) -> [count per bucket, +Inf last, then the sum]) and self._counted
        self._counters = {}
        self._histograms = {}
        self._counted, self._counted_order = set(), deque()  # ids inc_once took, oldest first
        #: the sample lines of a worker by (worker_id, host, slots, running), so that a scrape
        #: does not format a thousand unchanged workers again; guarded by the GIL (single get,
        #: set and clear calls)
        self.worker_lines = {}
        #: the last scrape's keys of every worker, in order, and the two families' text made of
        #: them, taken as they are while no worker changed; replaced whole (under the GIL)
        self.worker_text = None

    def inc(self, name, labels=(), amount=1):
        with self.lock:
            self._counters[name, labels] = self._counters.get((name, labels), 0) + amount

    def inc_once(self, name, items):
        """Count each (key, label values) of items whose key no earlier call counted (of the
        last COUNTED_IDS_LIMIT keys)."""
        if not items:
            return
        with self.lock:
            for key, labels in items:
                if key in self._counted:
                    continue
                self._counted.add(key)
                self._counted_order.append(key)
                if len(self._counted_order) > COUNTED_IDS_LIMIT:
                    self._counted.discard(self._counted_order.popleft())
                self._counters[name, labels] = self._counters.get((name, labels), 0) + 1

    def _observe(self, name, labels, value):  # under self.lock
        counts = self._histograms.get((name, labels))
        if counts is None:
            counts = self._histograms[name, labels] = [0] * (len(HISTOGRAM_BUCKETS[name]) + 1) + [0.0]
        counts[bisect.bisect_left(HISTOGRAM_BUCKETS[name], value)] += 1
        counts[-1] += value

    def observe_rpc(self, method, code, seconds):
        with self.lock:
            key = ("jobsched_rpc_requests_total", (method, str(code)))
            self._counters[key] = self._counters.get(key, 0) + 1
            self._observe("jobsched_rpc_duration_seconds", (method,), seconds)

    def job_ended(self, state, seconds, output_bytes):
        with self.lock:
            key = ("jobsched_jobs_finished_total", (state,))
            self._counters[key] = self._counters.get(key, 0) + 1
            self._observe("jobsched_job_duration_seconds", (), max(0.0, seconds))
            key = ("jobsched_output_bytes_total", ())
            self._counters[key] = self._counters.get(key, 0) + output_bytes

    def samples(self, counters=(), histograms=()):
        """{family: [(suffix, labels text, value)]} of what was counted, with the families named
        in counters and histograms present even when nothing was counted yet."""
        with self.lock:
            counted = dict(self._counters)
            observed = {key: list(counts) for key, counts in self._histograms.items()}
        samples = {name: [] for name in tuple(counters) + tuple(histograms)}
        for (name, labels), value in sorted(counted.items()):
            samples.setdefault(name, []).append(("", label_text(METRIC_FAMILIES[name][1], labels),
                                                 value))
        for (name, labels), counts in sorted(observed.items()):
            names, rows, total = METRIC_FAMILIES[name][1] + ("le",), samples.setdefault(name, []), 0
            for bound, count in zip(HISTOGRAM_BUCKETS[name] + (float("inf"),), counts):
                total += count
                rows.append(("_bucket", label_text(names, labels + (metric_number(bound),)), total))
            rows.append(("_sum", label_text(names[:-1], labels), counts[-1]))
            rows.append(("_count", label_text(names[:-1], labels), total))
        return samples


_RELAYED_FINISHED_AT = re.compile(
    rb"<name>finished_at</name>\s*<value>\s*<(?:double|int|i4|i8)>\s*([-+0-9.eE]{1,40})<")
_RELAYED_STATE = re.compile(rb"<name>state</name>\s*<value>\s*(?:<string>)?([A-Za-z_]{1,40})<")


def job_end(reply, job_id):
    """(job_id, state, finished_at) from a query's answer, a struct or a relayed reply; None
    while the job has not ended."""
    if isinstance(reply, dict):
        return (job_id, reply.get("state", ""), reply["finished_at"]) if "finished_at" in reply else None
    finished_at = _RELAYED_FINISHED_AT.search(reply.body)
    if finished_at is None:
        return None
    state = _RELAYED_STATE.search(reply.body)
    return job_id, state.group(1).decode() if state else "", float(finished_at.group(1))


@functools.lru_cache(maxsize=None)
def _process_start_time():
    try:  # Linux: clock ticks after boot (field 22 of stat) plus the boot time
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rpartition(b")")[2].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = int(next(line for line in f if line.startswith(b"btime ")).split()[1])
        return boot + ticks / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT  # elsewhere: when jobsched was imported, close enough for a server


_IMPORTED_AT = time.time()


def _open_fds():
    """How many file descriptors this process has open. Linux 6.2 and later give the count as
    the size of /proc/self/fd: listing it costs 0.7 ms for a scheduler with 1000 workers."""
    try:
        return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd")) - 1
    except OSError:  # macOS
        return len(os.listdir("/dev/fd")) - 1  # less the listing's own


def process_samples():
    """The process_* families every Prometheus client library writes (Linux: from /proc)."""
    times = os.times()
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # macOS: the peak, in bytes there
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"process_resident_memory_bytes": [("", "", rss)],
            "process_cpu_seconds_total": [("", "", times[0] + times[1])],
            "process_open_fds": [("", "", _open_fds())],
            "process_start_time_seconds": [("", "", _process_start_time())]}


def metrics_text(samples):
    """The Prometheus text format 0.0.4 of {family: [(suffix, labels text, value)] or
    [sample line, ...]}."""
    out = []
    for name, (kind, _, help_text) in METRIC_FAMILIES.items():
        rows = samples.get(name)
        if rows is None:
            continue
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))
        if rows and isinstance(rows[0], str):  # a family's rows are all of one kind
            out.extend(rows)
        else:
            out.extend(["%s%s%s %s\n" % (name, row[0], row[1], metric_number(row[2]))
                        for row in rows])
    return "".join(out).encode("utf-8")


def metrics_reply(text):
    return 200, text, "text/plain; version=0.0.4; charset=utf-8", (("Cache-Control", "no-store"),)


def _queued_count(scheduler):
    queue = getattr(scheduler, "queue", None)
    return None if queue is None else len(queue)


def scheduler_metrics(scheduler):
    now = time.monotonic()
    with scheduler.workers_lock:
        keys = [(rec.worker_id, rec.hostname or rec.address or "", rec.slots, rec.running)
                for rec in scheduler._workers.values()]
        online = len([rec for rec in scheduler._workers.values() if rec.online(now)])
    samples = scheduler.metrics.samples(
        ("jobsched_jobs_started_total", "jobsched_rpc_requests_total"),
        ("jobsched_rpc_duration_seconds",))
    samples["jobsched_workers"] = [("", '{state="online"}', online),
                                   ("", '{state="offline"}', len(keys) - online)]
    last = scheduler.metrics.worker_text
    if last is None or last[0] != keys:
        cache = scheduler.metrics.worker_lines
        if len(cache) > 2 * len(keys) + 1000:  # slot counts changed since: start afresh
            cache.clear()
        lines = [cache.get(key) or cache.setdefault(key, _worker_lines(*key)) for key in keys]
        last = scheduler.metrics.worker_text = (keys, "".join([line[0] for line in lines]),
                                                "".join([line[1] for line in lines]))
    samples["jobsched_worker_slots"] = [last[1]]
    samples["jobsched_worker_running"] = [last[2]]
    queued = _queued_count(scheduler)
    if queued is not None:
        samples["jobsched_jobs_queued"] = [("", "", queued)]
    _zero_finished_states(samples)
    samples.update(process_samples())
    return metrics_text(samples)


def _worker_lines(worker_id, host, slots, running):
    labels = '{worker_id="%s",host="%s"}' % (escape_label(worker_id), escape_label(host))
    return ("jobsched_worker_slots%s %d\n" % (labels, slots),
            "jobsched_worker_running%s %d\n" % (labels, running))


def worker_metrics(worker):
    with worker.jobs_lock:  # the counter and the running jobs' files, from the same instant
        running = [job.job_id for job in worker._jobs.values() if not job.done]
        samples = worker.metrics.samples(
            ("jobsched_jobs_started_total", "jobsched_output_bytes_total"),
            ("jobsched_job_duration_seconds",))
        slots = worker.slots
    samples["jobsched_jobs_running"] = [("", "", len(running))]
    samples["jobsched_slots"] = [("", "", slots)]
    ended = samples["jobsched_output_bytes_total"]
    growing = sum(worker.state.output_size(job_id) for job_id in running)
    samples["jobsched_output_bytes_total"] = [("", "", (ended[0][2] if ended else 0) + growing)]
    _zero_finished_states(samples)
    samples.update(process_samples())
    return metrics_text(samples)


def _zero_finished_states(samples):
    rows = samples.setdefault("jobsched_jobs_finished_total", [])
    seen = {labels for _, labels, _ in rows}
    rows.extend(("", labels, 0) for labels in ('{state="%s"}' % state for state in FINISHED_STATES)
                if labels not in seen)
    rows.sort()


# -- the browser pages ------------------------------------------------------------------------

_PAGE_STYLE = """
:root { color-scheme: light dark; --bad: #b00020; --bad-bg: #fde7ea; --ok: #1b7f3b;
        --muted: #666; --line: #ddd; --head: #f4f4f4; }
@media (prefers-color-scheme: dark) {
  :root { --bad: #ff8a80; --bad-bg: #4a1c20; --ok: #7bd88f; --muted: #aaa; --line: #444;
          --head: #222; }
}
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       padding: 0 12px 24px; max-width: 1400px; }
header { display: flex; gap: 12px; align-items: baseline; padding: 10px 0;
         border-bottom: 1px solid var(--line); }
header a { font-weight: bold; font-size: 18px; text-decoration: none; }
h1 { font-size: 18px; word-break: break-all; } h2 { font-size: 16px; margin: 20px 0 6px; }
.muted, .when { color: var(--muted); font-size: 12px; }
.summary { font-size: 15px; } .summary b { font-size: 18px; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; min-width: 100%; }
th, td { text-align: left; padding: 4px 10px 4px 0; border-bottom: 1px solid var(--line);
         white-space: nowrap; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.cmd { font-family: ui-monospace, Menlo, Consolas, monospace; max-width: 40em;
         overflow: hidden; text-overflow: ellipsis; }
tr.bad td { background: var(--bad-bg); } .bad, tr.bad td.state { color: var(--bad); font-weight: bold; }
.ok { color: var(--ok); } .off { color: var(--muted); }
table.struct th { width: 1%; }
table.struct td { white-space: pre-wrap; word-break: break-all; font-family: ui-monospace, Menlo, monospace; }
pre#output { white-space: pre-wrap; word-break: break-all; padding: 8px; margin: 0;
             border: 1px solid var(--line); background: var(--head); min-height: 2em;
             font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; }
form { display: inline; } button { font-size: 14px; padding: 4px 14px; }
"""

_PAGE_SCRIPT = """
"use strict";
(function () {
  var main = document.getElementById("main");
  function get(path, accept) {
    /* location.origin: a URL that carries user:token@ may not be fetched */
    return fetch(location.origin + path, {headers: {"Accept": accept}, cache: "no-store",
                                          credentials: "same-origin"});
  }
  function swap(html) {
    var page = new DOMParser().parseFromString(html, "text/html");
    var fresh = page.getElementById("main");
    if (!fresh) { return; }
    document.title = page.title;
    var wide = main.querySelectorAll(".scroll"), left = [], i;
    for (i = 0; i < wide.length; i++) { left.push(wide[i].scrollLeft); }
    main.innerHTML = fresh.innerHTML;
    wide = main.querySelectorAll(".scroll");
    for (i = 0; i < wide.length && i < left.length; i++) { wide[i].scrollLeft = left[i]; }
  }
  function reload() {
    return get(location.pathname, "text/html").then(function (reply) {
      if (!reply.ok) { throw new Error("HTTP " + reply.status); }
      return reply.text();
    }).then(swap);
  }
  function refresh() {
    var selecting = String(window.getSelection()).length > 0;  /* keep what is being copied */
    (selecting ? Promise.resolve() : reload()).catch(function () {}).then(function () {
      setTimeout(refresh, 2000);
    });
  }
  function follow(output) {
    var offset = Number(output.getAttribute("data-offset")), shown = output.textContent.length;
    var decoder = new TextDecoder("utf-8"), url = output.getAttribute("data-follow");
    function next() {
      get(url + "?wait=10&offset=" + offset, "text/plain").then(function (reply) {
        if (!reply.ok) { throw new Error("HTTP " + reply.status); }
        var eof = reply.headers.get("X-Jobsched-Eof") === "1";
        offset = Number(reply.headers.get("X-Jobsched-Offset"));
        return reply.arrayBuffer().then(function (data) {
          var text = decoder.decode(data, {stream: !eof});
          var atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 8;
          if (text) { output.appendChild(document.createTextNode(text)); shown += text.length; }
          if (shown > 2 * 1048576) {  /* keep the page light: the last MiB or so */
            output.textContent = output.textContent.slice(-1048576);
            shown = output.textContent.length;
          }
          if (atEnd && text) { window.scrollTo(window.scrollX, document.body.scrollHeight); }
          if (eof) { return reload(); }
          next();
        });
      }).catch(function () { setTimeout(next, 1000); });
    }
    next();
  }
  if (main.getAttribute("data-refresh")) { setTimeout(refresh, 2000); }
  var output = document.getElementById("output");
  if (output && output.getAttribute("data-follow")) { follow(output); }
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%(title)s</title>
%(noscript)s<style>%(style)s</style>
</head>
<body>
<header><a href="/">jobsched</a><span class="muted">%(heading)s</span></header>
<main id="main"%(refresh)s>
%(main)s
</main>
<script>%(script)s</script>
</body>
</html>
"""


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


#: headers of every page: only the page's own style and script run, nothing loads from elsewhere
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src %s; style-src %s; "
     "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
     % (_csp_hash(_PAGE_SCRIPT), _csp_hash(_PAGE_STYLE))),
    ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store"),
)


def _page(status, title, main, heading="", refresh=False, reload=False):
    """A whole page. refresh: its script fetches it again every 2 s and swaps <main>; refresh
    or reload: without JavaScript, the browser reloads it every 2 s."""
    text = _PAGE % {
        "title": html.escape(title), "heading": html.escape(heading), "main": main,
        "noscript": ('<noscript><meta http-equiv="refresh" content="2"></noscript>\n'
                     if refresh or reload else ""),
        "refresh": ' data-refresh="2"' if refresh else "", "style": _PAGE_STYLE,
        "script": _PAGE_SCRIPT}
    return status, text.encode("utf-8", "replace"), "text/html; charset=utf-8", PAGE_HEADERS


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _duration(seconds):
    seconds = max(0.0, seconds)
    if seconds < 60:
        return "%.1f s" % seconds
    if seconds < 3600:
        return "%d m %02d s" % divmod(int(seconds), 60)
    return "%d h %02d m" % divmod(int(seconds) // 60, 60)


def _job_line(job):
    """The job's name if it has one, else its command line."""
    if job.get("name"):
        return str(job["name"])
    return " ".join([str(job.get("command", ""))] + ([job["path"]] if job.get("path") else [])
                    + [str(a) for a in job.get("args", [])])


def _exit(job):
    if "exit_code" in job:
        return str(job["exit_code"])
    return "signal %s" % job["signal"] if "signal" in job else "-"


def _bad(job):
    return job.get("done") and job.get("state") not in ("succeeded", "stopped")


def cluster_summary(workers, jobs, queued, now):
    """The one-screen figures of `status` and the status page."""
    online = [w for w in workers if w.get("online")]
    last_hour = [j for j in jobs if j.get("done") and j.get("finished_at", 0) >= now - 3600]
    return {
        "workers_online": len(online), "workers_total": len(workers),
        "slots_busy": sum(max(0, w.get("running", 0)) for w in online),
        "slots_total": sum(w.get("slots", 0) for w in online),
        "jobs_queued": queued, "jobs_running": sum(j.get("state") == "running" for j in jobs),
        "succeeded_last_hour": sum(j["state"] == "succeeded" for j in last_hour),
        "failed_last_hour": sum(bool(_bad(j)) for j in last_hour),
        "stopped_last_hour": sum(j["state"] == "stopped" for j in last_hour),
    }


def _table(headings, rows):
    """rows: [(row class, [cell html, ...])]; cells are already escaped."""
    out = ['<div class="scroll"><table>\n<tr>%s</tr>\n' % "".join("<th>%s</th>" % h for h in headings)]
    for css, cells in rows:
        out.append('<tr%s>%s</tr>\n' % (' class="%s"' % css if css else "", "".join(cells)))
    if not rows:
        out.append('<tr><td class="muted" colspan="%d">none</td></tr>\n' % len(headings))
    out.append("</table></div>\n")
    return "".join(out)


def _labels_text(labels):
    if isinstance(labels, dict):
        return ", ".join("%s=%s" % item for item in sorted(labels.items()))
    if isinstance(labels, (list, tuple)):
        return ", ".join(map(str, labels))
    return str(labels)


def _job_link(job_id):
    return '<a href="/jobs/%s" title="%s">%s</a>' % (
        html.escape(urllib.parse.quote(job_id, safe="")), html.escape(job_id), html.escape(job_id[:8]))


class StatusPages:
    """The scheduler's routes for people and for Prometheus.

    ``GET /``: the status page. ``GET /jobs/JOB_ID``: the job's page if the client accepts
    text/html, else its JSON struct. ``GET /jobs/JOB_ID/output?offset=N&wait=S``: its raw output
    from offset N (up to 1 MiB), waiting up to S seconds for some, with X-Jobsched-Offset and
    X-Jobsched-Eof headers. ``POST /jobs/JOB_ID/stop``: stop it (a browser is sent back to the
    job's page). ``GET /metrics``. All of them behind the same token and TLS as the RPCs."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def routes(self):
        return {("GET", "/"): self.index, ("GET", "/jobs/*"): self.job,
                ("POST", "/jobs/*"): self.stop,
                ("GET", "/metrics"): lambda request: metrics_reply(scheduler_metrics(self.scheduler))}

    def index(self, request):
        scheduler, now = self.scheduler, time.time()
        workers, jobs = scheduler.workers(), scheduler.jobs()
        queued = _queued_count(scheduler)
        summary = cluster_summary(workers, jobs, queued or 0, now)
        names = {w["worker_id"]: '%s <span class="muted">%s</span>' % (
            html.escape(w.get("hostname", "")), html.escape(w["worker_id"][:8])) for w in workers}
        failed = summary["failed_last_hour"]
        out = ['<p class="summary">workers <b>%(workers_online)d</b>/%(workers_total)d online'
               ' &middot; slots <b>%(slots_busy)d</b>/%(slots_total)d busy' % summary,
               ' &middot; <b>%d</b> queued' % summary["jobs_queued"] if queued is not None else "",
               ' &middot; <b>%(jobs_running)d</b> running &middot; last hour: '
               '<b>%(succeeded_last_hour)d</b> succeeded, ' % summary,
               '<b%s>%d</b> failed</p>\n' % (' class="bad"' if failed else "", failed),
               '<p class="when">as of %s &middot; refreshes every 2 s &middot; <a href="/">reload'
               '</a> &middot; <a href="/metrics">metrics</a></p>\n' % _when(now)]

        labelled = any(w.get("labels") for w in workers)
        rows = []
        for w in workers:
            cells = ['<td title="%s">%s</td>' % (html.escape(w["worker_id"]), names[w["worker_id"]]),
                     '<td class="%s">%s</td>' % (("ok", "online") if w.get("online") else ("bad", "offline")),
                     "<td>%s</td>" % html.escape(str(w.get("address", "")))]
            if labelled:
                cells.append("<td>%s</td>" % html.escape(_labels_text(w.get("labels") or "")))
            cells += ["<td>%s/%s</td>" % (w.get("running", 0), w.get("slots", 0)),
                      "<td>%s ago</td>" % _duration(now - w.get("last_seen", now)),
                      "<td>%s</td>" % html.escape(str(w.get("version", "")))]
            rows.append(("" if w.get("online") else "off", cells))
        out.append("<h2>Workers (%d)</h2>\n" % len(workers))
        out.append(_table(["worker", "state", "address"] + (["labels"] if labelled else [])
                          + ["slots used", "last seen", "version"], rows))

        if queued is not None:
            rows = [("", ["<td>%s</td>" % html.escape(str(q.get("position", i + 1))),
                          "<td>%s</td>" % _job_link(str(q.get("job_id", ""))),
                          '<td class="cmd">%s</td>' % html.escape(_job_line(q)),
                          "<td>%s</td>" % html.escape(str(q.get("reason", "")))])
                    for i, q in enumerate(scheduler._queued_for_page(PAGE_JOBS))]
            out.append("<h2>Queue (%d, the first %d shown)</h2>\n" % (queued, PAGE_JOBS)
                       if queued > PAGE_JOBS else "<h2>Queue (%d)</h2>\n" % queued)
            out.append(_table(["#", "job", "name or command", "reason"], rows))

        def job_rows(selected):
            return [("bad" if _bad(j) else "", [
                "<td>%s</td>" % _job_link(j["job_id"]),
                '<td class="cmd" title="%s">%s</td>' % ((html.escape(_job_line(j)),) * 2),
                "<td>%s</td>" % (names.get(j.get("worker_id"))
                                 or html.escape(str(j.get("worker_id", ""))[:8])),
                '<td class="state">%s</td>' % html.escape(str(j.get("state", ""))),
                "<td>%s</td>" % html.escape(_exit(j)),
                "<td>%s</td>" % _when(j.get("started_at")),
                "<td>%s</td>" % _duration((j.get("finished_at") or now) - j.get("started_at", now)),
            ]) for j in selected]
        columns = ["job", "name or command", "worker", "state", "exit", "started", "duration"]
        running = sorted((j for j in jobs if not j.get("done") and j.get("state") != "queued"),
                         key=lambda j: j.get("started_at", 0))
        finished = [j for j in jobs if j.get("done")]
        latest = sorted(finished, key=lambda j: j.get("finished_at", 0), reverse=True)[:PAGE_JOBS]
        out.append("<h2>Running (%d)</h2>\n" % len(running))
        out.append(_table(columns, job_rows(running)))
        out.append("<h2>Finished (the latest %d of %d)</h2>\n" % (len(latest), len(finished)))
        out.append(_table(columns, job_rows(latest)))
        title = "jobsched: %(workers_online)d/%(workers_total)d workers, %(jobs_running)d running" % summary
        return _page(200, title, "".join(out), heading=scheduler.address, refresh=True)

    @staticmethod
    def _job_path(request, tails):
        job_id, _, tail = request.path[len("/jobs/"):].partition("/")
        if not job_id or tail not in tails:
            raise NotFound("no such route: %s %s" % (request.verb, _short(request.path)))
        return job_id, tail

    def job(self, request):
        if request.path.endswith("/output"):
            return self.output(request)
        try:
            job_id, _ = self._job_path(request, ("",))
            job = self.scheduler.query(job_id)
        except JobschedError as e:
            return self._error(request, e)
        if not request.accepts_html():
            return 200, json.dumps(job).encode("utf-8"), "application/json", ()
        return self._job_page(job)

    def _job_page(self, job):
        job_id, running = job["job_id"], not job.get("done")
        size = int(job.get("output_bytes", 0))
        start = max(0, size - PAGE_OUTPUT)
        try:
            reply = self.scheduler.output(job_id, start, PAGE_OUTPUT) if size else None
            data, offset = (reply["data"].data, int(reply["offset"])) if reply else (b"", 0)
        except JobschedError as e:
            data, offset = ("(output unavailable: %s)" % e).encode(), start
        skip = 0  # the tail starts mid-character: drop its continuation bytes
        while start and skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
            skip += 1
        if running:  # follow from the start of a character the next read completes
            cut = len(data) - _incomplete_utf8_tail(data)
            offset -= len(data) - cut
            data = data[:cut]
        text = data[skip:].decode("utf-8", "replace")
        state = str(job.get("state", ""))
        out = ['<h1>Job %s <span class="state%s">%s</span></h1>\n' % (
            html.escape(job_id), " bad" if _bad(job) else "", html.escape(state))]
        if running or state == "queued":
            out.append('<form method="post" action="/jobs/%s/stop"><button type="submit">Stop'
                       '</button></form>\n' % html.escape(urllib.parse.quote(job_id, safe="")))
        rows = []
        for key in sorted(job):
            value = job[key]
            shown = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
            if key.endswith("_at") and isinstance(value, (int, float)):
                shown = "%s (%s)" % (value, _when(value))
            rows.append("<tr><th>%s</th><td>%s</td></tr>\n" % (html.escape(key), html.escape(shown)))
        out.append('<div class="scroll"><table class="struct">\n%s</table></div>\n' % "".join(rows))
        out.append("<h2>Output</h2>\n")
        if start:
            out.append('<p class="muted">The output is %d bytes; this is its last MiB. All of it: '
                       '<code>jobsched.py logs %s</code></p>\n' % (size, html.escape(job_id)))
        follow = (' data-follow="/jobs/%s/output" data-offset="%d"'
                  % (html.escape(urllib.parse.quote(job_id, safe="")), offset) if running else "")
        out.append('<pre id="output"%s>%s</pre>\n' % (follow, html.escape(text)))
        return _page(200, "job %s %s" % (job_id[:8], state), "".join(out),
                     heading=self.scheduler.address, reload=running)

    def output(self, request):
        try:
            job_id, _ = self._job_path(request, ("output",))
            try:
                offset = bounded_int(request.query.get("offset", "0"))
                wait = float(request.query.get("wait", "0"))
            except ValueError:
                raise BadRequest("offset must be a whole number and wait a number of seconds")
            reply = self.scheduler.output(job_id, offset, MAX_OUTPUT_CHUNK, wait)
        except JobschedError as e:
            return self._error(request, e)
        return 200, reply["data"].data, "text/plain; charset=utf-8", PAGE_HEADERS + (
            ("X-Jobsched-Offset", str(int(reply["offset"]))),
            ("X-Jobsched-Eof", "1" if reply["eof"] else "0"))

    def stop(self, request):
        try:
            job_id, _ = self._job_path(request, ("stop",))
            origin = request.headers.get("Origin")
            host = request.headers.get("Host", "")
            if (origin is not None and origin not in ("http://" + host, "https://" + host)) or \
                    request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return self._error(request, BadRequest("refused: the request came from another "
                                                       "site"), status=403)
            stopped = self.scheduler.stop(job_id)
        except JobschedError as e:
            return self._error(request, e)
        if request.accepts_html():
            return 303, b"", "text/plain", (("Location", "/jobs/" + urllib.parse.quote(job_id, safe="")),)
        return 200, json.dumps({"success": stopped}).encode("utf-8"), "application/json", ()

    def _error(self, request, error, status=None):
        status = status or HTTP_STATUS[error.code]
        if request.accepts_html():
            return _page(status, "jobsched: error", '<p class="bad">%s</p>\n<p><a href="/">back to '
                         'the status page</a></p>\n' % html.escape(str(error)),
                         heading=self.scheduler.address)
        return status, json.dumps({"error": str(error)}).encode("utf-8"), "application/json", ()


def _incomplete_utf8_tail(data):
    """How many bytes at the end of data begin a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80 or byte >= 0xF8:
            return 0
        if byte >= 0xC0:  # a lead byte: how long its character is
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if need > back else 0
    return 0


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------

def _speaks_tls(address, timeout):
    """True if address answers a TLS handshake as a TLS server would. The certificate is not
    verified: this only decides which error message a plain-HTTP client gives."""
    if ssl is None:
        return False
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            context.wrap_socket(sock).close()
        return True
    except ssl.SSLError as e:  # a TLS alert (e.g. "certificate required") is a TLS answer too
        return "ALERT" in str(e.reason)
    except (OSError, ValueError):
        return False


#: what a plain-HTTP request to a TLS port ends with: a reset (Python 3.6's server) or a reply
#: that is not HTTP (a TLS alert record)
_TLS_PORT_SYMPTOMS = (ConnectionResetError, BrokenPipeError, http.client.HTTPException)


class _PlainHTTPToTLS(Refused):
    """Plain HTTP met a TLS port: unlike other Unreachable errors, waiting will not help."""


class Client(RPCClient):
    """What programs and the command line call: one method per RPC of the scheduler and the
    worker (start, start_all, submit, stop, query, output, wait, jobs, workers, info, register,
    deregister, heartbeat), plus follow(). Same arguments as the RPCs; see RPCClient for addresses and errors.

    ``from_env()`` builds a client of the scheduler configured as the command line is. A client
    made with ``expect_role="scheduler"`` (as from_env() makes it) that finds a worker at its
    address says so; any client whose plain HTTP meets a TLS port says so. Both are found out
    on the error path only: a call that succeeds costs one round trip."""

    def __init__(self, address=DEFAULT_SCHEDULER, *args, expect_role=None, **kwargs):
        super().__init__(address, *args, **kwargs)
        self.expect_role = expect_role

    @classmethod
    def from_env(cls, **overrides):
        """A client of the scheduler, from the environment variables and defaults of the
        command line: ``address`` JOBSCHED_SCHEDULER (else 127.0.0.1:50000); the token read
        from ``token_file`` JOBSCHED_TOKEN_FILE, else ``token`` JOBSCHED_TOKEN; ``tls_ca``,
        ``tls_cert``, ``tls_key`` JOBSCHED_TLS_CA, _CERT, _KEY; ``timeout`` 10 s. A keyword
        given overrides its variable (None counts as not given); an explicit token wins over
        any token file."""
        variables = {"address": "JOBSCHED_SCHEDULER", "token_file": "JOBSCHED_TOKEN_FILE",
                     "token": "JOBSCHED_TOKEN", "tls_ca": "JOBSCHED_TLS_CA",
                     "tls_cert": "JOBSCHED_TLS_CERT", "tls_key": "JOBSCHED_TLS_KEY", "timeout": None}
        unknown = sorted(set(overrides) - set(variables))
        if unknown:
            raise TypeError("from_env() got an unexpected keyword argument %r" % unknown[0])
        settings = {}
        for name, variable in variables.items():
            settings[name] = overrides.get(name)
            if settings[name] is None and variable:
                settings[name] = os.environ.get(variable) or None
        token = overrides.get("token")
        if token is None:
            token = (read_token_file(settings["token_file"]) if settings["token_file"]
                     else settings["token"])
        timeout = settings["timeout"]
        return cls(settings["address"] or DEFAULT_SCHEDULER, token=token, tls_ca=settings["tls_ca"],
                   tls_cert=settings["tls_cert"], tls_key=settings["tls_key"],
                   timeout=10.0 if timeout is None else timeout, expect_role="scheduler")

    def call(self, method, *params, **kwargs):
        try:
            return super().call(method, *params, **kwargs)
        except (BadRequest, NotFound) as e:  # e.g. "unknown method workers", "job not found"
            raise self._wrong_role(e, method) from None
        except Unreachable as e:
            if self._tls_context is None and isinstance(e.__context__, _TLS_PORT_SYMPTOMS) \
                    and _speaks_tls(self.address, self.timeout):
                raise _PlainHTTPToTLS("%s speaks TLS: use https://%s or --tls-ca"
                                      % (self.address, self.address)) from None
            raise

    def _wrong_role(self, error, method):
        """error, or what to say instead if this client of the scheduler has met a worker."""
        if self.expect_role == "scheduler" and method != "info" and self._is_a_worker():
            return type(error)("%s is a jobsched worker, not the scheduler" % self.address)
        return error

    def _is_a_worker(self):
        try:
            info = super().call("info")
        except JobschedError:
            return False
        return isinstance(info, dict) and "worker_id" in info and info.get("role") != "scheduler"

    # Scheduler and worker share start, stop, query, output and jobs.
    def start(self, *args):
        """Worker: start(command, path[, options]); scheduler: start(worker_id, command, path[, options])."""
        return self.call("start", *args)

    def start_all(self, command, path, options=None):
        """Scheduler: start on every matching online worker; one struct per worker."""
        # The scheduler answers once every worker has, each within its own rpc timeout.
        return self.call("start_all", command, path, *([options] if options is not None else []),
                         timeout=self.timeout + 60)

    def submit(self, jobs):
        """Scheduler: queue job specs; their job ids, in order."""
        # The scheduler parses about 20000 specs a second, and more on a fast machine.
        reply = self.call("submit", jobs, relay=True,
                          timeout=self.timeout + len(jobs) / 5000.0).body
        job_ids = parse_id_array(reply)
        if job_ids is None:  # a fault, or another server's way of writing the array
            job_ids = self._relayed("submit", reply)
        return job_ids

    def wait(self, job_ids, wait_seconds=30):
        """Scheduler: [{job_id, state}] of those job_ids that have ended, once one has (or
        after wait_seconds)."""
        return self.call("wait", list(job_ids), wait_seconds, timeout=self.timeout + wait_seconds)

    def stop(self, *ids):
        """True once the job has ended: waits as long as its worker's grace period allows (a
        running job's struct tells it), plus the timeout."""
        job = self.query(*ids)
        margin = job["stop_grace"] + 5 if "stop_grace" in job else 60
        return self.call("stop", *ids, timeout=self.timeout + margin)

    def query(self, *ids):
        return self.call("query", *ids)

    def output(self, job_id, offset=0, max_bytes=MAX_OUTPUT_CHUNK, wait_seconds=0):
        body = self.call("output", job_id, wire_int(offset), max_bytes, wait_seconds,
                         timeout=self.timeout + wait_seconds, relay=True).body
        reply = parse_output_reply(body)
        if reply is None:  # a fault, or another server's way of writing the struct
            reply = self._relayed("output", body)
            reply["data"] = reply["data"].data
            reply["offset"] = int(reply["offset"])
        return reply

    def _relayed(self, method, body):
        """The result of a reply the transport handed over unparsed; its fault raised as
        call() raises it."""
        try:
            return loads_request(body)[0][0]
        except xmlrpc.client.Fault as fault:
            error = error_from_fault(fault)
            if isinstance(error, (BadRequest, NotFound)):
                error = self._wrong_role(error, method)
            raise error from None
        except (pyexpat.ExpatError, xmlrpc.client.ResponseError, IndexError, ValueError,
                JobschedError):
            raise Unreachable("%s sent a reply that is not XML-RPC" % self.address) from None

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


def _positive(kind, zero=False):
    """An argparse type: a number of this kind above zero (or zero too)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError("%r is not a %s %s" % (
                text, "non-negative" if zero else "positive", kind.__name__))
        return value
    return convert


def _job_timeout(text):
    """An argparse type: a job timeout the workers accept."""
    seconds = _positive(float)(text)
    if not 0.001 <= seconds <= MAX_JOB_TIMEOUT:
        raise argparse.ArgumentTypeError("%r is not between 0.001 and %d seconds"
                                         % (text, MAX_JOB_TIMEOUT))
    return seconds


def _security_from_args(args):
    token = read_token_file(args.token_file) if args.token_file else _env("JOBSCHED_TOKEN")
    return Security(token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                    insecure=getattr(args, "insecure", False))


def _client_from_args(args):
    return Client.from_env(address=args.scheduler, token_file=args.token_file,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           timeout=args.rpc_timeout)


def _say(text):
    """A client command's message: one line on stderr."""
    print("jobsched: " + text, file=sys.stderr, flush=True)


def _stdout_closed():
    """stdout's reader has gone: point fd 1 at /dev/null, so that what is still buffered goes
    nowhere at exit instead of failing again ("Exception ignored ..."). Returns 141, as SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _is_uuid(text):
    return _uuid_int(text) is not None


def _offline_workers(workers):
    return [w for w in workers if not w["online"]]


def _resolve(client, text, kind, listing=None):
    """The whole id of the job or worker (kind) that text names: text itself if it is a whole
    UUID (no call made), else the one listed id equal to it or starting with it (a prefix of 8
    characters or more). ``listing`` spares the call to jobs() or workers()."""
    if not text:
        raise ConfigError("the %s id must not be empty" % kind)
    if _is_uuid(text):
        return text
    if listing is None:
        listing = client.jobs() if kind == "job" else client.workers()
    ids = sorted({item[kind + "_id"] for item in listing})
    if text in ids:
        return text
    if len(text) < 8:
        raise ConfigError("%s id %s: give the whole id or a unique prefix of at least 8 "
                          "characters" % (kind, _short(text)))
    matches = [i for i in ids if i.startswith(text)]
    if len(matches) > 1:
        raise ConfigError("%s id prefix %s is ambiguous: it matches %s%s" % (
            kind, text, ", ".join(matches[:10]),
            " and %d more" % (len(matches) - 10) if len(matches) > 10 else ""))
    if matches:
        return matches[0]
    unsearched = len(_offline_workers(client.workers())) if kind == "job" else 0
    raise NotFound("%s not found: %s%s" % (kind, _short(text), (
        " (the jobs of %d offline worker(s) could not be searched)" % unsearched
        if unsearched else "")))


class _LogFormatter(logging.Formatter):
    """"asctime levelname message", the time formatted once a second (a worker logs each job's
    start and end: logging was about a tenth of its CPU per job)."""
    _second = (None, "")

    def formatTime(self, record, datefmt=None):
        second, text = self._second
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second, text
        return "%s,%03d" % (text, record.msecs)


def _configure_logging(level):
    """Log to stderr (the commands own their process's logging; a program that imports jobsched
    configures its own). Records skip what no line shows: the caller's frame, thread, process."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _on_stop_signals(handler):
    """Make handler the handler of SIGINT, SIGTERM and SIGHUP (a closed terminal), except of
    those ignored at start, which stay ignored (nohup, a script's background job); returns
    {signal number: the handler it had}."""
    return {signum: signal.signal(signum, handler)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(signum) != signal.SIG_IGN}


def _serve_until_signal(role, banner):
    """Serve until SIGINT, SIGTERM or SIGHUP (0; one ignored at start stays ignored, as under
    nohup or in a script's background job), or until the role cannot go on (2: a worker whose
    token the scheduler refuses); a second signal exits at once.

    The handler only notes the signal. It runs in the main thread between two of its bytecodes:
    had it set a threading.Event that thread waits on, it could find the Event's lock held by the
    very wait it interrupted, and wait for it for ever."""
    signalled = []

    def on_signal(signum, frame):
        if signalled:
            os._exit(1)
        signalled.append(signum)
    _on_stop_signals(on_signal)
    role.start_serving()
    print(banner % role.address, flush=True)
    while not signalled:
        if role.fatal_error is not None:
            break
        time.sleep(0.1)
    else:
        log.info("signal received, shutting down")
    role.close()
    if role.fatal_error is not None:
        print("jobsched: error: %s" % role.fatal_error, file=sys.stderr)
        return 2
    return 0


def cmd_scheduler(args):
    limit_malloc_arenas()
    scheduler = Scheduler(args.listen, rpc_timeout=args.rpc_timeout, max_request=args.max_request,
                          security=_security_from_args(args), state_dir=args.state_dir)
    return _serve_until_signal(scheduler, "jobsched scheduler listening on %s")


def cmd_worker(args):
    limit_malloc_arenas()
    worker = Worker(args.listen, scheduler=args.scheduler or None, advertise=args.advertise,
                    state_dir=args.state_dir, slots=args.slots, stop_grace=args.stop_grace,
                    heartbeat=args.heartbeat, keep_jobs=args.keep_jobs, allow=args.allow,
                    allow_env=args.allow_env,
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


def _start_from_args(client, args, sent):
    """start's job, under an id made here, appended to ``sent`` as it goes: a lost answer can
    then name the job to look for."""
    if not args.command:
        raise ConfigError("no command given: jobsched %s [options] -- COMMAND [ARG...]" % args.cmd)
    worker_id = _resolve(client, args.worker, "worker") if args.worker else ""
    options = dict(_start_options(args), job_id=str(uuid.uuid4()))
    sent.append(options["job_id"])
    try:
        return client.start(worker_id, args.command[0], args.path, options)
    except OutcomeUnknown as e:
        raise OutcomeUnknown("%s; %s" % (e, _may_have_started(options["job_id"]))) from None
    except BadRequest as e:
        if "unknown option 'job_id'" not in str(e):
            raise
    del options["job_id"], sent[:]  # refused: a scheduler older than 1.1 names its jobs itself
    return client.start(worker_id, args.command[0], args.path, options)


def _may_have_started(job_id):
    return "job %s may have started: see jobsched.py query %s, and stop it if it was" % (
        job_id, job_id)


def cmd_start(args):
    if args.all:
        return _start_all(args)
    sent = []
    try:
        print(_start_from_args(_client_from_args(args), args, sent))
    except KeyboardInterrupt:  # its answer lost: the job is named, as for no answer
        if not sent:
            raise
        _say("interrupted; " + _may_have_started(sent[0]))
        return 130
    return 0


class _LostTrack(Exception):
    """run or logs -f gave up on the scheduler; the job goes on without them."""


class _CallAhead(threading.Thread):
    """func(*args) called in a thread of its own now; result() returns or raises what it did.
    args[1] is the offset asked for (an output() call's)."""

    def __init__(self, func, *args):
        threading.Thread.__init__(self, name="jobsched-ahead", daemon=True)
        self.func, self.args, self.offset = func, args, args[1]
        self.value = self.error = None
        self.start()

    def run(self):
        try:
            self.value = self.func(*self.args)
        except BaseException as e:  # handed to result()'s caller
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class _Follower:
    """Follows one job for run and logs -f. copy() writes its output to stdout from ``offset``,
    always the next byte to write, so that none is lost or written twice. call() makes a call
    about the job and rides out a lost scheduler or worker: a call that failed for a reason
    that may pass (unreachable, restarted, worker offline) is retried with backoff for up to
    ``patience`` seconds of failures in a row, then raises _LostTrack; patience None: no retry."""

    def __init__(self, client, job_id, offset=0, patience=None, quiet=False, known=False):
        self.client, self.job_id, self.offset = client, job_id, offset
        self.patience, self.quiet = patience, quiet
        self.known = known  # seen to exist: "not found" is then a scheduler that just restarted

    def call(self, func, *args):
        deadline, delay = None, 0.1
        while True:
            try:
                result = func(*args)
            except (Unavailable, NotFound) as e:  # Unreachable is an Unavailable
                if self.patience is None or isinstance(e, Refused) or (
                        isinstance(e, NotFound) and not self.known):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.patience
                    if not self.quiet:
                        _say("%s; retrying for up to %g s" % (e, self.patience) if self.patience
                             else str(e))
                if now >= deadline:
                    raise _LostTrack(str(e)) from None
                time.sleep(min(delay, deadline - now))
                delay = min(2.0, delay * 2)
                continue
            if deadline is not None and not self.quiet:
                _STOP_SIGNALS.say("reconnected")
            self.known = True
            return result

    def copy(self, follow=True):
        """Write the output to stdout. After a full chunk, the next one is asked for at once,
        in a thread, while this one is written: the worker's reading and encoding, the
        scheduler's relay and this end's decoding of successive chunks overlap."""
        out, ahead, wait = sys.stdout.buffer, deque(), 10 if follow else 0
        while True:
            reply = None
            if ahead and ahead[0].offset == self.offset:
                try:
                    reply = ahead.popleft().result()
                except Exception:  # a fault, an odd reply: asked again below, where failures
                    pass           # are retried and reported
            if reply is None:
                ahead.clear()  # asked for offsets that are not next (their threads just end)
                reply = self.call(self.client.output, self.job_id, self.offset, MAX_OUTPUT_CHUNK,
                                  wait)
            if len(reply["data"]) == MAX_OUTPUT_CHUNK and not reply["eof"]:
                # Two chunks in flight: one being decoded here while the next is encoded there.
                # One bare call each, without waiting for bytes not written yet: only this
                # thread retries and speaks to the user.
                try:
                    while len(ahead) < 2:
                        ahead.append(_CallAhead(self.client.output, self.job_id,
                                                reply["offset"] + len(ahead) * MAX_OUTPUT_CHUNK,
                                                MAX_OUTPUT_CHUNK, 0))
                except RuntimeError:
                    pass  # no thread to be had: the chunks are asked for one by one
            else:
                ahead.clear()
            self._write(out, reply["data"])
            self.offset = reply["offset"]
            if reply["eof"] or (not follow and not reply["data"]):
                return

    def _write(self, out, data):
        _write_counted(out, data, self._count)

    def _count(self, written):
        self.offset += written

    def resume_hint(self):
        return "the job goes on: jobsched.py logs -f --offset %d %s" % (self.offset, self.job_id)


def _write_counted(out, data, counted):
    """Write data to stdout, calling counted(n) for each n bytes as they go out, whatever
    signal comes. Through the file descriptor: a BufferedWriter's write() drops bytes when a
    signal whose handler returns interrupts a large write to a pipe (seen on CPython 3.6 and
    3.11). The wait for room is outside _STOP_SIGNALS' hold, where a signal's exception has
    written nothing; the write is inside it, where a signal cuts the write short and the count
    says how far it got, then raises once the count is kept."""
    out.flush()
    try:
        fd = out.fileno()
    except (AttributeError, io.UnsupportedOperation):
        with _STOP_SIGNALS:
            out.write(data)
            out.flush()
            counted(len(data))
        _STOP_SIGNALS.raise_noted()
        return
    view = memoryview(data)
    while view:
        select.select([], [fd], [])
        with _STOP_SIGNALS:
            written = os.write(fd, view)
            counted(written)
            view = view[written:]
        _STOP_SIGNALS.raise_noted()


def _print_ids(job_ids, noted=None):
    """Write the ids to stdout, one a line, every one of them: a stop signal while they go out
    is noted (a second one raises; ``noted``: the number of one that came before); returns the
    number of the one noted, else None. A block held when it is called (_submit_surely's
    keep_held) ends once the ids are ready to go, its signal noted as the first: a second one can
    then end a wait for room in stdout."""
    data = "".join(job_id + "\n" for job_id in job_ids).encode("ascii")
    done = [0]

    def counted(written):
        done[0] += written
    while done[0] < len(data):
        try:
            if _STOP_SIGNALS.holding:
                later = _STOP_SIGNALS.take()
                if noted is None:
                    noted, later = later, None
                _STOP_SIGNALS.__exit__()  # says what it held back: a signal then is caught below
                if later is not None:  # a second one, since the answer
                    _raise_stop_signal(later)
            _write_counted(sys.stdout.buffer, data[done[0]:], counted)
        except (KeyboardInterrupt, _Signalled) as e:
            if noted is not None:
                raise
            noted = signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signum
    return noted


def _queue_spec(args, words, ids):
    """The submit() spec of one command line (words), with the job options given; ids: the
    whole ids of --worker and --after (see _queue_ids)."""
    spec = _start_options(args)
    spec.update(command=words[0], args=words[1:], path=args.path)
    spec.update(ids)
    for key in ("name", "priority", "array"):  # run has none of these
        spec[key] = getattr(args, key, None)
    return {key: value for key, value in spec.items() if value}


def _queue_ids(client, args):
    """--worker and --after as whole ids (they may be prefixes)."""
    return {"worker_id": _resolve(client, args.worker, "worker") if args.worker else "",
            "after": [_resolve(client, job_id, "job") for job_id in getattr(args, "after", ())]}


_SHLEX_SPECIAL = re.compile(r"['\"\\#]|[^\S \t]")  # quotes, escape, comment, other blanks


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
    for number, line in enumerate(text.split("\n"), 1):  # as a shell reads lines: \v is no end
        if not _SHLEX_SPECIAL.search(line):  # as shlex would split it, 100 times sooner
            words = line.split()
            if words:
                jobs.append(words)
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError("%s, line %d: %s" % (path, number, e))
        if words:
            jobs.append(words)
    if not jobs:
        raise ConfigError("%s holds no job" % path)
    return jobs


JOB_STATES = ("queued", "running", "succeeded", "failed", "stopped", "timeout", "lost",
              "cancelled")


def cmd_submit(args):
    if args.file and args.command:
        raise ConfigError("give either --file FILE or -- COMMAND [ARG...], not both")
    if not args.file and not args.command:
        raise ConfigError("no command given: jobsched submit [options] -- COMMAND [ARG...], "
                          "or --file FILE")
    lines = _read_job_lines(args.file) if args.file else [args.command]
    if len(lines) * (args.array or 1) > MAX_SUBMIT_JOBS:  # one call: all or nothing
        raise ConfigError("%d jobs: at most %d can be queued at once (arrays counted in full); "
                          "split the file" % (len(lines) * (args.array or 1), MAX_SUBMIT_JOBS))
    return _with_stop_signals(_submit_lines, _client_from_args(args), args, lines)


def _submit_lines(client, args, lines):
    """submit once its lines are read: the ids on stdout once queued (_submit_surely), and also
    when they may have been."""
    job_ids, ended_by, unsure, why = _submit_surely(client, args, lines, keep_held=True)
    if job_ids is None:
        try:
            if unsure:
                _print_ids(unsure)  # each of them, to query and to stop, before the warning
        except BrokenPipeError:
            pass  # stdout closed: the warning still names the first
        finally:
            _say(why)
        return ended_by  # the exit status
    try:
        ended_by = _print_ids(job_ids, ended_by)
    except (KeyboardInterrupt, _Signalled) as e:  # a second signal: stdout took too long
        _say("interrupted before every id was written; %s" % (
            "job %s was queued" % job_ids[0] if len(job_ids) == 1 else
            "the %d jobs were queued, the first is %s" % (len(job_ids), job_ids[0])))
        return _interrupted_status(e)
    finally:
        _STOP_SIGNALS.__exit__()  # held still if the first write failed
    if ended_by is not None:
        _say("interrupted; the jobs were queued")
        return 128 + ended_by  # 130 for SIGINT, as _interrupted_status() says
    return 0


def cmd_wait(args):
    client = _client_from_args(args)
    listing = client.jobs() if not args.job_id or not all(map(_is_uuid, args.job_id)) else None
    pending = dict.fromkeys([_resolve(client, job_id, "job", listing) for job_id in args.job_id]
                            or [job["job_id"] for job in listing if not job["done"]])
    status = 0
    while pending:  # ask about 10000 at a time: each call carries its ids
        for ended in client.wait(list(itertools.islice(pending, 10000)), 30):
            if ended["job_id"] in pending:
                del pending[ended["job_id"]]
                print("%s %s" % (ended["job_id"], ended["state"]), flush=True)
                status = status or int(ended["state"] != "succeeded")
    return status




def job_exit_status(job):
    """The status a shell would give: the exit code, 128+N when killed by signal N, else 1."""
    if "exit_code" in job:
        return job["exit_code"]
    if "signal" in job:
        return 128 + job["signal"]
    return 1


def _outcome(job):
    """How a job ended, in words: 'succeeded', 'failed (exit status 3)', 'lost: ...'."""
    state, text = job["state"], job.get("error_text") or ""
    if not text or text.startswith(state):
        return text or state
    return "%s (%s)" % (state, text)


class _Signalled(BaseException):
    """Raised by run's SIGTERM and SIGHUP handler, as SIGINT raises KeyboardInterrupt: a handler
    that only set a flag would leave run blocked in a long-poll."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _interrupted_status(e):
    """The exit status of a command ended by KeyboardInterrupt or _Signalled e."""
    return 128 + e.signum if isinstance(e, _Signalled) else 130


def _raise_stop_signal(signum):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Signalled(signum)


class _StopSignals:
    """What run does with SIGINT, SIGTERM and SIGHUP (see _with_stop_signals). Outside a held
    block each raises in the main thread (KeyboardInterrupt, _Signalled), so that a long-poll
    ends at once. Inside one (``with _STOP_SIGNALS:`` around a job being placed, or one write
    and its count) none raises: the first is noted, for take() once the block is done, and
    those after it in the same block count as that one (two can be handled at the same point,
    right after a write they cut short). Raised there, a signal could leave a placed job
    unknown or a written chunk uncounted. Blocks do not nest."""
    holding = False
    noted = None  # the signal number noted in a held block
    held_back = ()  # what say() was asked to say in a held block, said once it is over

    def __enter__(self):
        self.holding = True
        return self

    def __exit__(self, *exc_info):
        self.holding = False
        said, self.held_back = self.held_back, ()
        for text in said:
            _say(text)

    def say(self, text):
        """_say(text), once no block is held: a write to a stderr nobody reads must not wait
        with the stop signals held."""
        if self.holding:
            self.held_back += (text,)
        else:
            _say(text)

    def take(self):
        """The signal noted in a held block, forgotten; None if none was."""
        signum, self.noted = self.noted, None
        return signum

    def raise_noted(self):
        signum = self.take()
        if signum is not None:
            _raise_stop_signal(signum)

    def handle(self, signum, frame):
        if self.holding:
            if self.noted is None:
                self.noted = signum
            return
        _raise_stop_signal(signum)


_STOP_SIGNALS = _StopSignals()


def _announce(client, job_id, follower, quiet):
    """Say once if the job waits in the queue, and where it runs once it runs (unless quiet),
    so that it can always be found again."""
    try:
        job = follower.call(client.query, job_id)
        if job["state"] == "queued":
            follower.call(client.output, job_id, 0, 0, 0.25)  # answers once it has started
            job = follower.call(client.query, job_id)
            if job["state"] == "queued" and job.get("position", 0) >= 1:
                _say("job %s queued (position %d: %s)" % (job_id, job["position"], job["reason"]))
        while job["state"] == "queued":  # output() answers once the job has started
            follower.call(client.output, job_id, 0, 0, 10)
            job = follower.call(client.query, job_id)
        if "worker_id" not in job or "pid" not in job:  # cancelled or refused before it started
            return
        if quiet:
            return
        worker_id = job["worker_id"]
        hostnames = {w["worker_id"]: w.get("hostname") for w in client.workers()}
    except JobschedError:
        _say("job %s" % job_id)
        return
    _say("job %s on %s (%s)" % (job_id, worker_id, hostnames.get(worker_id) or "unknown host"))


def cmd_run(args):
    if args.all or args.gather or args.no_prefix:
        return _with_stop_signals(_run_all, args)
    return _with_stop_signals(_place_and_run, _client_from_args(args), args)


def _place_and_run(client, args):
    """Submit the job under an id made here (_submit_surely), then follow it
    (_run_to_the_end)."""
    if not args.command:
        raise ConfigError("no command given: jobsched run [options] -- COMMAND [ARG...]")
    placed, ended_by, _, why = _submit_surely(client, args, [args.command])
    if placed is None:
        _say(why)
        return ended_by  # the exit status
    return _run_to_the_end(client, placed[0], args, ended_by and _stop_reason(ended_by))


def _submit_surely(client, args, lines, keep_held=False):
    """Queue the jobs of command lines ``lines``, with the options of args, under ids made here:
    a submit that fails for a reason that may pass is sent again, as _Follower.call() retries,
    for up to --reconnect seconds, and the queue takes an id once. Each call is a held block,
    so that a signal during it waits for its answer; with ``keep_held`` an answered call's block
    stays held, for the caller (_print_ids) to end once the ids are ready. Returns (the job ids, the
    number of a stop signal that came after the answer, else None, None) once queued; else
    (None, the exit status, the ids that may have been queued or None, what to say), for the
    caller to say."""
    placer = _Follower(client, None, patience=args.reconnect, quiet=getattr(args, "quiet", False))
    sent = []  # for each call: whether it may have reached the scheduler
    answer = []

    def submit(specs):
        _STOP_SIGNALS.__enter__()
        try:
            answer.append(client.submit(specs))
            return answer[0]
        except JobschedError as e:  # a fault too: a signal noted meanwhile is acted on
            sent.append(isinstance(e, OutcomeUnknown))
            failed = e
        finally:
            if not (answer and keep_held):
                _STOP_SIGNALS.__exit__()
        _STOP_SIGNALS.raise_noted()  # and asked to stop: no more tries
        raise failed
    specs = []
    try:
        ids = placer.call(_queue_ids, client, args)
        placer.known = False  # a "not found" now is a refused submit, not a restarted scheduler
        for words in lines:
            spec = _queue_spec(args, words, ids)
            made = str(uuid.uuid4())
            spec["job_id"] = made[:24] + "0" * 12 if spec.get("array") else made
            specs.append(spec)
        placer.call(submit, specs)
    except (KeyboardInterrupt, _Signalled, _LostTrack) as e:
        signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else getattr(e, "signum", None)
        if answer:  # answered: the signal came after the hold
            return answer[0], _STOP_SIGNALS.take() or signum, None, None
        why = "error: %s; " % e if isinstance(e, _LostTrack) else "interrupted; "
        status = 255 if isinstance(e, _LostTrack) else _interrupted_status(e)
        if not any(sent):
            return None, 1 if isinstance(e, _LostTrack) else status, None, why + "nothing was queued"
        unsure = list(expand_job_ids([spec["job_id"][:24] if "array" in spec else spec["job_id"]
                                      for spec in specs], specs))
        return None, status, unsure, (
            "%sjob %s may have been queued: see jobsched.py query %s, and stop it if it was"
            % (why, unsure[0], unsure[0]) if len(unsure) == 1 else
            "%sthe %d jobs printed may have been queued, all of them or none: see jobsched.py "
            "query %s (the first), and stop them if they were" % (why, len(unsure), unsure[0]))
    return answer[0], _STOP_SIGNALS.take(), None, None


def _stop_reason(signum):
    """What _run_to_the_end calls a stop signal: "interrupt" for SIGINT, else its number."""
    return "interrupt" if signum == signal.SIGINT else signum


def _with_stop_signals(func, *args):
    """func(*args) with SIGTERM and SIGHUP raising _Signalled, as SIGINT raises
    KeyboardInterrupt, except in _STOP_SIGNALS' held blocks; a signal ignored at start (nohup,
    a background job of a script) stays ignored."""
    handlers = _on_stop_signals(_STOP_SIGNALS.handle)
    try:
        return func(*args)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _run_to_the_end(client, job_id, args, stop_asked=None):
    """run once the job is placed: follow it until it ends; returns run's exit status.
    stop_asked: what asked run to stop the job: "interrupt", "pipe" or a signal number. The
    except clauses only note a signal: what they did could itself be cut short by the next."""
    follower = _Follower(client, job_id, patience=args.reconnect, quiet=args.quiet, known=True)
    announced = stop_asked is not None  # stopped before it was announced: a queued job is
    stopped = told = pipe_closed = False  # cancelled at once, not waited for
    while True:
        try:
            if stop_asked is not None and stop_asked != "pipe" and not told:
                told = True
                _say("stopping job %s" % job_id)
            if not announced:
                announced = True
                _announce(client, job_id, follower, args.quiet)
            if stop_asked is not None and not stopped:
                follower.call(client.stop, job_id)
                stopped = True
            if not pipe_closed:
                follower.copy(follow=True)
            job = follower.call(client.query, job_id)
            break
        except KeyboardInterrupt:
            _STOP_SIGNALS.take()
            if stop_asked is not None:
                raise  # a second Ctrl-C: exit at once
            stop_asked = "interrupt"
        except _Signalled as e:
            _STOP_SIGNALS.take()
            if stopped:  # asked again once the stop is sent: no waiting for the end
                return 128 + e.signum
            if stop_asked is None:
                stop_asked = e.signum
        except BrokenPipeError:
            pipe_closed = True
            _stdout_closed()
            if stop_asked is None:  # a signal noted as the write failed counts first
                stop_asked = _stop_reason(_STOP_SIGNALS.take()) or "pipe"
        except _LostTrack:
            _say("lost the scheduler; " + follower.resume_hint())
            return 255
        except JobschedError as e:
            _say("error: %s; %s" % (e, follower.resume_hint()))
            return 255
    if job["state"] == "cancelled" and stop_asked is not None:  # stopped while it was queued
        _say("job %s %s" % (job_id, _outcome(job)))
        if stop_asked == "interrupt":
            return 130
    elif job["state"] in ("failed", "cancelled") and "exit_code" not in job and "signal" not in job:
        _say("error: %s" % (job.get("error_text") or job["state"]))  # it never started
    elif job["state"] == "timeout":
        _say("job %s timed out after %s s" % (job_id, "%g" % args.timeout if args.timeout else "?"))
    elif job["state"] not in ("succeeded", "failed"):
        _say("job %s %s" % (job_id, _outcome(job)))
    if isinstance(stop_asked, int):
        return 128 + stop_asked
    return _stdout_closed() if pipe_closed else job_exit_status(job)


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

    def follow(self, client, emit, stdout_closed, patience):
        """Rides out a lost scheduler as run does, for up to ``patience`` seconds."""
        follower = _Follower(client, self.job_id, patience=patience, quiet=True, known=True)
        try:
            self._follow(follower, client, emit)
        except BrokenPipeError:
            stdout_closed.set()
        except _LostTrack as e:
            self.status = 255
            self.reason = "lost the scheduler (%s); the job goes on: %s" % (e, follower.resume_hint())
        except Exception as e:  # a thread's target: the reason goes to the user, not lost
            self.status = 255
            self.reason = "outcome unknown: %s (jobsched.py query %s)" % (e, self.job_id)
        finally:
            self.followed.set()

    def _follow(self, follower, client, emit):
        """follower.offset is always the first byte not yet handed to emit()."""
        data, offset = b"", 0
        while True:
            reply = follower.call(client.output, self.job_id, offset, MAX_OUTPUT_CHUNK, 10)
            offset, data = reply["offset"], data + reply["data"]
            # Whole lines only, so that hosts never mix within a line; a line longer than a
            # chunk goes as it is.
            end = data.rfind(b"\n") + 1 if len(data) < MAX_OUTPUT_CHUNK else len(data)
            if end:
                emit(self, data[:end])
                data = data[end:]
            follower.offset = offset - len(data)
            if reply["eof"]:
                break
        if data:
            emit(self, data)
            follower.offset = offset
        job = follower.call(client.query, self.job_id)
        self.status = job_exit_status(job)
        if job["state"] != "succeeded":
            self.reason = job.get("error_text") or job["state"]


def _stop_fan_out(client, jobs):
    """Stop every job in parallel; returns an Event per job, set once its stop is done."""
    def stop(job, done):
        try:
            client.stop(job.job_id)
        except JobschedError as e:
            print("jobsched: %s: cannot stop job %s: %s" % (job.name, job.job_id, e), file=sys.stderr)
        finally:
            done.set()
    dones = [threading.Event() for _ in jobs]
    for job, done in zip(jobs, dones):
        threading.Thread(target=stop, args=(job, done), daemon=True).start()
    return dones


def _await_fan_out(client, jobs, stdout_closed, stop_asked=None):
    """Wait for every follower. The first Ctrl-C, SIGTERM or SIGHUP (stop_asked: one that came
    while the jobs were placed), or a closed stdout, stops every job; a second Ctrl-C exits at
    once, as does another signal once the stops are sent. Returns the number of the signal that
    stopped them (SIGTERM, SIGHUP), else None. The except clause only notes a signal: what it
    did could itself be cut short by the next one."""
    stops, told = None, False
    while True:
        try:
            if stops is None and (stop_asked is not None or stdout_closed.is_set()):
                if stop_asked is not None and not told:
                    told = True
                    print("jobsched: stopping %d jobs" % len(jobs), file=sys.stderr)
                with _STOP_SIGNALS:  # the stopping threads are started whole
                    stops = _stop_fan_out(client, jobs)
                _STOP_SIGNALS.raise_noted()
            # Events, not Thread.join(): a join that Ctrl-C interrupts can mark a thread
            # that still runs as ended. Looked at, not waited on: an Event's wait() that a
            # signal's exception interrupts can leave the Event's lock held, and hang the
            # next wait() or the follower's set().
            if all(job.followed.is_set() for job in jobs) and \
                    all(done.is_set() for done in stops or ()):
                if stops is None and stdout_closed.is_set():
                    continue  # closed as the last follower ended: the stops go out first
                break
            time.sleep(0.02)
        except (KeyboardInterrupt, _Signalled) as e:
            _STOP_SIGNALS.take()
            signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
            if stop_asked is None:
                stop_asked = signum
            elif signum == signal.SIGINT or (signum != stop_asked and stops is not None):
                raise
            # else the same signal again, or any before the stops are sent: they are on the way
    return stop_asked if stop_asked in (signal.SIGTERM, signal.SIGHUP) else None


def _run_all(args):
    """run --all: the job on every matching worker at once, each output line as it comes (or
    grouped, --gather), one line on stderr per job that did not succeed; the highest status."""
    if not args.all:
        raise ConfigError("--gather and --no-prefix go with --all")
    client = _client_from_args(args)
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
    # A signal while the jobs are placed and their followers started waits: each job must be
    # known to be stopped, and a thread's start() waits on an Event.
    with _STOP_SIGNALS:
        entries = _start_all_from_args(client, args)
        jobs = [_FanOutJob(name, entry) for name, entry in zip(_fan_out_names(entries), entries)]
        client.max_idle = len(jobs)  # each follower keeps its connection from one call to the next
        for job in jobs:
            if job.started:
                threading.Thread(target=job.follow, name="jobsched-follow", daemon=True,
                                 args=(client, emit, stdout_closed, args.reconnect)).start()
    signalled = _await_fan_out(client, [job for job in jobs if job.job_id], stdout_closed,
                               _STOP_SIGNALS.take())
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
    return 128 + signalled if signalled else max(job.status for job in jobs)


def cmd_stop(args):
    client = _client_from_args(args)
    job_id = _resolve(client, args.job_id, "job")
    job = client.query(job_id)
    if not job["done"]:
        client.stop(job_id)
        job = client.query(job_id)
        if job["state"] in ("stopped", "cancelled"):  # cancelled: it was still queued
            print("%s %s" % (job_id, _outcome(job)))
            return 0
    print("%s had already ended: %s" % (job_id, _outcome(job)))
    return 0


_TIME_FIELDS = ("started_at", "finished_at", "last_seen", "submitted_at")


def _local_time(seconds):
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


def _text_value(key, value):
    """A struct's value as query prints it: times in local ISO 8601, plain strings as they are,
    anything else (and a string that would read ambiguously) as JSON."""
    if key in _TIME_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _local_time(value)
    if isinstance(value, str) and value and value == value.strip() \
            and json.dumps(value, ensure_ascii=False)[1:-1] == value:
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _print_struct(struct, as_json):
    if as_json:
        print(json.dumps(struct, indent=2, sort_keys=True))
        return
    for key in sorted(struct):
        print("%s: %s" % (key, _text_value(key, struct[key])))


def cmd_query(args):
    client = _client_from_args(args)
    _print_struct(client.query(_resolve(client, args.job_id, "job")), args.json)
    return 0


def cmd_logs(args):
    if args.offset < 0:
        raise ConfigError("--offset must be >= 0")
    client = _client_from_args(args)
    follower = _Follower(client, _resolve(client, args.job_id, "job"), args.offset,
                         patience=args.reconnect if args.follow else None)
    try:
        follower.copy(follow=args.follow)
    except _LostTrack:
        _say("lost the scheduler; " + follower.resume_hint())
        return 255
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
    client = _client_from_args(args)
    jobs, workers = client.jobs(), client.workers()
    offline = _offline_workers(workers)
    if args.worker:
        worker_id = _resolve(client, args.worker, "worker", workers)
        jobs = [j for j in jobs if j.get("worker_id") == worker_id]
        offline = [w for w in offline if w["worker_id"] == worker_id]
    if args.state:
        jobs = [j for j in jobs if j.get("state") in args.state]
    jobs.sort(key=lambda j: j.get("started_at", 0))
    if args.limit:
        jobs = jobs[-args.limit:]
    _print_table(jobs, [
        ("job_id", lambda j: j["job_id"]), ("worker_id", lambda j: j["worker_id"][:8]),
        ("state", lambda j: j["state"]),
        ("exit", lambda j: j["exit_code"] if "exit_code" in j else
         "signal %d" % j["signal"] if "signal" in j else "-"),
        ("started", lambda j: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started_at"]))
         if "started_at" in j else "-"),
        ("command", lambda j: " ".join([j["command"]] + ([j["path"]] if j["path"] else []) + j["args"])),
    ], args.json, "jobs")
    if offline:
        _say("the jobs of %d offline worker%s are not listed"
             % (len(offline), "" if len(offline) == 1 else "s"))
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


def _status_screen(client, as_json):
    info, workers, jobs = client.info(), client.workers(), client.jobs()
    queued = info["queued"] if isinstance(info.get("queued"), int) else \
        sum(j.get("state") == "queued" for j in jobs)
    now = time.time()
    summary = cluster_summary(workers, jobs, queued, now)
    if as_json:
        return json.dumps(dict(summary, workers=workers), indent=2, sort_keys=True) + "\n"
    lines = ["workers %(workers_online)d/%(workers_total)d online   slots %(slots_busy)d/"
             "%(slots_total)d busy   jobs %(jobs_queued)d queued, %(jobs_running)d running   "
             "last hour %(succeeded_last_hour)d succeeded, %(failed_last_hour)d failed" % summary,
             ""]
    table = [["WORKER_ID", "ADDRESS", "ONLINE", "SLOTS", "HOSTNAME", "LAST SEEN"]]
    table += [[w["worker_id"], w.get("address", ""), "yes" if w.get("online") else "no",
               "%s/%s" % (w.get("running", 0), w.get("slots", 0)), w.get("hostname", ""),
               "%.1f s ago" % max(0.0, now - w.get("last_seen", now))] for w in workers]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in table]
    return "\n".join(lines) + "\n"


def cmd_status(args):
    client = _client_from_args(args)
    if not args.watch:
        sys.stdout.write(_status_screen(client, args.json))
        return 0
    try:
        while True:
            try:
                screen = _status_screen(client, args.json)
            except JobschedError as e:  # keep watching: the scheduler may come back
                screen = "jobsched: error: %s\n" % e
            sys.stdout.write(screen if args.json else "\033[H\033[2J" + screen)
            sys.stdout.flush()
            time.sleep(2.0)
    except KeyboardInterrupt:
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
    sub.add_argument("--spawn-method", choices=["auto", "posix_spawn", "popen"], default="auto",
                     help="how jobs are started: posix_spawn (vfork, fast on every Python; Linux "
                          "with glibc 2.26+) or popen (subprocess); auto picks posix_spawn where it "
                          "works (default: %(default)s)")
    sub.add_argument("--allow-env", metavar="NAME", action="append", default=[],
                     help="the only env names a job may set once --allow or --allow-env is given "
                          "(repeatable; shell wildcards such as APP_*)")
    sub.add_argument("--jobs-dir", metavar="DIR",
                     help="resolve 'path' inside DIR and refuse anything that escapes it")
    sub.add_argument("--label", metavar="KEY=VALUE", action="append", default=[],
                     help="a label jobs can ask for with --on (repeatable); host, os and arch "
                          "are built in")

    max_request(sub, MiB)

    id_help = "%s id, or a unique prefix of 8 characters or more"

    def job_options(sub):
        sub.add_argument("--worker", metavar="ID", default="",
                         help="worker to run on, or a unique prefix of its id "
                              "(default: the one with most free slots)")
        sub.add_argument("--path", default="", help="script path passed after COMMAND (default: none)")
        sub.add_argument("--cwd", metavar="DIR", help="working directory of the job")
        sub.add_argument("--env", metavar="K=V", action="append", default=[], help="add to the job's environment (repeatable)")
        sub.add_argument("--timeout", metavar="SECONDS", type=_job_timeout,
                         help="stop the job after this long (at most %d)" % MAX_JOB_TIMEOUT)
        sub.add_argument("--on", metavar="KEY=VALUE", action="append", default=[],
                         help="only on a worker with this label; VALUE * asks only for the key (repeatable)")
        sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    def reconnect_option(sub, then="exit 255 saying how to resume"):
        sub.add_argument("--reconnect", metavar="SECONDS", type=_positive(float, zero=True),
                         default=60.0, help="keep retrying a lost scheduler this long, then %s "
                                            "(default: %%(default)s)" % then)

    job_options(command("start", "start a job and print its id", cmd_start))
    sub = command("run", "start a job, stream its output, exit with its exit code", cmd_run)
    job_options(sub)
    reconnect_option(sub)
    sub.add_argument("-q", "--quiet", action="store_true",
                     help="do not say on stderr which job runs where, or reconnecting")
    for name in ("start", "run"):
        commands.choices[name].add_argument(
            "--all", action="store_true",
            help="start the job on every online worker that matches --on, each with its own id")
    sub.add_argument("--no-prefix", action="store_true",
                     help="with --all: print output lines without the 'HOST: ' prefix")
    sub.add_argument("--gather", action="store_true",
                     help="with --all: once all have ended, print each distinct output once, "
                          "under the hosts that printed it")
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
    reconnect_option(sub, "give up: exit 1 if nothing was queued, else 255 saying which job "
                          "to query")
    sub = command("wait", "wait until jobs have ended, printing 'JOB_ID STATE' as each does; "
                  "exit 0 if all succeeded", cmd_wait)
    sub.add_argument("job_id", nargs="*", help="(default: every queued and running job)")
    sub = command("stop", "stop a job (TERM, then KILL after the grace period)", cmd_stop)
    sub.add_argument("job_id", help=id_help % "job")
    sub = command("query", "show a job's state", cmd_query)
    sub.add_argument("job_id", help=id_help % "job")
    sub.add_argument("--json", action="store_true", help="print the job struct as JSON")
    sub = command("logs", "write a job's output to stdout", cmd_logs)
    sub.add_argument("job_id", help=id_help % "job")
    sub.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    sub.add_argument("--offset", type=int, default=0, help="start at this byte (default: %(default)s)")
    reconnect_option(sub)
    sub = command("jobs", "list the jobs of every online worker", cmd_jobs)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--state", metavar="STATE", action="append", default=[], choices=JOB_STATES,
                     help="only jobs in this state (repeatable): %s" % ", ".join(JOB_STATES))
    sub.add_argument("--worker", metavar="ID", help="only the jobs of this worker (%s)" % (id_help % "its"))
    sub.add_argument("--limit", metavar="N", type=_positive(int),
                     help="only the N most recently started")
    sub = command("workers", "list the workers", cmd_workers)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--on", metavar="KEY=VALUE", action="append", default=[],
                     help="only the workers with this label; VALUE * asks only for the key (repeatable)")
    sub = command("status", "one screen: workers, slots, queued and running jobs, the last hour",
                  cmd_status)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--watch", action="store_true", help="redraw every 2 s until Ctrl-C")
    command("demo", "start a scheduler and two workers on loopback, run jobs, clean up", cmd_demo, ())
    return parser


#: what a scheduler or worker run as a script executes itself again as: this file, by runpy,
#: with the script's directory first on sys.path where -c put the working directory
_RERUN = "import os, runpy, sys; sys.argv[0] = sys.argv.pop(1); " \
         "sys.path[:1] = [os.path.dirname(os.path.realpath(sys.argv[0]))] " \
         "if sys.path[:1] == [''] else sys.path[:1]; " \
         "sys.exit(runpy.run_path(sys.argv[0], run_name='jobsched')['main']())"


def _rerun_without_the_scripts_syntax_tree(argv):
    """Python 3.9 and later keep the syntax tree of the script they run until it ends: 15 MB
    of this file's, for the life of a scheduler or worker. Run as a script (``python3 [OPTIONS]
    jobsched.py ARGS``) on Python 3.10 or later, the roles execute themselves again, with the
    same pid, the interpreter's command line up to the script (sys.orig_argv: every option
    kept), the same arguments and environment, and this file compiled by runpy, which frees the
    tree at once. Returns if that cannot be done; the role then runs as it is."""
    if __name__ != "__main__" or argv is not None or not hasattr(sys, "orig_argv") \
            or not sys.executable:
        return
    path, script_argv = os.path.abspath(__file__), list(sys.argv)
    options = len(sys.orig_argv) - len(script_argv)
    if options < 1 or sys.orig_argv[options:] != script_argv or not os.path.isfile(path):
        return  # -m, -c, stdin, or an argv changed since: not the plain script case
    _flush_std()
    try:
        os.execv(sys.executable, sys.orig_argv[:options] + ["-c", _RERUN, path] + script_argv[1:])
    except OSError:
        pass  # run on as we are, with the larger memory


def _flush_std():
    """Flush stdout and stderr, either of which may be None (started with it closed)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if args.cmd in ("scheduler", "worker"):
        _rerun_without_the_scripts_syntax_tree(argv)
        _configure_logging(args.log_level)
    elif args.cmd == "demo":
        _configure_logging("error")
    try:
        status = args.func(args)
        _flush_std()  # here, where a closed stdout's reader is caught, rather than at exit
        return status
    except ConfigError as e:
        print("jobsched: error: %s" % e, file=sys.stderr)
        return 2
    except JobschedError as e:
        print("jobsched: error: %s" % e, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Signalled) as e:  # _Signalled: a second SIGTERM or SIGHUP
        print("jobsched: interrupted", file=sys.stderr)  # while run was stopping its job
        return _interrupted_status(e)
    except BrokenPipeError:
        return _stdout_closed()


def _exit_at_once_on_signals(status):
    """Once a command run as a script has returned status, its work is done and said: a SIGINT,
    SIGTERM or SIGHUP that comes while the interpreter shuts down ends the process at once with
    that status, instead of a KeyboardInterrupt traceback or a death by the signal. Its output
    must be flushed before (os._exit() flushes nothing)."""
    _on_stop_signals(lambda signum, frame: os._exit(status))


if __name__ == "__main__":
    _status = main()
    try:
        _flush_std()
    except (OSError, ValueError):
        pass  # stdout closed: nothing more can be said
    _exit_at_once_on_signals(_status)
    sys.exit(_status)
