"""
A minimal FastCGI client: one GET sent straight to a PHP-FPM pool, as
``release_stack`` needs to run its OPcache reset script inside the pool (the
CLI's ``opcache_reset()`` would clear the CLI's own cache, not the pool's).
Also the socket helpers it uses: a unix socket path or host:port.

Standard library and Salt only.
"""

import os
import socket
import struct

from salt.exceptions import CommandExecutionError


def address(spec):
    """A unix socket path, or (host, port) from 'host:port', '[v6]:port' or a bare port."""
    text = str(spec).strip()
    if text.startswith("/"):
        return text
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise CommandExecutionError(f"not a socket path or host:port: {spec!r}")


def connect(spec, timeout_s):
    found = address(spec)
    if isinstance(found, str):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        try:
            conn.connect(found)
        except OSError:
            conn.close()
            raise
        return conn
    return socket.create_connection(found, timeout=timeout_s)


FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_STDERR = 1, 3, 4, 5, 6, 7
FCGI_RESPONDER = 1
FCGI_HEADER = struct.Struct("!BBHHBx")  # version, type, request id, content length, padding


def _record(kind, content):
    return FCGI_HEADER.pack(1, kind, 1, len(content), 0) + content


def pair(name, value):
    name, value = name.encode(), value.encode()
    sizes = b"".join(struct.pack("!B", n) if n < 128 else struct.pack("!I", n | 0x80000000)
                     for n in (len(name), len(value)))
    return sizes + name + value


def _recv_exactly(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise CommandExecutionError("FPM closed the connection in the middle of a response")
        data += chunk
    return data


def get(listen, script, query, timeout_s):
    """A GET of ``script`` sent straight to an FPM pool; returns (stdout, stderr) bytes."""
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1",
        "SCRIPT_FILENAME": script, "SCRIPT_NAME": "/" + os.path.basename(script),
        "REQUEST_URI": f"/{os.path.basename(script)}?{query}", "QUERY_STRING": query,
        "DOCUMENT_ROOT": os.path.dirname(script), "REMOTE_ADDR": "127.0.0.1",
        "SERVER_SOFTWARE": "salt-release", "CONTENT_LENGTH": "0",
    }
    request = (
        _record(FCGI_BEGIN_REQUEST, struct.pack("!HB5x", FCGI_RESPONDER, 0))
        + _record(FCGI_PARAMS, b"".join(pair(k, v) for k, v in params.items()))
        + _record(FCGI_PARAMS, b"")
        + _record(FCGI_STDIN, b"")
    )
    streams = {FCGI_STDOUT: b"", FCGI_STDERR: b""}
    try:
        with connect(listen, timeout_s) as conn:
            conn.sendall(request)
            while True:
                _, kind, _, length, padding = FCGI_HEADER.unpack(_recv_exactly(conn, FCGI_HEADER.size))
                content = _recv_exactly(conn, length + padding)[:length]
                if kind == FCGI_END_REQUEST:
                    return streams[FCGI_STDOUT], streams[FCGI_STDERR]
                if kind in streams:
                    streams[kind] += content
    except OSError as exc:
        raise CommandExecutionError(f"could not talk FastCGI to {listen}: {exc}")
