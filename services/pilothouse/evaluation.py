"""``pilothouse eval rca``: run labelled fault cases through the same evidence + engine code and score the ranking.

    pilothouse eval rca --dataset DIR --format nezha|rcaeval --out FILE [--baseline reference|pre-window]
                        [--with-llm [--llm-cases N] [--llm-base-url URL] [--llm-model NAME]]

``--with-llm`` runs the reasoning service's own model step on each case (the same prompt, client, budgets and
checks: claim verification, counterfactual checks, code-computed confidence) and reports, under ``with_llm``, the
AC@k of the checked hypothesis list, how often the model's first hypothesis was right, model latency, tokens, and
how many model claims were verified or dropped (and why).

Reports AC@1, AC@3, AC@5, Avg@5 (overall and per fault type), abstentions and time per case (evidence extraction
plus ranking; loading files is reported apart). Dataset layouts:

- ``nezha``: ``rca_data/<day>/<day>-fault_list.json``, ``rca_data/<day>/metric/<pod>_metric.csv[.gz]``,
  ``front_service.csv`` (the entry service's own success rate and latency), ``dependency.csv``,
  ``source_50.csv``/``destination_50.csv`` (per-edge latency at client/server side), optional
  ``trace/HH_MM_trace.csv[.gz]``; ``construct_data/<day>/metric`` is the normal reference, with every listed
  fault's window left out of it (in the published data it is the fault recording itself).
- ``rcaeval``: one directory per case named ``<service>_<fault>`` or ``<service>-<fault>`` (optionally with
  repetition subdirectories) holding ``data.csv`` + ``inject_time.txt`` or ``normal.csv`` + ``anomalous.csv``;
  columns ``time`` plus ``<service>_<metric>``.

No dataset-specific rules: service names come from the files, the dependency graph from the dataset's call-graph
files or traces (none for rcaeval metric cases), baselines from robust statistics.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pilothouse.bus.errors import PermanentError
from pilothouse.reasoning.engine import DEFAULT_CONFIG, EngineConfig, Ranking, rank_root_causes
from pilothouse.sensing.evidence import (
    EvidenceItem,
    Series,
    Span,
    TraceProfile,
    Window,
    edges_from_correlation,
    metric_anomalies,
    network_time_series,
    trace_hotspots,
    trace_profile,
)

LLM_ENV = "PILOTHOUSE_LLM_BASE_URL"


class DatasetError(PermanentError):
    """The dataset directory does not have the layout its --format promises; the message names the file."""


@dataclass(slots=True)
class Case:
    case_id: str
    root_cause: str
    fault_type: str
    window: Window
    series: list[Series]
    reference: dict[tuple[str, str], Series] | None
    edges: set[tuple[str, str]]
    services: set[str]
    trace_window: list[TraceProfile] = field(default_factory=list)
    trace_reference: list[TraceProfile] = field(default_factory=list)
    pre_window_ms: int = 3_600_000
    # reference points this close to the window are left out (when the reference recording spans the incident)
    guard_ms: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# file reading
# ----------------------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error, StopIteration, EOFError) as e:
        raise DatasetError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    return header, rows


def _to_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


_GO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(\.\d+)?")


def _parse_time_s(text: str) -> float | None:
    """Unix seconds from a number or an ISO-like timestamp (UTC when no zone is given)."""
    t = text.strip()
    try:
        x = float(t)
        return x / 1000.0 if x > 1e11 else x  # milliseconds
    except ValueError:
        pass
    m = _GO_TIME.match(t)
    if not m:
        return None
    base = dt.datetime.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    return base.timestamp() + (float(m.group(2)) if m.group(2) else 0.0)


def _service_of_pod(pod: str) -> str:
    """Kubernetes Deployment pod name -> workload name (drop the ReplicaSet hash and pod suffix)."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


# ----------------------------------------------------------------------------------------------------------------
# nezha layout
# ----------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _NezhaDay:
    series: list[Series]
    reference: dict[tuple[str, str], Series]
    edges: set[tuple[str, str]]
    services: set[str]
    traces: list[TraceProfile]
    notes: list[str]


def _nezha_table(path: Path, link_root: str, notes: list[str], name_col: str,
                 service_of: Callable[[str], str]) -> list[Series]:
    """One scrape table ``Time,TimeStamp,<name_col>,<metric>...``: one series per metric column."""
    header, rows = _read_csv(path)
    if len(header) < 4 or header[:3] != ["Time", "TimeStamp", name_col]:
        raise DatasetError(f"{path}: expected columns Time,TimeStamp,{name_col},..., got {header[:4]}")
    ts = np.empty(len(rows), dtype=np.int64)
    fixed = 0
    for i, r in enumerate(rows):
        declared = _to_float(r[1])
        parsed = _parse_time_s(r[0])
        if parsed is not None and not (abs(declared - parsed) <= 3600):
            fixed += 1  # the numeric column disagrees with the textual time: trust the text
            ts[i] = int(parsed * 1000)
        else:
            ts[i] = int(declared * 1000)
    if fixed:
        notes.append(f"{path.name}: {fixed} rows had TimeStamp far from Time; used the Time column")
    values = np.array([[_to_float(v) for v in r[3:len(header)]] for r in rows], dtype=np.float64)
    values = values.reshape(len(rows), len(header) - 3)
    service = service_of(rows[0][2]) if rows else path.name.split("_")[0]
    link = f"{link_root}/{path.name}"
    return [Series(service, name, ts, values[:, j], source_link=f"{link}#col={name}")
            for j, name in enumerate(header[3:])]


def _nezha_pod_metrics(metric_dir: Path, link_root: str, notes: list[str]) -> list[Series]:
    out: list[Series] = []
    for path in sorted(metric_dir.iterdir()):
        if path.name.endswith(("_metric.csv", "_metric.csv.gz")):
            out += _nezha_table(path, link_root, notes, "PodName", _service_of_pod)
    return out


def _nezha_front_metrics(metric_dir: Path, services: set[str], link_root: str, notes: list[str]) -> list[Series]:
    """The entry service's own request metrics (``front_service.csv``: success rate and latency as the users see
    them). Its ``ServiceName`` is matched to a known service without regard to case; the pod tables' success-rate
    column can be unusable (constant) while this one is measured, so it is the only error signal of the entry."""
    path = _find(metric_dir, "front_service.csv")
    if path is None:
        return []
    by_lower = {s.lower(): s for s in services}
    return _nezha_table(path, link_root, notes, "ServiceName", lambda name: by_lower.get(name.lower(), name))


def _nezha_edge_series(metric_dir: Path, services: set[str], link_root: str) -> list[Series]:
    src, dst = _find(metric_dir, "source_50.csv"), _find(metric_dir, "destination_50.csv")
    if src is None or dst is None:
        return []
    sh, srows = _read_csv(src)
    dh, drows = _read_csv(dst)

    def table(header: list[str], rows: list[list[str]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ts = np.array([int(_to_float(r[1]) * 1000) for r in rows], dtype=np.int64)
        cols = {name: np.array([_to_float(r[j]) for r in rows]) for j, name in enumerate(header) if j >= 2}
        return ts, cols

    sts, scols = table(sh, srows)
    dts, dcols = table(dh, drows)
    out = []
    for name, values in scols.items():
        if name not in dcols:
            continue
        split = _split_edge(name, services)
        if split is None:
            continue
        caller, callee = split
        client = Series(callee, name, sts, values, source_link=f"{link_root}/{src.name}#col={name}")
        server = Series(callee, name, dts, dcols[name], source_link=f"{link_root}/{dst.name}#col={name}")
        out.append(network_time_series(client, server, caller=caller, callee=callee))
    return out


def _split_edge(name: str, services: set[str]) -> tuple[str, str] | None:
    for i, ch in enumerate(name):
        if ch == "_" and name[:i] in services and name[i + 1:] in services:
            return name[:i], name[i + 1:]
    return None


def _nezha_traces(trace_dir: Path, day: str, link_root: str) -> list[TraceProfile]:
    if not trace_dir.is_dir():
        return []
    profiles = []
    for path in sorted(trace_dir.iterdir()):
        m = re.match(r"^(\d{2})_(\d{2})_trace\.csv(\.gz)?$", path.name)
        if not m:
            continue
        start = dt.datetime.strptime(f"{day} {m.group(1)}:{m.group(2)}", "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC)
        header, rows = _read_csv(path)
        try:
            ix = {k: header.index(k) for k in ("TraceID", "SpanID", "ParentID", "PodName", "OperationName",
                                               "StartTimeUnixNano", "Duration")}
        except ValueError as e:
            raise DatasetError(f"{path}: missing trace column ({e})") from e
        pods: dict[str, str] = {}
        spans = []
        for r in rows:
            pod = r[ix["PodName"]]
            svc = pods.get(pod) or pods.setdefault(pod, _service_of_pod(pod))
            spans.append(Span(r[ix["TraceID"]], r[ix["SpanID"]], r[ix["ParentID"]], svc, r[ix["OperationName"]],
                              int(_to_float(r[ix["StartTimeUnixNano"]]) // 1_000_000),
                              _to_float(r[ix["Duration"]])))
        profiles.append(trace_profile(spans, start_ms=int(start.timestamp() * 1000),
                                      source_link=f"{link_root}/{path.name}"))
    return profiles


def _load_nezha_day(root: Path, day: str, *, with_traces: bool) -> _NezhaDay:
    notes: list[str] = []
    mdir = root / "rca_data" / day / "metric"
    if not mdir.is_dir():
        raise DatasetError(f"{mdir}: missing metric directory")
    link = f"dataset://nezha/rca_data/{day}/metric"
    series = _nezha_pod_metrics(mdir, link, notes)
    services = {s.service for s in series}
    edges: set[tuple[str, str]] = set()
    dep = _find(mdir, "dependency.csv")
    if dep is not None:
        _, rows = _read_csv(dep)
        for r in rows:
            if len(r) >= 2 and r[0] != r[1]:
                edges.add((r[0], r[1]))
    series += _nezha_front_metrics(mdir, services, link, notes) + _nezha_edge_series(mdir, services, link)
    cdir = root / "construct_data" / day / "metric"
    reference: dict[tuple[str, str], Series] = {}
    if cdir.is_dir():
        clink = f"dataset://nezha/construct_data/{day}/metric"
        ref_series = (_nezha_pod_metrics(cdir, clink, notes) + _nezha_front_metrics(cdir, services, clink, notes)
                      + _nezha_edge_series(cdir, services, clink))
        reference = {(s.service, s.signal): s for s in ref_series}
    else:
        notes.append(f"{cdir} missing: baselines come from the pre-incident window")
    traces = _nezha_traces(root / "rca_data" / day / "trace", day, f"dataset://nezha/rca_data/{day}/trace") \
        if with_traces else []
    if traces:
        for p in traces:
            edges.update(p.service_edges.keys())
    return _NezhaDay(series, reference, edges, services, traces, notes)


def iter_nezha_cases(root: Path, *, baseline: str = "reference", with_traces: bool = True,
                     fault_len_s: int = 180) -> Iterator[Case]:
    rca = root / "rca_data"
    if not rca.is_dir():
        raise DatasetError(f"{root}: no rca_data/ directory (is this the nezha layout?)")
    days = sorted(p.name for p in rca.iterdir() if p.is_dir())
    if not days:
        raise DatasetError(f"{rca}: no day directories")
    for day in days:
        flist = rca / day / f"{day}-fault_list.json"
        if not flist.is_file():
            raise DatasetError(f"{flist}: missing fault list")
        try:
            faults = json.loads(flist.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{flist}: not valid JSON ({e})") from e
        listed: list[tuple[str, str, str, Window]] = []
        for hour in sorted(faults):
            for i, f in enumerate(faults[hour]):
                try:
                    t0 = int(f["inject_timestamp"]) * 1000
                    rc = _service_of_pod(f["inject_pod"])
                    ftype = str(f["inject_type"])
                except (KeyError, TypeError, ValueError) as e:
                    raise DatasetError(f"{flist}: fault {hour}[{i}] lacks inject_timestamp/pod/type ({e})") from e
                # The window covers the fault and one more scrape: a per-minute sample describes the minute
                # before it.
                listed.append((f"{day}#{hour}#{i}", rc, ftype, Window(t0, t0 + (fault_len_s + 60) * 1000)))
        data = _load_nezha_day(root, day, with_traces=with_traces)
        guard = 10 * 60_000
        use_ref = baseline == "reference" and bool(data.reference)
        # other faults' windows leave the reference with one scrape of margin: the minutes between faults stay
        # (a recording's level drifts over hours, so the nearby normal minutes are the best baseline)
        reference = _without_listed_faults(data.reference, [w for *_, w in listed], 60_000, data.notes) \
            if use_ref else None
        for case_id, rc, ftype, window in listed:
            tw = [p for p in data.traces if window.start_ms - 60_000 < p.start_ms <= window.end_ms - 60_000]
            # Trace minutes survive only around faults in this dataset, so the trace reference is the other
            # faults' minutes; the trace statistics are medians over buckets and tolerate that (metrics do not).
            tr = [p for p in data.traces
                  if p.start_ms < window.start_ms - guard or p.start_ms > window.end_ms + guard]
            yield Case(
                case_id=case_id, root_cause=rc, fault_type=ftype, window=window,
                series=data.series, reference=reference, edges=data.edges,
                services=data.services, trace_window=tw, trace_reference=tr, guard_ms=guard, notes=data.notes,
            )


def _without_listed_faults(reference: dict[tuple[str, str], Series], windows: Sequence[Window], guard_ms: int,
                           notes: list[str]) -> dict[tuple[str, str], Series]:
    """The normal reference with every listed fault's window (plus ``guard_ms`` either side) blanked out.

    A "normal" recording that spans injected faults would otherwise put those faults into the baseline's tail and
    hide the same kind of fault when it is the case under test. Blanked points become NaN (ignored by the
    statistics); timestamp arrays are kept as they are, so the series of one scrape table stay scored together.
    """
    masks: dict[int, np.ndarray] = {}
    out: dict[tuple[str, str], Series] = {}
    blanked = 0
    for key, s in reference.items():
        ts = s.timestamps_ms
        m = masks.get(id(ts))
        if m is None:
            m = np.zeros(ts.shape, dtype=bool)
            for w in windows:
                m |= (ts >= w.start_ms - guard_ms) & (ts <= w.end_ms + guard_ms)
            masks[id(ts)] = m
            blanked += int(m.sum())
        out[key] = s if not m.any() else Series(s.service, s.signal, ts, np.where(m, np.nan, s.values),
                                                s.source_link, s.attributes)
    if blanked:
        notes.append(f"reference: the listed faults' windows (+{guard_ms // 1000} s) were left out of the baselines "
                     "(the normal recording spans the faults)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# rcaeval layout
# ----------------------------------------------------------------------------------------------------------------


def _table_series(path: Path, link: str) -> list[Series]:
    header, rows = _read_csv(path)
    if not header or header[0].strip().lower() not in ("time", "timestamp"):
        raise DatasetError(f"{path}: first column must be 'time', got {header[:1]}")
    ts = []
    for i, r in enumerate(rows):
        t = _parse_time_s(r[0])
        if t is None:
            raise DatasetError(f"{path}: row {i + 2} has an unreadable time {r[0]!r}")
        ts.append(int(t * 1000))
    tsa = np.array(ts, dtype=np.int64)
    out = []
    for j, name in enumerate(header[1:], start=1):
        if "_" not in name:
            continue  # not a <service>_<metric> column
        service, metric = name.split("_", 1)
        if not service or not metric:
            continue
        vals = np.array([_to_float(r[j]) if j < len(r) else float("nan") for r in rows])
        out.append(Series(service, metric, tsa, vals, source_link=f"{link}#col={name}"))
    return out


_CASE_NAME = re.compile(r"^(?P<svc>.+?)[_-](?P<fault>[A-Za-z]+)$")


def iter_rcaeval_cases(root: Path, *, window_s: int = 600) -> Iterator[Case]:
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    found = False
    for dirpath, _dirs, files in sorted(os.walk(root)):
        d = Path(dirpath)
        has_single = "data.csv" in files and "inject_time.txt" in files
        has_pair = "normal.csv" in files and "anomalous.csv" in files
        if not (has_single or has_pair):
            continue
        found = True
        named = d if _CASE_NAME.match(d.name) and not d.name.isdigit() else d.parent
        m = _CASE_NAME.match(named.name)
        if not m:
            raise DatasetError(f"{d}: cannot read <service>_<fault> from directory name {named.name!r}")
        rel = d.relative_to(root).as_posix()
        link = f"dataset://rcaeval/{rel}"
        if has_single:
            series = _table_series(d / "data.csv", f"{link}/data.csv")
            try:
                t0 = _parse_time_s((d / "inject_time.txt").read_text(encoding="utf-8").strip())
            except OSError as e:
                raise DatasetError(f"{d / 'inject_time.txt'}: {e}") from e
            if t0 is None:
                raise DatasetError(f"{d / 'inject_time.txt'}: not a unix time")
            start = int(t0 * 1000)
            end = start + window_s * 1000
            reference = None
        else:
            normal = _table_series(d / "normal.csv", f"{link}/normal.csv")
            series = _table_series(d / "anomalous.csv", f"{link}/anomalous.csv")
            if not series or series[0].timestamps_ms.size == 0:
                raise DatasetError(f"{d / 'anomalous.csv'}: no rows")
            start = int(series[0].timestamps_ms.min())
            end = int(series[0].timestamps_ms.max())
            reference = {(s.service, s.signal): s for s in normal}
        services = {s.service for s in series}
        window = Window(start, end)
        # RCAEval metric cases ship no call graph: guess one from latency co-movement (see edges_from_correlation)
        edges = edges_from_correlation(series, window)
        yield Case(case_id=rel, root_cause=m.group("svc"), fault_type=m.group("fault").lower(),
                   window=window, series=series, reference=reference, edges=edges, services=services,
                   notes=["rcaeval: no call graph in the data; edges guessed from latency correlation"])
    if not found:
        raise DatasetError(f"{root}: no case directory with data.csv+inject_time.txt or normal.csv+anomalous.csv")


# ----------------------------------------------------------------------------------------------------------------
# running and scoring
# ----------------------------------------------------------------------------------------------------------------


def case_evidence(case: Case) -> list[EvidenceItem]:
    """The same evidence extraction the sensing service runs, applied to one case."""
    ev = metric_anomalies(case.series, case.window, reference=case.reference, pre_window_ms=case.pre_window_ms,
                          guard_ms=case.guard_ms, min_points=2)
    if case.trace_window:
        ev += trace_hotspots(case.trace_window, case.trace_reference, case.window)
    return ev


@dataclass(frozen=True, slots=True)
class CaseTiming:
    wall_ms: float          # evidence extraction + ranking, wall clock
    cpu_ms: float           # the same, CPU time of this process (steadier on a shared machine)
    engine_wall_ms: float   # ranking alone


def run_case(case: Case, config: EngineConfig = DEFAULT_CONFIG) -> tuple[Ranking, list[EvidenceItem], CaseTiming]:
    w0, c0 = time.perf_counter(), time.process_time()
    ev = case_evidence(case)
    w1 = time.perf_counter()
    ranking = rank_root_causes(ev, case.edges, config=config, services=case.services)
    w2, c2 = time.perf_counter(), time.process_time()
    return ranking, ev, CaseTiming((w2 - w0) * 1000.0, (c2 - c0) * 1000.0, (w2 - w1) * 1000.0)


def _acc(ranks: Sequence[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks) if ranks else 0.0


def _summary(ranks: Sequence[int | None]) -> dict[str, float | int]:
    ac = {k: _acc(ranks, k) for k in range(1, 6)}
    return {"cases": len(ranks), "ac_at_1": ac[1], "ac_at_3": ac[3], "ac_at_5": ac[5],
            "avg_at_5": sum(ac.values()) / 5}


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else 0.0


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(xs)), 3), "p50": round(_pct(xs, 50), 3), "p95": round(_pct(xs, 95), 3),
            "p99": round(_pct(xs, 99), 3), "max": round(max(xs), 3)}


@dataclass(slots=True)
class _LlmTally:
    """What the model-in-the-loop run saw, for the report."""

    ranks: list[int | None] = field(default_factory=list)
    model_top1: list[bool] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    claims_kept: int = 0
    claims_dropped: int = 0
    hypotheses_supported: int = 0
    proposals_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)


def _with_llm(case: Case, ranking: Ranking, ev: list[EvidenceItem], step, tally: _LlmTally) -> dict:
    """Run the reasoning service's model step and checks on one case; rank = position in the checked list."""
    from pilothouse.bus.actions import load_actions
    from pilothouse.reasoning.domain import assess

    edges = sorted(case.edges)
    services = sorted(case.services)
    t0 = time.perf_counter()
    # The evidence here is built from the dataset's numbers and metric names (no free text from people or
    # logs), which is why it counts as redacted for the prompt.
    outcome = step.run(case.case_id, title=f"fault case {case.case_id}", evidence=ev, edges=edges,
                       services=services, ranking=ranking, redaction_scanned=True)
    t1 = time.perf_counter()
    a = assess(case.case_id, ev, edges, services, load_actions(), model=outcome.hypotheses,
               model_name=outcome.model, ranking=ranking)
    t2 = time.perf_counter()
    model_ms = outcome.result.latency_ms if outcome.result else (t1 - t0) * 1000.0 - outcome.prompt_s * 1000.0
    tally.latency_ms.append(model_ms)
    tally.overhead_ms.append((t2 - t1) * 1000.0 + outcome.prompt_s * 1000.0)
    tally.status[outcome.status] = tally.status.get(outcome.status, 0) + 1
    tally.tokens += outcome.result.tokens if outcome.result else 0
    order = list(dict.fromkeys([h.root_cause_service for h in a.hypotheses] + ranking.top(len(ranking.candidates))))
    rank = order.index(case.root_cause) + 1 if case.root_cause in order else None
    tally.ranks.append(rank)
    tally.model_top1.append(bool(outcome.hypotheses) and outcome.hypotheses[0].root_cause_service == case.root_cause)
    llm_h = [h for h in a.hypotheses if h.origin == "llm"]
    tally.claims_kept += sum(len(h.claims) for h in llm_h)
    tally.claims_dropped += sum(len(h.dropped_claims) for h in llm_h)
    tally.hypotheses_supported += sum(1 for h in llm_h if h.status == "supported")
    tally.proposals_dropped += len(a.dropped_proposals)
    for h in llm_h:
        for d in h.dropped_claims:
            key = re.sub(r"ev-[0-9a-f]+|[0-9.+-]+", "#", d.reason)[:80]
            tally.drop_reasons[key] = tally.drop_reasons.get(key, 0) + 1
    return {"llm_status": outcome.status, "llm_detail": outcome.detail[:200], "rank_with_llm": rank,
            "model_hypotheses": [h.root_cause_service for h in outcome.hypotheses],
            "model_ms": round(model_ms, 1)}


def _checked_rank(case: Case, ranking: Ranking, ev: list[EvidenceItem]) -> tuple[int | None, str]:
    from pilothouse.bus.actions import load_actions
    from pilothouse.reasoning.domain import assess

    a = assess(case.case_id, ev, sorted(case.edges), sorted(case.services), load_actions(), ranking=ranking)
    order = list(dict.fromkeys([h.root_cause_service for h in a.hypotheses] + ranking.top(len(ranking.candidates))))
    return (order.index(case.root_cause) + 1 if case.root_cause in order else None), a.outcome


def _llm_report(t: _LlmTally) -> dict:
    n = len(t.ranks)
    return {
        "cases": n, **{k: v for k, v in _summary(t.ranks).items() if k != "cases"},
        "model_first_hypothesis_correct": sum(t.model_top1) / n if n else 0.0,
        "llm_status": t.status, "tokens_total": t.tokens,
        "model_latency_ms": _stats(t.latency_ms) if t.latency_ms else {},
        "reasoning_overhead_ms_excluding_model": _stats(t.overhead_ms) if t.overhead_ms else {},
        "model_claims_verified": t.claims_kept, "model_claims_dropped": t.claims_dropped,
        "model_claim_drop_reasons": dict(sorted(t.drop_reasons.items(), key=lambda kv: -kv[1])[:10]),
        "model_hypotheses_supported": t.hypotheses_supported, "proposals_dropped": t.proposals_dropped,
    }


def evaluate(cases: Iterator[Case], config: EngineConfig = DEFAULT_CONFIG, *, llm_step=None,
             llm_cases: int | None = None) -> dict:
    """Score the engine on ``cases``; with ``llm_step`` (a reasoning ModelStep) also the model-in-the-loop
    ranking on the first ``llm_cases`` cases (all when None)."""
    ranks: list[int | None] = []
    tally = _LlmTally()
    checked: list[int | None] = []
    outcomes: dict[str, int] = {}
    by_type: dict[str, list[int | None]] = {}
    times: list[CaseTiming] = []
    abstained = 0
    details = []
    notes: set[str] = set()
    t_all = time.perf_counter()
    for case in cases:
        ranking, ev, timing = run_case(case, config)
        by_id = {e.evidence_id: e for e in ev}
        order = ranking.top(len(ranking.candidates))
        rank = order.index(case.root_cause) + 1 if case.root_cause in order else None
        ranks.append(rank)
        by_type.setdefault(case.fault_type, []).append(rank)
        times.append(timing)
        abstained += int(ranking.abstain)
        notes.update(case.notes)
        details.append({
            "case": case.case_id, "fault_type": case.fault_type, "root_cause": case.root_cause, "rank": rank,
            "abstain": ranking.abstain, "top5": [[c.service, c.score] for c in ranking.candidates[:5]],
            "evidence_items": len(ev),
            "top_evidence": [
                {"evidence_id": c.evidence_id, "feature": c.feature, "points": c.points,
                 "summary": by_id[c.evidence_id].summary if c.evidence_id in by_id else ""}
                for c in (ranking.candidates[0].contributions[:3] if ranking.candidates else ())
            ],
            "ms": round(timing.wall_ms, 2),
        })
        rank_checked, outcome = _checked_rank(case, ranking, ev)
        checked.append(rank_checked)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        details[-1]["rank_checked"] = rank_checked
        if llm_step is not None and (llm_cases is None or len(tally.ranks) < llm_cases):
            details[-1].update(_with_llm(case, ranking, ev, llm_step, tally))
    if not ranks:
        raise DatasetError("the dataset yielded no cases")
    out = _summary(ranks)
    strict = [r if not d["abstain"] else None for r, d in zip(ranks, details, strict=True)]
    out.update({
        # abstaining means answering "inconclusive": counted as a miss here, ignored by ac_at_k above
        "ac_at_1_abstain_as_miss": _acc(strict, 1),
        "ac_at_3_abstain_as_miss": _acc(strict, 3),
        "answered_correct_at_1": sum(1 for r, d in zip(ranks, details, strict=True) if r == 1 and not d["abstain"]),
        "answered": len(ranks) - abstained,
        "per_fault_type": {t: _summary(v) for t, v in sorted(by_type.items())},
        "abstained": abstained,
        "time_per_case_ms": _stats([t.wall_ms for t in times]),
        "cpu_time_per_case_ms": _stats([t.cpu_ms for t in times]),
        "engine_time_per_case_ms": _stats([t.engine_wall_ms for t in times]),
        "total_wall_s_including_load": round(time.perf_counter() - t_all, 2),
        "data_notes": sorted(notes),
        "details": details,
    })
    out["checked_hypotheses"] = {
        "what": "order of the hypotheses the reasoning service publishes (engine + counterfactual checks + "
                "code-computed confidence, no model), then the rest of the engine ranking",
        **{k: v for k, v in _summary(checked).items() if k != "cases"}, "outcomes": outcomes}
    if llm_step is not None:
        out["with_llm"] = _llm_report(tally)
    return out


def _model_step(args: argparse.Namespace):
    """The reasoning service's model step, configured from PILOTHOUSE_LLM_* / PILOTHOUSE_REASONING_* and flags.

    Per-incident and per-minute budgets are lifted (an evaluation is a deliberate, bounded batch)."""
    from pilothouse.bus.actions import load_actions
    from pilothouse.reasoning.adapters.llm import CircuitBreaker, LlmClient
    from pilothouse.reasoning.config import LlmSettings, Settings
    from pilothouse.reasoning.handlers import ModelStep

    over = {k: v for k, v in (("base_url", args.llm_base_url), ("model", args.llm_model),
                              ("timeout_s", args.llm_timeout_s)) if v}
    llm = LlmSettings(**over)
    settings = Settings(max_llm_calls_per_minute=10**6, max_llm_tokens_per_hour=10**12,
                        max_llm_tokens_per_incident=10**9)
    client = LlmClient(llm.base_url, llm.model, api_key=llm.api_key.get_secret_value() if llm.api_key else None,
                       timeout_s=llm.timeout_s, max_retries=llm.max_retries, backoff_s=llm.backoff_s,
                       breaker=CircuitBreaker(llm.circuit_failures, llm.circuit_reset_s))
    return ModelStep(settings, llm, client, load_actions())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pilothouse eval rca``. Returns 0 on success, 2 on bad usage or unusable dataset."""
    p = argparse.ArgumentParser(prog="pilothouse eval rca",
                                description="Score root-cause ranking on a labelled dataset (engine; optionally "
                                            "with the LLM in the loop).")
    p.add_argument("--dataset", required=True, type=Path, help="dataset directory")
    p.add_argument("--format", required=True, choices=("nezha", "rcaeval"), dest="fmt")
    p.add_argument("--out", required=True, type=Path, help="JSON report to write")
    p.add_argument("--with-llm", action="store_true",
                   help="also run the reasoning service's model step + checks (PILOTHOUSE_LLM_* or --llm-*)")
    p.add_argument("--llm-base-url", help="OpenAI-compatible base URL (default: PILOTHOUSE_LLM_BASE_URL)")
    p.add_argument("--llm-model", help="model name (default: PILOTHOUSE_LLM_MODEL)")
    p.add_argument("--llm-cases", type=int, default=None,
                   help="ask the model about the first N cases only (a CPU model takes ~30 s per case)")
    p.add_argument("--llm-timeout-s", type=float, default=None, help="per-call timeout (default from settings)")
    p.add_argument("--baseline", choices=("reference", "pre-window"), default="reference",
                   help="nezha: normal-period reference (construct_data) or the hour before each fault")
    p.add_argument("--no-traces", action="store_true", help="nezha: ignore trace files (metrics only)")
    args = p.parse_args(argv)
    step = None
    if args.with_llm:
        if not (args.llm_base_url or os.environ.get(LLM_ENV)):
            print(f"--with-llm: no LLM configured ({LLM_ENV} is not set); run without it or start the local "
                  "stack's LLM server", file=sys.stderr)
            return 2
        step = _model_step(args)
    try:
        if args.fmt == "nezha":
            cases = iter_nezha_cases(args.dataset, baseline=args.baseline, with_traces=not args.no_traces)
        else:
            cases = iter_rcaeval_cases(args.dataset)
        report = evaluate(cases, llm_step=step, llm_cases=args.llm_cases)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"dataset": str(args.dataset), "format": args.fmt, "baseline": args.baseline,
              "traces": not args.no_traces, **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    ch = report["checked_hypotheses"]
    print(f"published (checked) hypotheses: AC@1={ch['ac_at_1']:.3f} AC@3={ch['ac_at_3']:.3f} "
          f"outcomes={ch['outcomes']}")
    if "with_llm" in report:
        w = report["with_llm"]
        print(f"with LLM ({w['cases']} cases): AC@1={w['ac_at_1']:.3f} AC@3={w['ac_at_3']:.3f} "
              f"model-first-correct={w['model_first_hypothesis_correct']:.3f} status={w['llm_status']} "
              f"model p50={w['model_latency_ms'].get('p50', 0):.0f} ms; claims verified/dropped="
              f"{w['model_claims_verified']}/{w['model_claims_dropped']}")
    pft = " ".join(f"{k}={v['ac_at_1']:.2f}" for k, v in report["per_fault_type"].items())
    print(f"cases={report['cases']} AC@1={report['ac_at_1']:.3f} AC@3={report['ac_at_3']:.3f} "
          f"AC@5={report['ac_at_5']:.3f} Avg@5={report['avg_at_5']:.3f} abstained={report['abstained']} "
          f"p99={report['time_per_case_ms']['p99']:.1f} ms/case (engine alone "
          f"{report['engine_time_per_case_ms']['p99']:.2f}) | AC@1 by fault: {pft} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
