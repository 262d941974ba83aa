"""``python -m benchmarks``: options, the run, and the report. The only place that exits."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import diagnose, report
from benchmarks.h2 import H2LOAD_THREADS
from benchmarks.load import IDLE_REQUEST, WRK_THREADS, write_wrk_script
from benchmarks.procs import (
    BenchError,
    load_average,
    machine_cpu_seconds,
    own_cpu_seconds,
    raise_nofile_limit,
)
from benchmarks.scenarios import (
    GRPC_KEYS,
    H2_SCENARIOS,
    IDLE_CONNECTIONS,
    IDLE_H2_SCENARIO,
    Results,
    Runner,
)
from benchmarks.servers import PROXIES, REPO, Lab
from benchmarks.tools import INSTALL_HINT, find_tools, git_revision, machine, versions

EXIT_OK = 0
EXIT_FAILURE = 1  # the benchmark could not run, or a proxy failed to start
EXIT_USAGE = 2  # bad options or a missing tool
EXIT_INTERRUPTED = 130


def progress(message: str) -> None:
    """A line of what a benchmark command is doing, on stderr (results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


# A 1-minute load average above this means other work shares the machine.
BUSY_LOAD = 1.0
DEFAULT_ROUNDS = 3
DEFAULT_DURATION = 5
QUICK_DURATION = 2
MIB = 1024**2
GIB = 1024**3
QUICK_BULK_MIB = 256  # keeps --quick under a minute; the full run moves 1 GiB
OUT = Path(__file__).resolve().parent / "out"
# --suite: h1 is scenarios 1-7 (HTTP/1.1, tcp, bulk), h2 is 8-11 (h2c, gRPC, idle HTTP/2).
SUITES = ("all", "h1", "h2")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    proxies = tuple(p for p in PROXIES if p in args.proxies.split(","))
    unknown = set(args.proxies.split(",")) - set(PROXIES)
    if unknown or not proxies:
        print(f"--proxies: choose from {','.join(PROXIES)}", file=sys.stderr)
        return EXIT_USAGE
    rounds = _pick(args.rounds, 1 if args.quick else DEFAULT_ROUNDS)
    duration = _pick(args.duration, QUICK_DURATION if args.quick else DEFAULT_DURATION)
    bulk_mib = _pick(args.bulk_mib, QUICK_BULK_MIB if args.quick else 1024)
    if rounds < 1 or duration < 1 or bulk_mib < 1:
        print("--rounds, --duration and --bulk-mib must be at least 1", file=sys.stderr)
        return EXIT_USAGE

    h1, h2 = args.suite in ("all", "h1"), args.suite in ("all", "h2")
    tools, missing = find_tools(need_haproxy="haproxy" in proxies, h1=h1, h2=h2)
    if tools is None:
        print(f"missing tool(s): {', '.join(missing)}", file=sys.stderr)
        print(f"install them with: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE

    nofile = raise_nofile_limit()
    started = datetime.now(UTC)
    clock = time.monotonic()
    busy_before, steal_before = machine_cpu_seconds()
    own_before = own_cpu_seconds()
    load_at_start = load_average()
    meta: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks", *argv]),
        "rounds": rounds,
        "duration_s": duration,
        "bulk_bytes": bulk_mib * MIB,
        "suite": args.suite,
        "wrk_threads": WRK_THREADS,
        "h2load_threads": H2LOAD_THREADS,
        "nofile": nofile,
        "machine": machine(),
        "versions": versions(tools),
        "revision": git_revision(REPO),
    }
    if load_at_start > BUSY_LOAD:
        progress(
            f"note: load average {load_at_start:.1f} before starting: something else is running"
            " on this machine, and the numbers will be noisier"
        )
    progress(
        f"sidelink benchmark: {rounds} round(s) of {duration}s per wrk run; wrk -t{WRK_THREADS}"
        f" on {meta['machine']['cores']} cores (load generator and proxy share the machine)"
    )

    tmp = Path(tempfile.mkdtemp(prefix="sidelink-bench-"))
    lab = Lab(tools, tmp, proxies, meta["bulk_bytes"], nofile, h2=h2)
    sidelink: dict[str, Any] = {}
    try:
        lab.start()
        if h2 and not lab.h2:  # the lab could not set HTTP/2 up (see lab.notes)
            h2, meta["suite"] = False, "h1" if h1 else "none"
        for name, why in lab.failed.items():
            progress(f"{name} FAILED TO START: {why}")
        for target in lab.targets:
            suffix = f" ({'; '.join(target.notes)})" if target.notes else ""
            tcp = target.tcp_port if target.tcp_port is not None else "n/a"
            line = f"{target.name:<9} http 127.0.0.1:{target.http_port} tcp {tcp}"
            if h2:
                h2c = f"{target.h2_host}:{target.h2_port}" if target.h2_port else "n/a"
                grpc = f"{target.grpc_host}:{target.grpc_port}" if target.grpc_port else "n/a"
                line += f" h2c {h2c} grpc {grpc}"
            progress(line + suffix)
        if h2 and lab.h2_ports is not None and lab.h2_ports.grpc is None:
            progress("grpcio is not installed: no gRPC scenario (pip install grpcio)")
        for note in lab.notes:
            progress(note)
        runner = Runner(lab, write_wrk_script(tmp), duration, rounds, progress, h1=h1, h2=h2)
        results = runner.run_all()
        results.notes[:0] = lab.notes
        if lab.sidelink_admin_port is not None:
            sidelink = {
                "log": diagnose.log_summary(tmp / "sidelink.log"),
                "metrics": diagnose.metrics(lab.sidelink_admin_port),
            }
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        lab.stop()
        if args.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - clock
    meta["elapsed_s"] = round(elapsed, 1)
    busy_after, steal_after = machine_cpu_seconds()
    # Everything the machine did that was neither this harness nor a process it started.
    other = (busy_after - busy_before) - (own_cpu_seconds() - own_before)
    meta["machine_load"] = {
        "load_average_at_start": load_at_start,
        "other_work_cores": round(max(other, 0.0) / elapsed, 2),
        "steal_cores": round((steal_after - steal_before) / elapsed, 2),
    }
    no_tcp = {t.name for t in lab.targets if t.tcp_port is None}
    no_h2 = {t.name for t in lab.targets if t.h2_port is None}
    unsupported = {scenario.key: no_h2 for scenario in H2_SCENARIOS}
    unsupported[IDLE_H2_SCENARIO] = no_h2
    no_grpc = {t.name for t in lab.targets if t.grpc_port is None}
    unsupported.update({key: no_grpc for key in GRPC_KEYS})
    columns = [*proxies, "direct"]
    rows = report.build_rows(
        results,
        columns,
        no_tcp=no_tcp,
        failed=set(lab.failed),
        bulk=_size(meta["bulk_bytes"]),
        unsupported=unsupported if h2 else None,
    )
    document = _document(
        meta, rows=rows, columns=columns, results=results, sidelink=sidelink, failed=lab.failed
    )
    print()
    print(document)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(document)
    payload = {
        **meta,
        "columns": columns,
        "rows": [row.as_json() for row in rows],
        "samples": report.samples_json(results),
        "errors": report.error_details(results),
        "notes": results.notes,
        "failed_to_start": lab.failed,
        "sidelink": sidelink,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    progress(f"wrote {out / 'results.md'} and {out / 'results.json'} ({meta['elapsed_s']}s)")
    return EXIT_FAILURE if lab.failed else EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sidelink vs HAProxy vs NGINX vs the direct path, on loopback.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2s runs (~80s; --suite h1 ~35s)"
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--duration", type=int, help=f"seconds per wrk run (default {DEFAULT_DURATION})"
    )
    parser.add_argument(
        "--bulk-mib",
        type=int,
        help=f"bulk body size in MiB (default 1024; --quick: {QUICK_BULK_MIB})",
    )
    parser.add_argument(
        "--proxies",
        default=",".join(PROXIES),
        help=f"comma-separated subset of {','.join(PROXIES)} (default: all)",
    )
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="all",
        help="h1: scenarios 1-7 (HTTP/1.1, tcp, bulk); h2: 8-11 (h2c, gRPC, idle HTTP/2);"
        " default all",
    )
    parser.add_argument("--out", default=str(OUT), help="output folder (default benchmarks/out)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return parser


def _document(
    meta: dict[str, Any],
    *,
    rows: list[report.TableRow],
    columns: list[str],
    results: Results,
    sidelink: dict[str, Any],
    failed: dict[str, str],
) -> str:
    m, v, load = meta["machine"], meta["versions"], meta["machine_load"]
    h2_method = []
    if meta["suite"] in ("all", "h2"):
        h2_method.append(
            f"- HTTP/2 (rows 8-11): h2load -t{meta['h2load_threads']} runs of"
            f" {meta['duration_s']}s, h2c prior knowledge, to two h2c nginx upstreams (127.0.0.2"
            " and 127.0.0.3, one worker each) that every proxy balances over; direct is h2load"
            " at the first of them alone; p50/p99 from h2load's per-request log. gRPC: a grpcio"
            " client, 1 or 10 unary calls in flight on one channel, to two grpcio servers"
            " (direct: the first; at x10 the Python servers are the bottleneck, so direct's one"
            " server may trail a proxy's two). Errors also count h2load's failed streams and"
            " non-OK gRPC status codes"
        )
    lines = [
        "# sidelink benchmark results",
        "",
        f"- date: {meta['date']}; command: `{meta['command']}`; took {meta['elapsed_s']}s",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['python']}",
        "- versions: " + "; ".join(f"{k} {val}" for k, val in v.items()),
        f"- sidelink revision: {meta['revision']}",
        f"- method: medians of {meta['rounds']} interleaved round(s); wrk runs of"
        f" {meta['duration_s']}s with **one wrk thread** (-t{meta['wrk_threads']}), so one core"
        " drives load and the proxy shares the other with the nginx upstream; bulk: curl,"
        f" {_size(meta['bulk_bytes'])} body per transfer",
        *h2_method,
        f"- other work on the machine during the run: {load['other_work_cores']:.2f} of"
        f" {m['cores']} cores on average (CPU stolen by the host: {load['steal_cores']:.2f};"
        f" load average at start {load['load_average_at_start']:.1f})",
        "- ratio = sidelink ÷ other within each round, the median over rounds (each pair saw"
        " the same minutes of the host); for ↑ rows below 1.00x means sidelink is slower, for"
        " ↓ rows above 1.00x means sidelink costs more. Errors are wrk's socket errors +"
        " non-2xx/3xx answers (bulk: failed transfers; memory: failed idle connections of"
        f" {IDLE_CONNECTIONS:,}), summed over rounds.",
        "",
        report.markdown(rows, columns),
    ]
    spreads = [
        (label, spread)
        for label, key in (("1", "http_keepalive"), ("8", "h2_m1"), ("9", "h2_m100"))
        if (spread := report.spread_line(rows, key, "rps"))
    ]
    lines += [
        "Spread over rounds (min-max) of throughput, req/s: "
        + "; ".join(f"scenario {label}: {spread}" for label, spread in spreads)
        + ". Differences smaller than that spread are noise.",
        "",
    ]
    for name, why in failed.items():
        lines += [f"**{name} failed to start:**", "", "```", *why.splitlines()[-20:], "```", ""]
    details = report.error_details(results)
    if details:
        lines += ["## Errors seen", "", *(f"- {line}" for line in details), ""]
    if results.notes:
        lines += ["## Notes", "", *(f"- {note.splitlines()[0]}" for note in results.notes), ""]
    if sidelink:
        log = sidelink["log"]
        lines += ["## sidelink's own view", ""]
        lines.append(f"- log lines at WARNING or worse: {log.get('problem_lines')}")
        lines += [f"  - `{example}`" for example in log.get("examples", [])]
        for name, value in sidelink["metrics"].items():
            lines.append(f"- `{name}` {value:,.0f}")
        lines.append("")
    lines.append(
        f"Idle connections each made one `{IDLE_REQUEST.split(b' ')[0].decode()} /` first."
        " nginx RSS is master + worker summed."
    )
    return "\n".join(lines) + "\n"


def _pick(given: int | None, default: int) -> int:
    return default if given is None else given


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"
