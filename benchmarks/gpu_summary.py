"""The GPU check's summary (run last by benchmarks/gpu_check.sh): the goal, the records, the verdict.

    python -m benchmarks.gpu_summary --out FILE [--dry-run] [--part-status NAME=STATUS ...]
                                     [--tests-log FILE] [--tests-xml FILE]

The goal per shape, printed plainly and stored under "goal": ours_nitp / liger_flce time and ours_nitp /
liger_flce_fp32 peak memory; the goal is <= 1.0 each (CE + NITP on our op no slower than Liger's CE-only FLCE
with its defaults, and no more memory than Liger's FLCE with the fp32 weight-gradient buffer we keep too).
Also stored: the parts' exit statuses ("parts") and the CUDA tests' counts from pytest's JUnit XML ("tests").
Exit status 1 when the check is not clean: a part that did not finish, a record that ended in an error, out of
memory or unmeasured for want of time, a failing test, or (on a GPU) no test that passed.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks.gpu_report import Report, Settings, first_line, line_figures, settings_for


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or not math.isfinite(a / b):
        return None
    return a / b


def goal_rows(report: Report, settings: Settings) -> list[dict]:
    """Per shape: ours_nitp / liger_flce time and ours_nitp / liger_flce_fp32 peak memory (goal: <= 1.0 each)."""
    rows = []
    for d, n in settings.shapes:
        get = {m: report.find(m, d, n) or {} for m in ("ours_nitp", "liger_flce", "liger_flce_fp32")}
        time_ratio = _ratio(get["ours_nitp"].get("ms"), get["liger_flce"].get("ms"))
        peak_ratio = _ratio(get["ours_nitp"].get("peak_mib"), get["liger_flce_fp32"].get("peak_mib"))
        missing = {m: r.get("status", "not run") for m, r in get.items() if r.get("status") != "ok"}
        rows.append({"d": d, "V": settings.vocab, "N": n, "time_ours_nitp_over_liger_flce": time_ratio,
                     "peak_ours_nitp_over_liger_flce_fp32": peak_ratio,
                     "time_goal_met": None if time_ratio is None else time_ratio <= 1.0,
                     "memory_goal_met": None if peak_ratio is None else peak_ratio <= 1.0, "missing": missing})
    return rows


def summary_text(report: Report, settings: Settings) -> str:
    def verdict(value: float | None, met: bool | None) -> str:
        return "not measured" if value is None else f"{value:.3f}  {'MET' if met else 'NOT MET'}"

    lines = ["== records (ms: median fwd+bwd; peak: MiB above the inputs; grad err: max|g-ref|/max|ref|) =="]
    for rec in report.data["records"]:
        lines.append(f"  {rec['method']:20s} d={rec['d']:5d} N={rec['N']:6d} {line_figures(rec)}")
    lines.append("== GOAL: ours_nitp (CE + NITP) time <= Liger FLCE (defaults), peak memory <= Liger FLCE "
                 "accum_dtype=fp32; ratios <= 1.0 ==")
    for row in report.data.get("goal", []):
        lines.append(f"  d={row['d']:5d} V={row['V']} N={row['N']:6d}: time ours_nitp/liger_flce = "
                     f"{verdict(row['time_ours_nitp_over_liger_flce'], row['time_goal_met'])};  peak "
                     f"ours_nitp/liger_flce_fp32 = "
                     f"{verdict(row['peak_ours_nitp_over_liger_flce_fp32'], row['memory_goal_met'])}")
        for method, status in row["missing"].items():
            lines.append(f"      {method}: {status[:140]}")
    return "\n".join(lines)


def junit_counts(path: Path) -> dict:
    """Counts from pytest's JUnit XML, with test modules that failed to import kept apart from failing tests
    (on a GPU machine without the engine's extras, modules that need them fail to import; they hold no CUDA
    tests unless they are listed here, which the summary says loudly)."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "modules_not_importable": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        error = case.find("error")
        if error is not None and error.get("message", "").startswith("collection failure"):
            counts["modules_not_importable"].append(case.get("name"))
        elif error is not None:
            counts["errors"] += 1
        elif case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def verdict(report: Report, dry_run: bool) -> list[str]:
    """Why the check is not clean (empty when it is): a part that did not finish, a record that ended in an
    error, out of memory or unmeasured, a failing or missing test. (A method unavailable here is not a problem
    of the check: its record says why.)"""
    problems = [f"part {name} exit status {status}" for name, status in report.data.get("parts", {}).items()
                if name != "tests" and status != "0"]
    statuses = [r["status"] for r in report.data.get("records", [])]
    for kind, label in (("error", "ended in an error"), ("oom", "ran out of memory"),
                        ("unavailable: not measured", "were not measured (time budget)")):
        count = sum(status.startswith(kind) for status in statuses)
        if count:
            problems.append(f"{count} records {label}")
    tests = report.data.get("tests", {})
    counts = tests.get("counts")
    if counts is None:
        problems.append(f"no test results ({tests.get('last_line', 'no log')})")
    else:
        if counts["failed"] or counts["errors"]:
            problems.append(f"CUDA tests: {counts['failed']} failed, {counts['errors']} errors")
        if not dry_run and not counts["passed"]:
            problems.append("no CUDA test passed")
    return problems


def summarize(args: argparse.Namespace, settings: Settings) -> int:
    """Goal rows, parts, tests into the JSON; the summary printed; 1 when the check is not clean."""
    report = Report.load(args.out) if args.out.exists() else Report.fresh(args.out, {})
    report.data.setdefault("records", [])
    report.data["goal"] = goal_rows(report, settings)
    report.data.setdefault("parts", {}).update(item.split("=", 1) for item in args.part_status)
    tests: dict = {}
    if args.tests_log is not None and args.tests_log.exists():
        tail = [line for line in args.tests_log.read_text(errors="replace").splitlines() if line.strip()]
        tests["last_line"] = tail[-1] if tail else ""
    if args.tests_xml is not None and args.tests_xml.exists():
        try:
            tests["counts"] = junit_counts(args.tests_xml)
        except Exception as err:  # a cut run leaves no or half an XML file
            tests["counts_error"] = first_line(err)
    report.data["tests"] = tests
    report.save()
    print(summary_text(report, settings))
    counts = tests.get("counts") or {}
    if counts.get("modules_not_importable"):
        print("#" * 100 + "\n## test modules that could not be imported here (any CUDA tests in them did NOT run): "
              + ", ".join(counts["modules_not_importable"]) + "\n" + "#" * 100)
    problems = verdict(report, args.dry_run)
    print("gpu_check: " + ("clean: every part finished, every available method measured, no CUDA test failed"
                           if not problems
                           else "NOT clean: " + "; ".join(problems)))
    return 1 if problems else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU check: the goal, the records and the verdict")
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the dry run's shapes; no test needs to pass")
    parser.add_argument("--part-status", action="append", default=[], metavar="NAME=STATUS",
                        help="a part's exit status, stored under 'parts'")
    parser.add_argument("--tests-log", type=Path, help="pytest's output; its last line is stored")
    parser.add_argument("--tests-xml", type=Path, help="pytest's JUnit XML; its counts are stored")
    args = parser.parse_args(argv)
    for item in args.part_status:
        if "=" not in item:
            parser.error(f"--part-status takes NAME=STATUS, got {item!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return summarize(args, settings_for(args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
