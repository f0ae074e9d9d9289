"""Run the ProVerif model of the peer protocol and check every query's result.

Theory of operation: the model is a set of library files (crypto/, one per
primitive, and protocol/, one per module of gateway/protocol/) concatenated
in :data:`MODEL_FILES` order, followed by one entry file of queries/ (its
queries and the ``process main(...)`` line that picks what the attacker is
given). Each query in an entry file is preceded by an annotation::

    (* @query NAME expect=true|attack|reachable
       claim: the sentence of docs/protocol.md it proves *)

``expect=true``: ProVerif must prove it; ``attack``: ProVerif must find the
attack the docs describe; ``reachable``: a sanity query, the event must be
reachable in an honest run (otherwise a model in which nothing happens would
prove every secrecy query). "cannot be proved" or a timeout is always a
failure. ProVerif's output is read as it streams, so each query gets its own
time and its own timeout (counted from the previous query's result; the
first one includes the shared saturation).

Standard library only: ``python3 tests/model/run_model.py --proverif PATH``.
Exit status 0 iff every query resolved as expected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_FILES = (
    "crypto/hash.pvl", "crypto/kem.pvl", "crypto/dh.pvl", "crypto/sig.pvl", "crypto/qkd.pvl",
    "crypto/combiner.pvl",
    "protocol/messages.pvl", "protocol/exchange.pvl", "protocol/config.pvl",
    "protocol/events.pvl", "protocol/initiator.pvl", "protocol/responder.pvl",
    "protocol/session.pvl",
)
EXPECT_RESULT = {"true": "true", "attack": "false", "reachable": "false"}
QUERY_ANNOTATION = re.compile(r"\(\*\s*@query\s+(\w+)\s+expect=(\w+)\s+claim:\s*(.*?)\*\)", re.S)
RESULT_LINE = re.compile(r"^RESULT (.*) (is true|is false|cannot be proved)\.\s*$")


@dataclass
class Query:
    name: str
    expect: str
    claim: str
    entry: str
    text: str = ""                  # the annotation and the query statement
    result: str = "not run"
    seconds: float = 0.0            # wall clock, from the previous query's result
    cpu_seconds: float = 0.0        # ProVerif's CPU time over the same stretch
    ok: bool = False


@dataclass
class Entry:
    path: Path
    head: str = ""                  # the entry's text before its first query
    tail: str = ""                  # the process line
    queries: list[Query] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_entry(path: Path, only: set[str] | None = None) -> Entry:
    text = path.read_text()
    marks = list(QUERY_ANNOTATION.finditer(text))
    proc = re.search(r"^process\b", text, re.M)
    if not marks or proc is None:
        raise SystemExit(f"{path.name}: needs @query annotations and a process line")
    entry = Entry(path, head=text[:marks[0].start()], tail=text[proc.start():])
    n_statements = len(re.findall(r"^\s*query\b", text, re.M))
    if n_statements != len(marks):
        raise SystemExit(f"{path.name}: {n_statements} query statements but "
                         f"{len(marks)} @query annotations (one each)")
    for k, m in enumerate(marks):
        name, expect, claim = m.group(1), m.group(2), " ".join(m.group(3).split())
        if expect not in EXPECT_RESULT:
            raise SystemExit(f"{path.name}: query {name}: unknown expect={expect}")
        end = marks[k + 1].start() if k + 1 < len(marks) else proc.start()
        if only is None or name in only:
            entry.queries.append(Query(name, expect, claim, path.stem, text[m.start():end]))
    return entry


def assemble(entry: Entry) -> str:
    parts = [f"(* ---- {name} ---- *)\n" + (HERE / name).read_text() for name in MODEL_FILES]
    parts.append(f"(* ---- queries/{entry.path.name} ---- *)\n" + entry.head
                 + "".join(q.text for q in entry.queries) + entry.tail)
    return "\n".join(parts)


@dataclass
class Limits:
    per_query_cpu: float
    total_cpu: float
    wall_deadline: float
    finished_cpu: float = 0.0       # CPU of the entries already done
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spent(self) -> float:
        with self.lock:
            return self.finished_cpu

    def add(self, cpu: float) -> None:
        with self.lock:
            self.finished_cpu += cpu


def run_entry(entry: Entry, proverif: list[str], limits: Limits, keep: Path | None,
              log: bool) -> None:
    source = assemble(entry)
    with tempfile.TemporaryDirectory() as tmp:
        pv = Path(tmp) / f"{entry.path.stem}.pv"
        pv.write_text(source)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / pv.name).write_text(source)
        t0 = last = time.monotonic()
        cpu_last = 0.0
        proc = subprocess.Popen([*proverif, str(pv)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        pending = list(entry.queries)
        output: list[str] = []
        timed_out = False
        while True:
            # Timeouts count ProVerif's CPU time, so other work on the machine
            # slows the stage without failing it; the wall clock is a backstop.
            cpu = _cpu(proc.pid)
            if cpu - cpu_last > limits.per_query_cpu or \
                    limits.spent() + cpu > limits.total_cpu or time.monotonic() > limits.wall_deadline:
                timed_out = True
                break
            if not sel.select(timeout=1.0):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            m = RESULT_LINE.match(line)
            if m and pending:
                q = pending.pop(0)
                q.result = m.group(2).removeprefix("is ")
                q.seconds = time.monotonic() - last
                last = time.monotonic()
                cpu = _cpu(proc.pid)
                q.cpu_seconds, cpu_last = cpu - cpu_last, cpu
                q.ok = q.result == EXPECT_RESULT[q.expect]
                if log:
                    print(f"  {'ok  ' if q.ok else 'FAIL'} {entry.path.stem}/{q.name}: {q.result} "
                          f"(expected {q.expect}) {q.seconds:.1f} s, CPU {q.cpu_seconds:.1f} s",
                          flush=True)
        if timed_out:
            proc.kill()
            for q in pending:
                q.result = "timeout"
                if log:
                    print(f"  FAIL {entry.path.stem}/{q.name}: no result within its CPU budget "
                          f"({limits.per_query_cpu:.0f} s per query, {limits.total_cpu:.0f} s "
                          "in all)", flush=True)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        entry.seconds = time.monotonic() - t0
        entry.cpu_seconds = usage.ru_utime + usage.ru_stime
        limits.add(entry.cpu_seconds)
        if keep is not None:
            (keep / f"{entry.path.stem}.log").write_text("".join(output))
        errors = [ln for ln in output if ln.startswith(("Error", "File "))]
        if errors or (pending and not timed_out):
            for q in pending:
                q.result = "error"
            sys.stderr.write("".join(output[-30:]))


def markdown(entries: list[Entry]) -> str:
    rows = ["| entry | query | claim | expected | result | wall s | CPU s |",
            "|---|---|---|---|---|---|---|"]
    for e in entries:
        for q in e.queries:
            rows.append(f"| {e.path.stem} | `{q.name}` | {q.claim} | {q.expect} | "
                        f"{q.result}{'' if q.ok else ' **FAIL**'} | {q.seconds:.0f} | "
                        f"{q.cpu_seconds:.1f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proverif", required=True, help="ProVerif command (e.g. ../shared/tools/proverif)")
    ap.add_argument("--per-query-cpu", type=float, default=240.0,
                    help="CPU seconds one query may take (default 240)")
    ap.add_argument("--total-cpu", type=float, default=1800.0,
                    help="CPU seconds all queries may take: 15 minutes on 2 cores (default 1800)")
    ap.add_argument("--wall-timeout", type=float, default=3600.0,
                    help="wall-clock backstop for the whole run (default 3600)")
    ap.add_argument("--keep", type=Path, help="write the assembled .pv files and ProVerif's output here")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path,
                    help="write the results as the table of docs/analysis.md here")
    ap.add_argument("-j", dest="jobs", type=int, default=2,
                    help="ProVerif runs at once (default 2: the queries are independent)")
    ap.add_argument("-k", dest="select", help="run only entries whose name contains this")
    ap.add_argument("-q", dest="queries", action="append",
                    help="run only this query (repeatable)")
    args = ap.parse_args(argv)
    only = set(args.queries) if args.queries else None
    entries = [parse_entry(p, only) for p in sorted((HERE / "queries").glob("*.pv"))
               if not args.select or args.select in p.stem]
    entries = [e for e in entries if e.queries]
    limits = Limits(args.per_query_cpu, args.total_cpu, time.monotonic() + args.wall_timeout)
    t0 = time.monotonic()
    print(f"model: {len(entries)} entries, {sum(len(e.queries) for e in entries)} queries, "
          f"{args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda e: run_entry(e, args.proverif.split(), limits, args.keep,
                                          log=True), entries))
    total = time.monotonic() - t0
    queries = [q for e in entries for q in e.queries]
    failed = [q for q in queries if not q.ok]
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(total, 1), "entries": [
            {"entry": e.path.name, "seconds": round(e.seconds, 1),
             "cpu_seconds": round(e.cpu_seconds, 1),
             "queries": [asdict(q) for q in e.queries]} for e in entries]}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(entries))
    cpu = sum(e.cpu_seconds for e in entries)
    print(f"model: {len(queries) - len(failed)}/{len(queries)} queries as expected "
          f"in {total:.0f} s (ProVerif CPU {cpu:.0f} s)" + (f"; FAILED: {', '.join(q.name for q in failed)}"
                                 if failed else ""))
    return 1 if failed or not queries else 0


if __name__ == "__main__":
    sys.exit(main())
