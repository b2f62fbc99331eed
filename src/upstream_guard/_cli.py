"""The ``upstream-guard`` command: fleet status, manual control and a local simulator.

Built on ``argparse``: four subcommands with a few options each need no more, it ships with
Python (the command works in any install of the library, nothing added to its dependencies),
and it imports in milliseconds. Click or Typer would bring a dependency for features
(completion, rich help) an operator's four-verb tool does not need.

Every failure an operator can cause (bad arguments, an unknown upstream, Redis or the app
unreachable, a port in use) ends with one line on stderr and a non-zero exit code: 2 for a
bad command line, 1 for the rest. Heavy imports (redis, httpx, uvicorn) happen inside the
subcommand that needs them, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

PROG = "upstream-guard"
DEFAULT_PREFIX = "upstream_guard"
CONTROL_PATH = "/_simulator"


class CommandError(Exception):
    """A failure to report as one line on stderr (exit code 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``status``, ``isolate``, ``reset``, ``simulate``."""
    parser = _Parser(
        prog=PROG,
        description="Operate upstream_guard: fleet status, manual isolation, a local simulator.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def redis_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--redis",
            metavar="URL",
            help="the fleet's Redis (default: $UPSTREAM_GUARD_REDIS_URL)",
        )
        sub.add_argument(
            "--prefix",
            default=os.environ.get("UPSTREAM_GUARD_REDIS_PREFIX", DEFAULT_PREFIX),
            help="the guard's redis_prefix (default: $UPSTREAM_GUARD_REDIS_PREFIX or "
            f"{DEFAULT_PREFIX})",
        )

    status = commands.add_parser(
        "status",
        help="each upstream's state: fleet-wide (--redis) or one app's (--url)",
        description="Each upstream's state, failures, cooldown and isolation: fleet-wide "
        "from Redis (--redis, with the workers seen), or from one app's health endpoint (--url).",
    )
    redis_options(status)
    status.add_argument(
        "--url",
        metavar="URL",
        help="an app's health endpoint, e.g. http://host/_upstream_guard/health",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    status.set_defaults(run=_status)

    for verb, text in (
        ("isolate", "refuse every call to an upstream, fleet-wide, until reset"),
        ("reset", "put an upstream back to closed, fleet-wide: isolation lifted, counters cleared"),
    ):
        sub = commands.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("name", metavar="NAME", help="the upstream, e.g. spotify_api")
        redis_options(sub)
        sub.set_defaults(run=_control)

    simulate = commands.add_parser(
        "simulate",
        help="serve the simulated Spotify Web API on loopback",
        description="Serve the simulated Spotify Web API (and accounts host) for local work. "
        f"Switch its fault while it runs: PUT {CONTROL_PATH}/fault with a body such as "
        f"'rate_limited:30' (DELETE heals, GET lists).",
    )
    simulate.add_argument("--port", type=_port, required=True, help="TCP port (0: any free one)")
    simulate.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    simulate.add_argument(
        "--fault",
        default="healthy",
        help="healthy, no_healthy_upstream, json_5xx[:status], rate_limited[:seconds], "
        "rolling_window:calls/seconds, slow:seconds, hang, flapping:rate, status:code "
        "(default healthy)",
    )
    simulate.add_argument(
        "--prefix", default="", help="apply the fault to this path prefix only (e.g. /v1/tracks)"
    )
    simulate.set_defaults(run=_simulate)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.run
    try:
        return run(args, parser)
    except CommandError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)  # noqa: T201 - the command's own output
        return 1
    except KeyboardInterrupt:
        return 130


# -- status ------------------------------------------------------------------------------------


def _status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.url and args.redis:
        parser.error("give --redis or --url, not both")
    redis_url = args.redis or os.environ.get("UPSTREAM_GUARD_REDIS_URL")
    if args.url:
        document = _health(args.url, args.timeout)
        rows = [_health_row(name, u) for name, u in document["upstreams"].items()]
        shared = document.get("shared_state")
        title = f"{args.url}: {document.get('status')} (shared state: {shared})"
    elif redis_url:
        from . import _fleet  # noqa: PLC0415 - redis only for this subcommand

        with _redis_client(redis_url, args.timeout) as client:
            status = _redis_call(redis_url, lambda: _fleet.fleet_status(client, args.prefix))
        document = _fleet.as_dicts(status)
        rows = [_fleet_row(name, u) for name, u in document["upstreams"].items()]
        title = f"{_safe(redis_url)}: {len(rows)} upstream(s)"
        if not rows:
            title += f" (no worker has synced with prefix {args.prefix!r})"
    else:
        parser.error("status needs --redis URL (the fleet) or --url URL (one app's health)")
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))  # noqa: T201
    else:
        print(title)  # noqa: T201
        print(format_table(rows))  # noqa: T201
    return 0


def _health(url: str, timeout: float) -> dict[str, Any]:
    import httpx  # noqa: PLC0415

    try:
        response = httpx.get(url, timeout=timeout, headers={"accept": "application/json"})
    except httpx.InvalidURL as exc:
        raise CommandError(f"not a URL: {url!r} ({exc})") from None
    except httpx.UnsupportedProtocol:
        raise CommandError(f"not an http(s) URL: {url!r}") from None
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {url}: {type(exc).__name__} {exc}".rstrip()) from None
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("upstreams"), dict):
        raise CommandError(
            f"{url} answered {response.status_code} without a health document; "
            "give the health endpoint (health_path, default /_upstream_guard/health)"
        )
    return document


def _seconds(value: float | None) -> str:
    return f"{value:.1f}s" if value else "-"


def _pace(pace: Any) -> str:
    if not isinstance(pace, dict) or pace.get("rate_per_s") is None:
        return "-"
    return f"{pace['rate_per_s']:.1f}/s ({pace.get('source', '?')})"


def _health_row(name: str, u: dict[str, Any]) -> dict[str, str]:
    row = {
        "upstream": name,
        "state": str(u.get("state")),
        "failures": str(u.get("failures", 0)),
        "consecutive": str(u.get("consecutive_failures", 0)),
        "retry after": _seconds(u.get("retry_after_s")),
        "cooldown": _seconds(u.get("cooldown_s")),
    }
    if "pace" in u:  # an app of a version without pacing reports none
        row["pace"] = _pace(u["pace"])
    return row


def _fleet_row(name: str, u: dict[str, Any]) -> dict[str, str]:
    workers = u["workers"]
    return {
        "upstream": name,
        "state": u["state"],
        "isolated": f"for {u['isolated_for_s']:.0f}s" if u["isolated"] else "no",
        "failures": str(u["failures"]),
        "trips": str(u["trips"]),
        "cooldown": _seconds(u["cooldown_s"]),
        "workers": str(len(workers)),
        "last sync": f"{workers[0]['last_seen_s']:.1f}s ago" if workers else "-",
    }


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as aligned columns under upper-case headers (columns from the first row)."""
    if not rows:
        return "(no upstreams)"
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


# -- isolate / reset ---------------------------------------------------------------------------


def _control(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    redis_url = args.redis or os.environ.get("UPSTREAM_GUARD_REDIS_URL")
    if not redis_url:
        parser.error(f"{args.command} needs --redis URL (or $UPSTREAM_GUARD_REDIS_URL)")
    from . import _fleet  # noqa: PLC0415 - redis only for this subcommand

    act = _fleet.isolate if args.command == "isolate" else _fleet.reset
    with _redis_client(redis_url, 3.0) as client:
        try:
            _redis_call(redis_url, lambda: act(client, args.prefix, args.name))
        except _fleet.FleetError as exc:
            raise CommandError(str(exc)) from None
    done = "isolated: every call is refused" if args.command == "isolate" else "reset to closed"
    print(f"{args.name} {done} fleet-wide; workers apply it at their next sync")  # noqa: T201
    return 0


@contextlib.contextmanager
def _redis_client(url: str, timeout: float) -> Iterator[Any]:
    from ._redis import connect_sync  # noqa: PLC0415

    try:
        client = connect_sync(url, timeout)
    except ImportError:  # redis is an optional dependency
        raise CommandError(
            "--redis needs the redis package: pip install 'upstream-guard[redis]'"
        ) from None
    except ValueError as exc:
        raise CommandError(f"not a Redis URL: {_safe(url)} ({exc})") from None
    try:
        yield client
    finally:
        client.close()


def _redis_call(url: str, fn: Callable[[], T]) -> T:
    import redis  # noqa: PLC0415

    try:
        return fn()
    except redis.RedisError as exc:
        raise CommandError(f"cannot use Redis at {_safe(url)}: {exc}") from None


def _safe(url: str) -> str:
    from ._redis import _safe_url  # noqa: PLC0415

    return _safe_url(url)


# -- simulate ----------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._loopback import listening_socket  # noqa: PLC0415
    from ._simulator import Fault, SpotifySimulator  # noqa: PLC0415

    try:
        fault = Fault.parse(args.fault)
    except ValueError as exc:
        parser.error(f"--fault: {exc}")
    try:
        import uvicorn  # noqa: PLC0415 - only this subcommand serves
    except ImportError:
        raise CommandError(
            "simulate needs uvicorn: pip install 'upstream-guard[testing]'"
        ) from None
    sim = SpotifySimulator(control_path=CONTROL_PATH)
    sim.set_fault(fault, args.prefix)
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{port}"
    where = f" under {args.prefix}" if args.prefix else ""
    print(  # noqa: T201
        f"Simulated Spotify on {base} (fault: {fault.spec()}{where}). Point an upstream's "
        f"hosts at {host}:{port}; switch the fault with: "
        f"curl -X PUT --data rate_limited:30 {base}{CONTROL_PATH}/fault",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(sim, log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sim.release()
        sock.close()
    return 0


def console() -> None:
    """The console script's entry point."""
    sys.exit(main())
