"""Compare a baseline and a guarded run of one peer suite from their JUnit XML reports.

    python compare.py BASELINE.xml GUARDED.xml [FLAKY.txt]

Prints the outcome counts of each run, then every test that passed in the baseline and did not
pass with the guard, grouped by the first line of its failure message (exception type first),
then tests that failed in both runs with different messages (a flaky baseline failure can hide
a guard failure), then any test that failed in the baseline and passed with the guard. Tests
named in FLAKY.txt (node ids, "# reason" after them) are listed apart and not counted.
Exit code: 0 when no test got worse, 1 otherwise.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, first line of the message) for one JUnit XML report."""
    found: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                message = (child.get("message") or child.text or "").strip()
                break
        if outcome == "error" and test_id in found:
            # An error in teardown comes as a second entry for a test already seen.
            outcome = "error(teardown)"
        found[test_id] = (outcome, message.splitlines()[0] if message else "")
    return found


def flaky_ids(path: str | None) -> set[str]:
    """Node ids (tests/x.py::Class::test[p]) from a list file, in this module's id form."""
    found: set[str] = set()
    if not path:
        return found
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            nodeid = line.split("#", 1)[0].strip()
            if not nodeid:
                continue
            parts = nodeid.split("::")
            module = parts[0].removesuffix(".py").replace("/", ".")
            found.add(".".join([module, *parts[1:-1]]) + "::" + parts[-1])
    return found


def _group(message: str) -> str:
    head = re.sub(r"0x[0-9a-f]+", "0x…", message)
    head = re.sub(r"\d+(\.\d+)?", "N", head)
    return head[:160]


def main(baseline_path: str, guarded_path: str, flaky_path: str | None = None) -> int:
    base, guarded = outcomes(baseline_path), outcomes(guarded_path)
    flaky = flaky_ids(flaky_path)
    for label, run in (("baseline", base), ("guarded", guarded)):
        counts = Counter(outcome for outcome, _ in run.values())
        print(f"  {label}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    worse = {
        t: guarded.get(t, ("missing", ""))
        for t, (o, _) in base.items()
        if o == "passed" and guarded.get(t, ("missing", ""))[0] != "passed"
    }
    known = {t: v for t, v in worse.items() if t in flaky}
    worse = {t: v for t, v in worse.items() if t not in flaky}
    better = [
        t for t, (o, _) in base.items() if o != "passed" and guarded.get(t, ("",))[0] == "passed"
    ]
    print(f"  passed in baseline, not with the guard: {len(worse)}")
    groups: dict[str, list[str]] = defaultdict(list)
    for test_id, (outcome, message) in sorted(worse.items()):
        groups[f"[{outcome}] {_group(message)}"].append(test_id)
    for key, tests in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"    {len(tests)} x {key}")
        for test_id in tests:
            print(f"        {test_id}")
    for test_id, (_outcome, message) in sorted(known.items()):
        print(f"  known flaky (flaky-*.txt), not counted: {test_id}: {message[:100]}")
    differently = [
        t
        for t, (o, m) in base.items()
        if o in ("failed", "error")
        and guarded.get(t, ("", ""))[0] in ("failed", "error")
        and _group(guarded[t][1]) != _group(m)
    ]
    if differently:
        print(f"  failed in both runs, for different reasons: {len(differently)}")
        for test_id in differently:
            print(f"        {test_id}")
            print(f"            baseline: {base[test_id][1][:120]}")
            print(f"            guarded:  {guarded[test_id][1][:120]}")
    if better:
        print(f"  failed in baseline, passed with the guard: {len(better)}")
        for test_id in better:
            print(f"        {test_id}  (baseline: {base[test_id][1][:100]})")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
