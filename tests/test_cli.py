"""The upstream-guard command, run as the installed console script against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import make_settings
from test_workers import Workers
from upstream_guard import Guard
from upstream_guard._cli import main
from upstream_guard.testing import Fault, RedisServer, SpotifySimulator, free_port, serve

COMMAND = str(Path(sys.executable).with_name("upstream-guard"))
HEALTH = "/_upstream_guard/health"


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_GUARD_")}
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("upstream-guard")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)  # sleep-ok: waiting on real worker processes to sync
    return check()


def isolated_answer(answer: httpx.Response) -> bool:
    """The guard's 503 problem for an isolated upstream."""
    return answer.status_code == 503 and "(isolated)" in answer.json().get("detail", "")


def ok_answer(answer: httpx.Response) -> bool:
    """The upstream's own answer, let through."""
    return answer.status_code == 200


def every_worker_says(workers: Workers, check: Callable[[httpx.Response], bool]) -> bool:
    """Whether a round of answers from every worker all pass ``check`` (each has synced)."""
    return all(map(check, workers.answers_from_all(2, until=time.monotonic() + 10)))


def test_help_is_import_light():
    """--help works without importing FastAPI, uvicorn or the fleet's Redis code."""
    code = (
        "import sys\n"
        "from upstream_guard._cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'upstream_guard._fleet')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.splitlines()[-1] == "[]"
    help_text = run("--help").stdout
    for verb in ("status", "isolate", "reset", "simulate"):
        assert verb in help_text


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], 2, "required: COMMAND"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["status"], 2, "status needs --redis URL"),
        (["status", "--redis", "redis://x", "--url", "http://x"], 2, "not both"),
        (["isolate"], 2, "NAME"),
        (["isolate", "spotify_api"], 2, "isolate needs --redis URL"),
        (["simulate"], 2, "--port"),
        (["simulate", "--port", "http"], 2, "not a port number: 'http'"),
        (["simulate", "--port", "70000"], 2, "port out of range"),
        (["simulate", "--port", "0", "--fault", "on_fire"], 2, "unknown fault 'on_fire'"),
        (["simulate", "--port", "0", "--fault", "flapping:2"], 2, "bad argument for fault"),
        (["simulate", "--port", "0", "--fault", "rolling_window:90"], 2, "CALLS/SECONDS"),
        (
            ["status", "--redis", "redis://127.0.0.1:1/0"],
            1,
            "cannot use Redis at redis://127.0.0.1:1/0",
        ),
        (["status", "--redis", "mysql://x"], 1, "not a Redis URL"),
        (
            ["reset", "spotify_api", "--redis", "redis://u:pw@127.0.0.1:1/0"],
            1,
            "redis://***@127.0.0.1:1/0",
        ),
        (
            ["status", "--url", "http://127.0.0.1:1/health"],
            1,
            "cannot reach http://127.0.0.1:1/health",
        ),
        (["status", "--url", "ftp://example.invalid/"], 1, "not an http(s) URL"),
    ],
)
def test_bad_command_lines_give_one_line(args, code, needle, capsys, monkeypatch):
    """Each mistake: one line on stderr naming it, exit 2 (command line) or 1, no traceback."""
    for name in [k for k in os.environ if k.startswith("UPSTREAM_GUARD_")]:
        monkeypatch.delenv(name)
    try:
        returned = main(args)
    except SystemExit as exc:  # argparse exits on a bad command line
        returned = exc.code
    out, err = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess(args, returned, out, err), code, needle)
    assert "pw@" not in err


def test_the_installed_command_reports_in_one_line():
    """The console script itself: a bad argument and an unreachable Redis, one line each."""
    one_line_error(run("simulate", "--port", "http"), 2, "not a port number")
    one_line_error(run("status", "--redis", "redis://127.0.0.1:1/0"), 1, "cannot use Redis")


def test_unknown_upstream_and_non_health_url(redis_url, sim_url):
    """An upstream Redis never saw, and a URL that is not a health endpoint: one line, exit 1."""
    one_line_error(
        run("isolate", "spotfy_api", "--redis", redis_url), 1, "no upstream named 'spotfy_api'"
    )
    one_line_error(run("status", "--url", f"{sim_url}/v1/me"), 1, "without a health document")


def test_status_of_one_app_table_and_json(sim, sim_url):
    """--url reads one app's health: a table people read and JSON equal to the document."""
    from fastapi import FastAPI

    from upstream_guard import install

    app = FastAPI()
    guard = install(app, make_settings(sim_url))
    with serve(app) as url:
        guard.isolate("spotify_api")
        table = run("status", "--url", url + HEALTH)
        as_json = run("status", "--url", url + HEALTH, "--json")
        document = httpx.get(url + HEALTH).json()
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"{url}{HEALTH}: unavailable (shared state: off)"
    assert lines[1].split() == [
        "UPSTREAM",
        "STATE",
        "FAILURES",
        "CONSECUTIVE",
        "RETRY",
        "AFTER",
        "COOLDOWN",
        "PACE",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["spotify_api"][:4] == ["spotify_api", "isolated", "0", "0"]
    assert rows["spotify_accounts"][1] == "closed"
    assert rows["spotify_api"][-1] == "-"  # no pace configured or learned yet
    assert json.loads(as_json.stdout) == document


def test_fleet_isolate_reset_with_two_workers_and_a_restart(redis_url):
    """isolate/reset through the command reach both uvicorn workers; isolation outlives a restart."""
    sim = SpotifySimulator()
    with serve(sim) as sim_url:
        workers = Workers(2, sim_url, redis_url)
        try:
            old_pids = workers.wait_ready()
            status = json.loads(run("status", "--redis", redis_url, "--json").stdout)
            api = status["upstreams"]["spotify_api"]
            assert (api["state"], api["isolated"], len(api["workers"])) == ("closed", False, 2)

            isolated = run("isolate", "spotify_api", "--redis", redis_url)
            assert isolated.returncode == 0, isolated.stderr
            assert "spotify_api isolated" in isolated.stdout
            assert eventually(lambda: every_worker_says(workers, isolated_answer), timeout=10)
            hits = sim.total_hits
            answers = workers.answers_from_all(8, until=time.monotonic() + 10)
            assert all(a.status_code == 503 and "(isolated)" in a.json()["detail"] for a in answers)
            assert len({a.headers["x-pid"] for a in answers}) == 2
            assert sim.total_hits == hits
            health = httpx.get(workers.url + HEALTH)
            assert health.status_code == 503
            assert health.json()["upstreams"]["spotify_api"]["state"] == "isolated"

            table = run("status", "--redis", redis_url)
            assert table.returncode == 0
            header, *rows = table.stdout.splitlines()[1:]
            assert header.split() == [
                "UPSTREAM",
                "STATE",
                "ISOLATED",
                "FAILURES",
                "TRIPS",
                "COOLDOWN",
                "WORKERS",
                "LAST",
                "SYNC",
            ]
            row = next(r.split() for r in rows if r.startswith("spotify_api "))
            assert row[1:3] == ["isolated", "for"]
            assert row[row.index("for") + 2 :][3] == "2"  # workers seen

            # Both workers crash; uvicorn starts new ones, isolated from their first sync.
            for pid in old_pids:
                os.kill(int(pid), signal.SIGKILL)
            new_pids: set[str] = set()
            deadline = time.monotonic() + 60
            while len(new_pids) < 2 and time.monotonic() < deadline:
                answer = workers.get_safe()
                if answer is not None and answer.headers["x-pid"] not in old_pids:
                    new_pids.add(answer.headers["x-pid"])
            assert len(new_pids) == 2, "the workers did not restart"
            assert eventually(lambda: every_worker_says(workers, isolated_answer), timeout=10)
            hits = sim.total_hits
            answers = workers.answers_from_all(8, until=time.monotonic() + 10)
            assert all("(isolated)" in a.json()["detail"] for a in answers)
            assert {a.headers["x-pid"] for a in answers} == new_pids
            assert sim.total_hits == hits

            reset = run("reset", "spotify_api", "--redis", redis_url)
            assert reset.returncode == 0, reset.stderr
            assert eventually(lambda: every_worker_says(workers, ok_answer), timeout=10)
            answers = workers.answers_from_all(8, until=time.monotonic() + 10)
            assert [a.status_code for a in answers] == [200] * len(answers)
            assert len({a.headers["x-pid"] for a in answers}) == 2
            status = json.loads(run("status", "--redis", redis_url, "--json").stdout)
            assert status["upstreams"]["spotify_api"]["state"] == "closed"
            assert status["upstreams"]["spotify_api"]["isolated"] is False
        finally:
            workers.stop()


def test_fleet_status_counts_failures_and_cooldowns(sim, sim_url, redis_url):
    """status --redis sums failures over workers and shows a shared cooldown."""
    settings = make_settings(sim_url, retry={"attempts": 1}, breaker={"fail_max": 10})
    settings = settings.model_copy(update={"redis_url": redis_url})
    a, b = Guard(settings), Guard(settings)
    sim.set_fault(Fault.no_healthy_upstream())
    for guard in (a, b):
        with httpx.Client(transport=guard.sync_transport()) as client:
            client.get(f"{sim_url}/v1/me")
        guard.shared.sync_now()  # type: ignore[union-attr]
    sim.set_fault(Fault.rate_limited(60))
    with httpx.Client(transport=a.sync_transport()) as client:
        client.get(f"{sim_url}/v1/me")
    a.shared.sync_now()  # type: ignore[union-attr]
    status = json.loads(run("status", "--redis", redis_url, "--json").stdout)
    api = status["upstreams"]["spotify_api"]
    assert (api["state"], api["failures"], api["trips"], len(api["workers"])) == ("closed", 2, 0, 2)
    assert 55 < api["cooldown_s"] <= 60
    assert status["upstreams"]["spotify_accounts"]["failures"] == 0
    assert set(api["breakers"]) == {"spotify_api"}


def test_simulate_serves_each_fault_and_switches_over_http():
    """simulate --fault answers as that fault; PUT on its control path switches it live."""
    port = free_port()
    process = subprocess.Popen(
        [COMMAND, "simulate", "--port", str(port), "--fault", "rate_limited:7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    control = f"{base}/_simulator/fault"
    try:
        banner = process.stdout.readline()  # type: ignore[union-attr]
        assert f"Simulated Spotify on {base} (fault: rate_limited:7)" in banner
        with httpx.Client(base_url=base, timeout=5) as client:
            first = client.get("/v1/me")
            assert (first.status_code, first.headers["retry-after"]) == (429, "7")
            expected = {
                "healthy": (200, "application/json"),
                "no_healthy_upstream": (503, "text/plain"),
                "json_5xx:502": (502, "application/json"),
                "status:401": (401, "application/json"),
                "slow:0.01": (200, "application/json"),
                "flapping:1": (503, "text/plain"),
                "flapping:0": (200, "application/json"),
                "rate_limited": (429, "application/json"),
            }
            for spec, (status, kind) in expected.items():
                switched = client.put(control, content=spec)
                assert switched.status_code == 200, switched.text
                answer = client.get("/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp")
                assert answer.status_code == status, spec
                assert answer.headers["content-type"].startswith(kind)
            assert client.get(control).json()["faults"] == {"": "rate_limited:1"}
            client.put(control, content="rolling_window:2/60")  # 2 calls a minute, then 429
            window = [client.get("/v1/me").status_code for _ in range(3)]
            assert window == [200, 200, 429]
            assert client.get(control).json()["faults"] == {"": "rolling_window:2/60"}
            client.put(control, content="hang")
            with pytest.raises(httpx.ReadTimeout):
                client.get("/v1/me", timeout=0.3)
            client.delete(control)  # heals, and lets the hanging request go
            assert client.get("/v1/me").status_code == 200
            scoped = client.put(control, params={"prefix": "/v1/tracks"}, content="json_5xx")
            assert scoped.json()["faults"] == {"/v1/tracks": "json_5xx:500"}
            assert client.get("/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp").status_code == 500
            assert client.get("/v1/me").status_code == 200
            bad = client.put(control, content="on_fire")
            assert bad.status_code == 400
            assert "unknown fault 'on_fire'" in bad.json()["error"]
            assert client.post(control).status_code == 405
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_simulate_on_a_port_in_use_is_one_line():
    """A taken port: one line saying so, exit 1."""
    with serve(SpotifySimulator()) as url:
        port = url.rsplit(":", 1)[1]
        one_line_error(run("simulate", "--port", port), 1, f"cannot listen on 127.0.0.1:{port}")


def test_commands_on_a_redis_cluster(sim, sim_url, redis_cluster, capsys):
    """status, isolate and reset take the guard's redis+cluster:// URL too."""
    client = redis_cluster.client()
    client.flushall()
    settings = make_settings(sim_url).model_copy(update={"redis_url": redis_cluster.url})
    guard = Guard(settings)
    guard.shared.sync_now()  # type: ignore[union-attr]
    assert main(["isolate", "spotify_api", "--redis", redis_cluster.url]) == 0
    guard.shared.sync_now()  # type: ignore[union-attr]
    assert guard.state("spotify_api") == "isolated"
    capsys.readouterr()
    assert main(["status", "--redis", redis_cluster.url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["upstreams"]["spotify_api"]["state"] == "isolated"
    assert len(status["upstreams"]["spotify_api"]["workers"]) == 1
    assert main(["reset", "spotify_api", "--redis", redis_cluster.url]) == 0
    guard.shared.sync_now()  # type: ignore[union-attr]
    assert guard.state("spotify_api") == "closed"
