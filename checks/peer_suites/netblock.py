"""pytest plugin: keep the peer suites on loopback, and name the tests that tried to leave it.

Loaded in every run of run.sh (baseline and guarded alike) with ``-p netblock``. It patches
``socket.socket.connect``/``connect_ex`` and the resolver functions so that:

* loopback addresses (127.0.0.0/8, ::1), ``localhost``, Unix sockets and socketpairs work as
  usual;
* a connect to any other address (public, or private-range such as the 10.255.255.1 "tarpit"
  of the timeout tests) fails at once with ``OSError(ENETUNREACH)``;
* a lookup of any other name fails at once with ``socket.gaierror`` (no DNS query is sent),
  which is what tests such as requests' ``doesnotexist.google.com`` case expect anyway.

Each such attempt is written to ``$NETBLOCK_LOG`` as ``nodeid<TAB>what<TAB>target``; that log
is how the deselect lists were found. The terminal summary prints the counts: with the deselect
lists applied, connects are 0 and lookups are only the two "name must not resolve" tests.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

import pytest

_current = {"nodeid": "<collection>"}
_blocked: list[str] = []
_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_getaddrinfo = socket.getaddrinfo
_orig_gethostbyname = socket.gethostbyname
_orig_gethostbyname_ex = socket.gethostbyname_ex
_LOCAL_NAMES = {"localhost", "localhost.", "ip6-localhost", "ip6-loopback"}


def _note(what: str, target: Any) -> None:
    line = f"{_current['nodeid']}\t{what}\t{target!r}"
    _blocked.append(line)
    path = os.environ.get("NETBLOCK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _loopback_ip(host: Any) -> bool | None:
    """True/False for an IP literal, None for a name."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host).strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return None


def _host_allowed(host: Any) -> bool:
    if host is None or host in ("", b""):
        return True  # passive / local lookups (getaddrinfo(None, port))
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    if name.lower() in _LOCAL_NAMES:
        return True
    return bool(_loopback_ip(name))


def _address_allowed(sock: socket.socket, address: Any) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # AF_UNIX, socketpair(), ...
    host = address[0] if isinstance(address, tuple) else address
    return _host_allowed(host)  # connect() also takes a name: only "localhost" passes


def _connect(self: socket.socket, address: Any) -> Any:
    if not _address_allowed(self, address):
        _note("connect", address)
        raise OSError(errno.ENETUNREACH, f"netblock: {address!r} is not loopback")
    return _orig_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> Any:
    if not _address_allowed(self, address):
        _note("connect_ex", address)
        return errno.ENETUNREACH
    return _orig_connect_ex(self, address)


def _lookup_allowed(host: Any) -> bool:
    # An IP literal "resolves" without a query: let it through, connect() judges it.
    return _host_allowed(host) or _loopback_ip(host) is not None


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if not _lookup_allowed(host):
        _note("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"netblock: no lookups of {host!r}")
    return _orig_getaddrinfo(host, *args, **kwargs)


def _gethostbyname(host: Any) -> Any:
    if not _lookup_allowed(host):
        _note("gethostbyname", host)
        raise socket.gaierror(socket.EAI_NONAME, f"netblock: no lookups of {host!r}")
    return _orig_gethostbyname(host)


def _gethostbyname_ex(host: Any) -> Any:
    if not _lookup_allowed(host):
        _note("gethostbyname_ex", host)
        raise socket.gaierror(socket.EAI_NONAME, f"netblock: no lookups of {host!r}")
    return _orig_gethostbyname_ex(host)


socket.socket.connect = _connect  # type: ignore[method-assign]
socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = _getaddrinfo
socket.gethostbyname = _gethostbyname
socket.gethostbyname_ex = _gethostbyname_ex


def current_test() -> str:
    """The node id of the test running now (what the plugins' counts are kept by)."""
    return _current["nodeid"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    _current["nodeid"] = item.nodeid
    try:
        return (yield)
    finally:
        _current["nodeid"] = "<between tests>"


def _counts(lines: list[str]) -> dict[str, int]:
    connects = sum(1 for line in lines if "\tconnect" in line)
    return {"connects": connects, "lookups": len(lines) - connects}


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["netblock"] = _counts(_blocked)


_from_workers = {"connects": 0, "lookups": 0}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    for key, value in getattr(node, "workeroutput", {}).get("netblock", {}).items():
        _from_workers[key] += value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    mine = _counts(_blocked)
    connects = mine["connects"] + _from_workers["connects"]
    lookups = mine["lookups"] + _from_workers["lookups"]
    terminalreporter.write_line(
        f"netblock: {connects} connects to non-loopback addresses blocked, "
        f"{lookups} lookups of non-local names answered 'not found'"
    )
