"""Runs the m1serve load test headless for a bounded time and prints a short summary.

    python -m loadtest.run --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:9000 -u 8 -t 60s --profile default
    loadtest/run.sh ...same arguments...

Locust runs as its own process (`python -m locust -f loadtest/locustfile.py --headless ...`); this module never
imports locust, gevent, requests or ray. The output folder gets:
  locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv  (locust's CSV)
  report.html    locust's HTML report          results.json  the locustfile's token counts, exact percentiles
  locust.log     locust's output               summary.json  what the summary prints
Exit code: 0 when every request succeeded; 1 when any request failed, a user raised, no request finished, or
locust itself failed; 2 for bad arguments.
Arguments after `--` go to locust unchanged (e.g. `-- --think-time 0.5 --profile-seed 1`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
USER_CLASSES = {"http": "HttpChatUser", "grpc": "GrpcStreamUser"}
ENTRIES = ("ttft", "itl", "tpot", "e2e")


def parse_timespan(text: str) -> int:
    """locust's -t format: 90, 90s, 2m, 1h30m, 1m30s -> seconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30s, 5m, 1h30m)")
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True, help="HTTP base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--grpc-target", default="127.0.0.1:9000", help="HOST:PORT of the gRPC API")
    p.add_argument("--transport", choices=["both", "http", "grpc"], default="both",
                   help="which users run (both: HTTP and gRPC users in equal numbers)")
    p.add_argument("-u", "--users", type=int, default=8, help="concurrent users (closed loop: the concurrency)")
    p.add_argument("-r", "--spawn-rate", type=float, default=None, help="users started per second (default: all "
                                                                         "at once)")
    p.add_argument("-t", "--duration", type=parse_timespan, default=60, help="run time, e.g. 20s, 5m (default 60s)")
    p.add_argument("--profile", default="default", help="loadtest/profiles/NAME.json|yaml, or a path")
    p.add_argument("--request-rate", type=float, default=0.0,
                   help="open loop: requests/s over all users (0: closed loop); users is then the pool size")
    p.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--model-name", default="", help="default: discovered from /v1/models")
    p.add_argument("--out", type=Path, default=None, help="output folder (default loadtest/results/<time>, "
                                                              "git-ignored)")
    p.add_argument("--stop-timeout", type=int, default=120,
                   help="seconds in-flight requests get to finish after the run time (default 120)")
    p.add_argument("--quiet", action="store_true", help="do not echo locust's output")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="after --: extra locust arguments")
    return p


def locust_command(args, out: Path) -> list[str]:
    classes = list(USER_CLASSES.values()) if args.transport == "both" else [USER_CLASSES[args.transport]]
    extra = list(args.locust_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate or args.users), "-t", f"{args.duration}s",
           "--stop-timeout", str(args.stop_timeout), "--host", args.host, "--grpc-target", args.grpc_target,
           "--profile", args.profile, "--request-rate", str(args.request_rate), "--arrival", args.arrival,
           "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--results-json", str(out / "results.json"), "--only-summary"]
    if args.model_name:
        cmd += ["--model-name", args.model_name]
    return cmd + extra + classes


def read_stats(out: Path) -> dict[tuple[str, str], dict]:
    """locust_stats.csv rows by (type, name); the aggregated row is ("", "Aggregated")."""
    path = out / "locust_stats.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def count_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def _csv_percentiles(row: dict | None) -> dict:
    if not row or not int(row["Request Count"]):
        return {"count": 0}
    return {"count": int(row["Request Count"]), "p50": float(row["50%"]), "p90": float(row["90%"]),
            "p99": float(row["99%"])}


def summarize(out: Path, locust_rc: int, transports: list[str]) -> dict:
    stats = read_stats(out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    per = {}
    for t in transports:
        r = results.get("transports", {}).get(t, {})
        e2e = stats.get((t, "e2e"))
        per[t] = {
            "requests": int(e2e["Request Count"]) if e2e else r.get("requests", 0) + r.get("failures", 0),
            "failures": int(e2e["Failure Count"]) if e2e else r.get("failures", 0),
            "output_tokens": r.get("output_tokens", 0),
            "output_tokens_per_s": r.get("output_tokens_per_s", 0.0),
            # exact percentiles from the locustfile; locust's CSV (ms rounded, bucketed) when it wrote none
            **{f"{e}_ms": r.get(f"{e}_ms") or _csv_percentiles(stats.get((t, e))) for e in ENTRIES},
        }
    aggregated = stats.get(("", "Aggregated"))
    failures = int(aggregated["Failure Count"]) if aggregated else sum(p["failures"] for p in per.values())
    exceptions = count_rows(out / "locust_exceptions.csv")
    requests = sum(p["requests"] for p in per.values())
    problems = []
    if locust_rc != 0:
        problems.append(f"locust exited with {locust_rc}")
    if failures:
        problems.append(f"{failures} failed requests (see locust_failures.csv)")
    if exceptions:
        problems.append(f"{exceptions} kinds of errors raised in users (see locust_exceptions.csv)")
    if not stats:
        problems.append("locust wrote no stats")
    if not results:
        problems.append("the locustfile wrote no results.json")
    for t in transports:
        if per[t]["requests"] - per[t]["failures"] <= 0:
            problems.append(f"no {t} request finished")
    return {"ok": not problems, "problems": problems, "requests": requests, "failures": failures,
            "exceptions": exceptions, "output_tokens": sum(p["output_tokens"] for p in per.values()),
            "output_tokens_per_s": results.get("total", {}).get("output_tokens_per_s", 0.0),
            "duration_s": results.get("duration_s"), "late_starts": results.get("late_starts"),
            "transports": per}


def _pct(p: dict) -> str:
    if not p or not p.get("count"):
        return "-"
    return "/".join(f"{p[k]:.0f}" if p[k] >= 10 else f"{p[k]:.1f}" for k in ("p50", "p90", "p99"))


def format_summary(s: dict, args, out: Path) -> str:
    mode = (f"open loop {args.request_rate:g} req/s ({args.arrival}), {args.users} users"
            if args.request_rate > 0 else f"closed loop, {args.users} users")
    lines = [f"m1serve load test: profile {args.profile}, {args.duration}s, {mode}",
             f"{'transport':<9} {'requests':>8} {'failures':>8} {'out tok':>8} {'tok/s':>8}  "
             f"{'ttft p50/p90/p99 ms':>20} {'itl p50/p90/p99 ms':>20} {'e2e p50/p90/p99 ms':>20}"]
    for t, p in s["transports"].items():
        lines.append(f"{t:<9} {p['requests']:>8} {p['failures']:>8} {p['output_tokens']:>8} "
                     f"{p['output_tokens_per_s']:>8.1f}  {_pct(p['ttft_ms']):>20} {_pct(p['itl_ms']):>20} "
                     f"{_pct(p['e2e_ms']):>20}")
    lines.append(f"{'total':<9} {s['requests']:>8} {s['failures']:>8} {s['output_tokens']:>8} "
                 f"{s['output_tokens_per_s']:>8.1f}")
    if s.get("late_starts"):
        lines.append(f"warning: {s['late_starts']} arrivals started late: too few users for the request rate")
    lines.append(f"reports: {out}/report.html, {out}/locust_stats.csv, {out}/results.json")
    lines.append("PASS" if s["ok"] else "FAIL: " + "; ".join(s["problems"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.users < (2 if args.transport == "both" else 1):
        print("--users must be >= 1 (>= 2 with --transport both: one HTTP and one gRPC user)", file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "summary.json", "locust_stats.csv", "locust_failures.csv",
                  "locust_exceptions.csv", "locust_stats_history.csv", "report.html"):
        (out / stale).unlink(missing_ok=True)
    cmd = locust_command(args, out)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    transports = ["http", "grpc"] if args.transport == "both" else [args.transport]
    # bounded: run time + the graceful stop + start-up and report writing
    limit = args.duration + args.stop_timeout + 60
    with (out / "locust.log").open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        killer = threading.Timer(limit, proc.kill)  # a silent, hung locust is killed too
        killer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if not args.quiet:
                    sys.stdout.write(line)
            rc = proc.wait()
        finally:
            timed_out = not killer.is_alive() and proc.returncode is not None and proc.returncode < 0
            killer.cancel()
        if timed_out:
            log.write(f"\nkilled: locust ran past {limit}s\n")
            print(f"locust ran past {limit}s and was killed", file=sys.stderr)
    summary = summarize(out, rc, transports)
    summary.update(profile=args.profile, users=args.users, duration_s_requested=args.duration,
                   request_rate=args.request_rate, host=args.host, grpc_target=args.grpc_target,
                   locust_rc=rc)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    sys.stdout.flush()
    print(format_summary(summary, args, out), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
