"""Shared helpers for the benchmark scripts: machine description, tables, result files."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from upstream_guard import CircuitOpenError

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """One line describing where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"{platform.system()} {platform.release()}"
    )


def median_us(samples: list[float]) -> float:
    """Median of per-call seconds, in microseconds."""
    return statistics.median(samples) * 1e6


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def write(name: str, title: str, body: str) -> Path:
    """Print and save a result file with the machine description."""
    RESULTS.mkdir(exist_ok=True)
    load = (
        f" (1-min load average when written, this run included: {os.getloadavg()[0]:.2f})"
        if hasattr(os, "getloadavg")
        else ""
    )
    text = (
        f"# {title}\n\nMeasured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on: {machine()}{load}"
        f"\n\n{body}\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


async def per_call(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """Mean seconds per call of ``n`` awaited calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - start) / n


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, list[float]]:
    """Warm every variant up once, then run them in turn, ``rounds`` times: drift on the
    machine hits them all alike. Each variant returns one sample (seconds per call).
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        await run()
    order = list(variants)
    shuffle = random.Random(0).shuffle  # the same orders on every run
    for _ in range(rounds):
        shuffle(order)  # no variant always runs first (or right after a costly one)
        for name in order:
            samples[name].append(await variants[name]())
    return samples


def transport_costs(
    guard: Any, inner: Any, url: str, other: str, calls: int
) -> dict[str, Callable[[], Awaitable[float]]]:
    """What the guard's async transport does before ``inner`` is reached, as three timers.

    ``inner``: the inner transport alone, on a host no upstream claims; ``pass-through``: the
    guard's transport passing that host on; ``refusal``: a second guard, its breaker forced
    open, refusing ``url``. Each returns seconds per call over ``calls`` calls.
    """
    open_guard = type(guard)(guard.settings)
    open_guard.upstreams["spotify_api"].breakers["spotify_api"].force_open()
    open_transport = open_guard.async_transport(inner)
    pass_transport = guard.async_transport(inner)
    refused_request = httpx.Request("GET", url)
    other_request = httpx.Request("GET", other)

    async def refused() -> None:
        with contextlib.suppress(CircuitOpenError):
            await open_transport.handle_async_request(refused_request)

    return {
        "inner": lambda: per_call(lambda: inner.handle_async_request(other_request), calls),
        "pass-through": lambda: per_call(
            lambda: pass_transport.handle_async_request(other_request), calls
        ),
        "refusal": lambda: per_call(refused, calls),
    }


def _valgrind_env() -> dict[str, str]:
    """The environment of a counted script: hashing fixed, the benchmarks directory first on
    its path (ahead of any PYTHONPATH already set)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path}


def _callgrind(tmp: str, script: str, args: list[str], *options: str) -> str:
    """Run ``script`` with ``args`` under callgrind, its output files in ``tmp``; valgrind's
    report (stderr)."""
    path = Path(tmp) / "counted.py"
    path.write_text(script)
    return subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            *options,
            f"--callgrind-out-file={tmp}/cg.out",
            sys.executable,
            str(path),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=_valgrind_env(),
    ).stderr


def instructions_per_call(script: str, args: list[str], short: int, long: int) -> float:
    """Instructions per call of ``script`` by callgrind (within about 0.3% from run to run).

    The script is run twice under valgrind, with ``args`` followed by a call count of
    ``short`` then ``long``; start-up and warm-up cancel in the difference. The benchmarks
    directory is on the script's path.
    """

    def run(calls: int) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            report = _callgrind(tmp, script, [*args, str(calls)])
        match = re.search(r"refs:\s+([\d,]+)", report)
        if match is None:
            raise RuntimeError(f"no instruction count in valgrind's output: {report[-500:]}")
        return int(match.group(1).replace(",", ""))

    return (run(long) - run(short)) / (long - short)


MARK = "os.getppid()"
"""What a script measured by ``instructions_between_marks`` calls at each mark (callgrind
dumps its counts when CPython's ``os_getppid`` is entered; nothing else here calls it)."""


def instructions_between_marks(script: str, args: list[str]) -> list[int]:
    """Instructions from each mark to the next in one callgrind run of ``script``.

    One run measures several loops, so the interpreter's start-up (most of the time under
    valgrind) is paid once. The benchmarks directory is on the script's path.
    """
    with tempfile.TemporaryDirectory() as tmp:
        _callgrind(tmp, script, args, "--dump-before=os_getppid")
        # cg.out.1 holds everything up to the first mark, cg.out.N the stretch ending at the
        # N-th mark, cg.out what followed the last.
        counts = []
        number = 2
        while (dump := Path(tmp) / f"cg.out.{number}").exists():
            match = re.search(r"^summary:\s+(\d+)", dump.read_text(), re.MULTILINE)
            if match is None:
                raise RuntimeError(f"no summary line in callgrind's dump {dump.name}")
            counts.append(int(match.group(1)))
            number += 1
    return counts
