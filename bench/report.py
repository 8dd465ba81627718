"""Turn the rounds' JSON results into medians, a markdown table and a plot.

Ratios are the claim (the machine is shared and noisy): every figure is the
median over rounds, and every ratio is taken between figures of the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workloads import FLOOR

__all__ = ["summarize", "targets", "write_markdown", "write_plot", "OLD", "orm_held_of"]

OLD = "old_geventpool"
OURS_DEFAULT = ("ours[psycopg3]", "ours[psycopg2]")
TARGET_CONCURRENCY = 200


def orm_held_of(meta: dict[str, Any]) -> str:
    """The zero-overhead reference with the same driver."""
    return f"orm_held[{meta['driver']}]"


def _key(queries: int, concurrency: int) -> str:
    return f"q{queries}c{concurrency}"


def _wait_key(wait_ms: float, concurrency: int) -> str:
    return f"w{wait_ms:g}c{concurrency}"


# The external-wait target: this wait, this many greenlets.
TARGET_WAIT_MS = 20


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds, per reference (JSON-ready: string keys only)."""
    summary: dict[str, dict[str, Any]] = {}
    for name, rounds in results.items():
        if not rounds:
            continue
        med = statistics.median
        overhead = (
            {k: med(r["overhead"][k] for r in rounds) for k in rounds[0]["overhead"]}
            if "overhead" in rounds[0]
            else None
        )
        throughput = _summarize_load(rounds, "throughput", "queries", _key)
        waiting = _summarize_waiting(rounds, "waiting")
        external = _summarize_load(rounds, "external_wait", "wait_ms", _wait_key)
        summary[name] = {
            "meta": rounds[0]["meta"],
            "rounds": len(rounds),
            "overhead": overhead,
            "throughput": throughput,
            "waiting": waiting,
            "waiting_floor": _summarize_waiting(rounds, "waiting_floor"),
            "external_wait": external,
            "rss_rest_mb": med(r["rss_rest_mb"] for r in rounds),
            "rss_load_mb": _median_or_none(r.get("rss_load_mb") for r in rounds),
            "rss_load_concurrency": rounds[0].get("rss_load_concurrency"),
        }
    return summary


def _summarize_load(
    rounds: list[dict[str, Any]], section: str, shape: str, key_of: Callable[[Any, int], str]
) -> dict[str, dict[str, Any]]:
    """Medians per load row of ``section``; a row is named by ``shape`` and concurrency."""
    med = statistics.median
    summary: dict[str, dict[str, Any]] = {}
    for row in rounds[0].get(section) or ():
        key = key_of(row[shape], row["concurrency"])
        same = [t for r in rounds for t in r[section] if key_of(t[shape], t["concurrency"]) == key]
        summary[key] = {
            shape: row[shape],
            "concurrency": row["concurrency"],
            "rps": med(t["rps"] for t in same),
            "p50_ms": med(t["p50_ms"] for t in same),
            "p99_ms": med(t["p99_ms"] for t in same),
            "cpu_us_per_request": _median_or_none(t.get("cpu_us_per_request") for t in same),
            "peak_conns": max((t["peak_conns"] or 0) for t in same),
            "errors": sum(t["errors"] for t in same),
            "served_greenlets": min(t["served_greenlets"] for t in same),
        }
    return summary


def _summarize_waiting(rounds: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    if rounds[0].get(key) is None:
        return None
    med = statistics.median
    summary = {}
    for level in rounds[0][key]:
        same = [x for r in rounds for x in r[key] if x["waiters"] == level["waiters"]]
        summary[str(level["waiters"])] = {
            "us_per_checkout": med(x["us_per_checkout"] for x in same),
            "cpu_us_per_checkout": med(x["cpu_us_per_checkout"] for x in same),
            "errors": sum(x["errors"] for x in same),
        }
    return summary


def _median_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_starved(row: dict[str, Any], concurrency: int) -> str:
    starved = concurrency - row["served_greenlets"]
    return f", **{starved} greenlets never served**" if starved > 0 else ""


def _fmt_us(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} µs CPU"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def waiting_spread(
    waiting: dict[str, Any] | None, measure: str = "cpu_us_per_checkout"
) -> float | None:
    """max/min of the cost per checkout over the waiter counts (1.0 = flat)."""
    if not waiting:
        return None
    costs = [w[measure] for w in waiting.values()]
    return max(costs) / min(costs) if min(costs) > 0 else None


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    rows: list[dict[str, Any]] = []
    old = summary.get(OLD)
    for name in OURS_DEFAULT:
        ours = summary.get(name)
        if ours is None:
            continue
        if old is not None and ours["overhead"] and old["overhead"]:
            for clock, label in (("", "wall"), ("cpu_", "CPU")):
                ratio = _ratio(
                    ours["overhead"][clock + "overhead_us"], old["overhead"][clock + "overhead_us"]
                )
                rows.append(
                    {
                        "target": f"{name}: checkout overhead ({label}) ≤ 0.25× {OLD}",
                        "value": ratio,
                        "met": ratio is not None and 0 <= ratio <= 0.25,
                    }
                )
        # At 200 greenlets; a smaller run (the smoke test) uses its highest concurrency.
        levels = [r["concurrency"] for r in ours["throughput"].values() if r["queries"] == 1]
        level = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels, default=None)
        key = _key(1, level) if level is not None else None
        if key is not None:
            rps = ours["throughput"][key]["rps"]
            if old is not None and key in old["throughput"]:
                ratio = _ratio(rps, old["throughput"][key]["rps"])
                rows.append(
                    {
                        "target": f"{name}: 1-query req/s at {level} ≥ 1.5× {OLD}",
                        "value": ratio,
                        "met": ratio is not None and ratio >= 1.5,
                    }
                )
            held = summary.get(orm_held_of(ours["meta"]))
            if held is not None and key in held["throughput"]:
                ratio = _ratio(rps, held["throughput"][key]["rps"])
                rows.append(
                    {
                        "target": f"{name}: 1-query req/s at {level} ≥ 0.9× "
                        f"{orm_held_of(ours['meta'])}",
                        "value": ratio,
                        "met": ratio is not None and ratio >= 0.9,
                    }
                )
        for measure, label in (("cpu_us_per_checkout", "CPU"), ("us_per_checkout", "wall")):
            spread = waiting_spread(ours["waiting"], measure)
            if spread is not None:
                rows.append(
                    {
                        "target": f"{name}: checkout cost ({label}) flat over waiter counts, "
                        "max/min ≤ 1.2",
                        "value": spread,
                        "met": spread <= 1.2,
                    }
                )
    rows += _transaction_mode_targets(summary)
    return rows


def transaction_mode_of(name: str) -> str:
    """``ours[psycopg3]`` -> ``ours[psycopg3,tx]``."""
    return name[:-1] + ",tx]"


def _transaction_mode_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets: the external wait at 20 ms / 200 greenlets, CPU per request."""
    rows: list[dict[str, Any]] = []
    for session in OURS_DEFAULT:
        tx_name = transaction_mode_of(session)
        tx, ours = summary.get(tx_name), summary.get(session)
        if tx is None:
            continue
        levels = sorted({r["concurrency"] for r in tx["external_wait"].values()})
        waits = sorted({r["wait_ms"] for r in tx["external_wait"].values()})
        if levels and waits:
            level = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else levels[0]
            wait = TARGET_WAIT_MS if TARGET_WAIT_MS in waits else waits[0]
            key = _wait_key(wait, level)
            row = tx["external_wait"][key]
            held = summary.get(orm_held_of(tx["meta"]))
            if held is not None and key in held["external_wait"]:
                ratio = _ratio(row["rps"], held["external_wait"][key]["rps"])
                rows.append(
                    {
                        "target": f"{tx_name}: external wait {wait:g} ms at {level}, req/s ≥ "
                        f"0.85× {orm_held_of(tx['meta'])}",
                        "value": ratio,
                        "met": ratio is not None and ratio >= 0.85,
                    }
                )
            rows.append(
                {
                    "target": f"{tx_name}: external wait {wait:g} ms at {level}, peak server "
                    "connections ≤ MAX_CONNS (10), shown as peak/10",
                    "value": row["peak_conns"] / 10,
                    "met": row["peak_conns"] <= 10,
                }
            )
            if ours is not None and key in ours["external_wait"]:
                ratio = _ratio(row["rps"], ours["external_wait"][key]["rps"])
                rows.append(
                    {
                        "target": f"{tx_name}: external wait {wait:g} ms at {level}, req/s ≥ "
                        f"4× {session}",
                        "value": ratio,
                        "met": ratio is not None and ratio >= 4,
                    }
                )
        if ours is not None:
            for queries in sorted({r["queries"] for r in tx["throughput"].values()}):
                levels = [
                    r["concurrency"] for r in tx["throughput"].values() if r["queries"] == queries
                ]
                level = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else max(levels)
                key = _key(queries, level)
                if key not in ours["throughput"]:
                    continue
                ratio = _ratio(
                    tx["throughput"][key]["cpu_us_per_request"],
                    ours["throughput"][key]["cpu_us_per_request"],
                )
                rows.append(
                    {
                        "target": f"{tx_name}: CPU per {queries}-query request at {level} "
                        f"≤ 1.10× {session}",
                        "value": ratio,
                        "met": ratio is not None and ratio <= 1.10,
                    }
                )
    return rows


def write_markdown(
    path: Path,
    summary: dict[str, dict[str, Any]],
    machine: dict[str, Any],
    rounds: int,
    sizes: Any,
    command: str,
) -> None:
    names = list(summary)
    old = summary.get(OLD)
    lines: list[str] = [
        "# Benchmarks",
        "",
        "Our pool against every alternative, measured in one run on one throwaway PostgreSQL "
        f"(loopback TCP). Each figure is the median of {rounds} rounds; each round runs every "
        "reference in a process of its own (gevent-patched first), one after the other, so a "
        "noisy moment hits all alike. **Ratios within this run are the claim**, not the absolute "
        "times: the machine was shared with other work.",
        "",
        f"Reproduce: `{command}` (creates its virtualenvs under `.venvs/bench-*`, a PostgreSQL "
        "cluster in a temporary directory, and rewrites this file and `benchmarks.png`).",
        "",
        "## References",
        "",
        "| reference | what it is |",
        "|---|---|",
    ]
    lines += [f"| `{n}` | {summary[n]['meta']['description']} |" for n in names]

    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for row in targets(summary):
        lines.append(
            f"| {row['target']} | {_fmt_ratio(row['value'])} | "
            f"{'yes' if row['met'] else '**no**'} |"
        )

    lines += [
        "",
        "How to read these figures:",
        "",
        "- *Overhead* is what a request pays for checking a connection out and giving it back, "
        "measured as in a request: between ORM queries, with the CPU caches the query leaves "
        'behind. The same cycle run in a tight loop with no query ("checkout+return alone") '
        "costs about half as much: the difference is cache misses, for every pool alike.",
        "- *Throughput* with `MAX_CONNS=10` on 2 cores is bounded by the benchmark process's own "
        "CPU: the ORM query costs far more Python than any pool, and the CPU time per request is "
        "in the latency tables. A pool can only remove its own share of it.",
        "- `old_geventpool` (and `raw_limit`) hand connections out through a gevent queue that "
        "lets "
        "a greenlet take back the connection it has just returned ahead of older waiters: fewer "
        "greenlet switches, a low p50, and a p99 many times higher. Ours serves waiters first "
        "come, first served (DESIGN.md), so its p99 stays close to its p50.",
        "",
    ]
    overhead_names = [n for n in names if summary[n]["overhead"]]
    if overhead_names:
        lines += _overhead_table(summary, overhead_names, sizes)
    if any(summary[n]["throughput"] for n in names):
        for queries in sizes.queries:
            lines += _throughput_tables(summary, queries, sizes.concurrency)
    if any(summary[n]["external_wait"] for n in names):
        lines += _external_wait_tables(summary, sizes)

    if any(summary[n]["waiting"] for n in names):
        lines += [
            "",
            "## Scale of waiting",
            "",
            "`waiters + MAX_CONNS` greenlets loop over checkout, a yield while holding, return, on "
            "`MAX_CONNS=10` (no query), timed in the steady state: µs per checkout with about "
            "that many "
            "checkouts queued. First the CPU time of the benchmark process (the work itself, "
            "whatever "
            "else ran on the machine), then wall time. References without a cap have no queue. "
            f"`{FLOOR}` is no pool at all: a slot count and a queue of gevent hub `Waiter`s "
            "served in order, the least a first-come-first-served pool has to do; its growth is "
            "the "
            "hub's (the greenlet woken has waited longest, so its memory is the coldest). "
            "The gevent queues of `raw_limit` and `old_geventpool` are not first come, first "
            "served: "
            "a greenlet that gives a connection back takes it again ahead of the waiters.",
            "",
            "| reference | "
            + " | ".join(f"{w:,} waiters: CPU / wall µs" for w in sizes.waiters)
            + " | CPU max/min | wall max/min |",
            "|---|" + "---:|" * (len(sizes.waiters) + 2),
        ]
        rows = [
            (f"`{n}`", summary[n]["waiting"]) for n in names if summary[n]["waiting"] is not None
        ]
        rows += [
            (f"`{FLOOR}`", summary[n]["waiting_floor"])
            for n in names
            if summary[n].get("waiting_floor")
        ]
        for label, waiting in rows:
            cells = [
                f"{waiting[str(w)]['cpu_us_per_checkout']:.1f} / "
                f"{waiting[str(w)]['us_per_checkout']:.1f}"
                for w in sizes.waiters
            ]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {_fmt_ratio(waiting_spread(waiting))} | "
                f"{_fmt_ratio(waiting_spread(waiting, 'us_per_checkout'))} |"
            )
        lines += [
            "",
            "What grows, counted instruction by instruction and cache miss by cache miss rather "
            "than timed: [benchmarks-work.md](benchmarks-work.md) (`make bench-work`).",
        ]

    load_level = next(
        (summary[n]["rss_load_concurrency"] for n in names if summary[n]["rss_load_concurrency"]),
        None,
    )
    if load_level is not None:
        lines += [
            "",
            "## Memory",
            "",
            "RSS of the benchmark process: at rest (set up, one request served) and the peak under "
            f"the {load_level:,}-greenlet load (1-query and 5-query runs).",
            "",
            "| reference | at rest MB | under load MB |",
            "|---|---:|---:|",
        ]
        for n in names:
            load = summary[n]["rss_load_mb"]
            lines.append(
                f"| `{n}` | {summary[n]['rss_rest_mb']:.1f} | "
                f"{'—' if load is None else f'{load:.1f}'} |"
            )

    versions: dict[str, str] = {}
    for n in names:
        for dist, version in summary[n]["meta"]["versions"].items():
            versions.setdefault(dist, version)
    old_version = summary[OLD]["meta"]["versions"].get("django-db-geventpool") if old else None
    ours_version = next(
        (
            summary[n]["meta"]["versions"].get("django-db-geventpool")
            for n in names
            if summary[n]["meta"]["kind"] == "ours"
        ),
        None,
    )
    versions.pop("django-db-geventpool", None)
    lines += [
        "",
        "## Versions and machine",
        "",
        f"- Python {summary[names[0]]['meta']['python']}, PostgreSQL "
        f"{machine.get('postgresql', '?')}",
        "- " + ", ".join(f"{d} {v}" for d, v in sorted(versions.items())),
        f"- django-db-geventpool: ours {ours_version or '—'}, old {old_version or '—'}",
        f"- {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}; load average "
        f"{machine['loadavg_start']:.2f} at the start and {machine['loadavg_end']:.2f} at the end "
        "(other work shared the machine)",
        f"- the whole run took {machine['seconds']} s",
        "",
        f"![requests/s against concurrency]({path.with_suffix('.png').name})",
        "",
    ]
    path.write_text("\n".join(lines))


def _overhead_table(summary: dict[str, dict[str, Any]], names: list[str], sizes: Any) -> list[str]:
    old = summary.get(OLD)
    if old is not None and not old["overhead"]:
        old = None
    lines = [
        "",
        "## Checkout overhead",
        "",
        f"One greenlet, {sizes.overhead_n} iterations of checkout + "
        "`Item.objects.filter(pk=1).exists()` "
        "+ return (request end: `close_if_unusable_or_obsolete()`), minus the same query on a "
        "connection held throughout (the median of per-block differences, blocks alternating). "
        'µs per checkout. "checkout+return alone" is the same cycle with no query at all. The CPU '
        "columns are the same measures in CPU time of the benchmark process: they leave out the "
        "server's side of a round trip (so they understate what a health-check query costs) and "
        "whatever else the machine was doing.",
        "",
        "| reference | held query µs | checkout+query+return µs | overhead µs | overhead × "
        f"`{OLD}` | cycle × `orm_held` | checkout+return alone µs | overhead CPU µs | overhead "
        "CPU × "
        f"`{OLD}` | checkout+return alone CPU µs |",
        "|---|" + "---:|" * 9,
    ]
    for n in names:
        o = summary[n]["overhead"]
        held = summary.get(orm_held_of(summary[n]["meta"]))
        if held is not None and not held["overhead"]:
            held = None
        to_old = _ratio(o["overhead_us"], old["overhead"]["overhead_us"]) if old else None
        cpu_to_old = (
            _ratio(o["cpu_overhead_us"], old["overhead"]["cpu_overhead_us"]) if old else None
        )
        to_held = _ratio(o["cycle_us"], held["overhead"]["cycle_us"]) if held else None
        lines.append(
            f"| `{n}` | {o['held_us']:.0f} | {o['cycle_us']:.0f} | {o['overhead_us']:.0f} | "
            f"{_fmt_ratio(to_old)} | {_fmt_ratio(to_held)} | {o['checkout_us']:.1f} | "
            f"{o['cpu_overhead_us']:.0f} | {_fmt_ratio(cpu_to_old)} | {o['cpu_checkout_us']:.1f} |"
        )

    return lines


def _throughput_tables(
    summary: dict[str, dict[str, Any]], queries: int, concurrency: tuple[int, ...]
) -> list[str]:
    old = summary.get(OLD)
    names = [n for n in summary if _key(queries, concurrency[0]) in summary[n]["throughput"]]
    header = " | ".join(f"c={c:,}" for c in concurrency)
    lines = [
        "",
        f"## Throughput and latency: {queries}-query requests",
        "",
        f"`c` greenlets making requests of {queries} ORM quer{'y' if queries == 1 else 'ies'} "
        "(one checkout each) for a fixed time, `MAX_CONNS=10` where there is a cap. "
        "Requests/s, and ratios at each concurrency to the same driver's `orm_held` and to "
        f"`{OLD}`.",
        "",
        f"| reference | {header} |",
        "|---|" + "---:|" * len(concurrency),
    ]
    for n in names:
        t = summary[n]["throughput"]
        held = summary.get(orm_held_of(summary[n]["meta"]))
        cells = []
        for c in concurrency:
            row = t[_key(queries, c)]
            rps = row["rps"]
            to_held = _ratio(rps, held["throughput"][_key(queries, c)]["rps"]) if held else None
            to_old = _ratio(rps, old["throughput"][_key(queries, c)]["rps"]) if old else None
            err = f", {row['errors']} errors" if row["errors"] else ""
            cells.append(f"{rps:,.0f} ({_fmt_ratio(to_held)} held, {_fmt_ratio(to_old)} old{err})")
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Latency p50 / p99 in ms, the peak of server connections seen in `pg_stat_activity`, and "
        f"the benchmark process's CPU time per request ({queries}-query requests). Latencies are "
        "those of the requests completed in the window; greenlets that completed none are counted "
        "(the worst round) when there are any:",
        "",
        f"| reference | {header} |",
        "|---|" + "---:|" * len(concurrency),
    ]
    for n in names:
        t = summary[n]["throughput"]
        cells = [
            f"{t[_key(queries, c)]['p50_ms']:.2f} / {t[_key(queries, c)]['p99_ms']:.2f} "
            f"({t[_key(queries, c)]['peak_conns']} conns, "
            f"{_fmt_us(t[_key(queries, c)]['cpu_us_per_request'])}"
            f"{_fmt_starved(t[_key(queries, c)], c)})"
            for c in concurrency
        ]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return lines


def write_plot(path: Path, summary: dict[str, dict[str, Any]]) -> bool:
    """Requests/s against concurrency (and, for the external wait, against the wait), one line
    per reference; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    query_counts = sorted(
        {row["queries"] for s in summary.values() for row in s["throughput"].values()}
    )
    wait_levels = sorted(
        {row["concurrency"] for s in summary.values() for row in s["external_wait"].values()}
    )
    panels = [("queries", q) for q in query_counts] + [("wait", c) for c in wait_levels]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)

    def style(entry: dict[str, Any]) -> tuple[str, float]:
        ours = entry["meta"]["kind"] == "ours"
        return ("-" if ours else "--"), (2.5 if ours else 1.2)

    for ax, (kind, level) in zip(axes[0], panels, strict=False):
        for name, entry in summary.items():
            if kind == "queries":
                rows = sorted(
                    (r for r in entry["throughput"].values() if r["queries"] == level),
                    key=lambda r: r["concurrency"],
                )
                xs = [r["concurrency"] for r in rows]
            else:
                rows = sorted(
                    (r for r in entry["external_wait"].values() if r["concurrency"] == level),
                    key=lambda r: r["wait_ms"],
                )
                xs = [r["wait_ms"] for r in rows]
            if not rows:
                continue
            line, width = style(entry)
            ax.plot(
                xs,
                [r["rps"] for r in rows],
                line,
                marker="o",
                linewidth=width,
                markersize=3,
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        if kind == "queries":
            levels = sorted(
                {r["concurrency"] for s in summary.values() for r in s["throughput"].values()}
            )
            ax.set_xticks(levels, [f"{c:,}" for c in levels])
            ax.set_xlabel("concurrent greenlets (MAX_CONNS=10 where capped)")
            ax.set_title(f"{level}-query requests (median of rounds)")
        else:
            waits = sorted(
                {r["wait_ms"] for s in summary.values() for r in s["external_wait"].values()}
            )
            ax.set_xticks(waits, [f"{w:g} ms" for w in waits])
            ax.set_xlabel("external wait W between the two queries (MAX_CONNS=10 where capped)")
            ax.set_title(f"query, wait W, query: {level:,} greenlets")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:,.0f}"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylabel("requests/s (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _external_wait_tables(summary: dict[str, dict[str, Any]], sizes: Any) -> list[str]:
    names = [n for n in summary if summary[n]["external_wait"]]
    columns = [(w, c) for w in sizes.wait_ms for c in sizes.wait_concurrency]
    header = " | ".join(f"W={w} ms, c={c:,}" for w, c in columns)
    lines = [
        "",
        "## Requests with an external wait",
        "",
        "`c` greenlets making requests of one ORM query, `gevent.sleep(W)` (standing for an HTTP "
        "call, Redis, S3), one more ORM query, `MAX_CONNS=10` where there is a cap. A pool that "
        "holds the connection for the whole request serves at most `MAX_CONNS / W` requests/s; "
        '`POOL_MODE="transaction"` gives the connection back during the wait. Requests/s, and '
        "the ratio to the same driver's `orm_held` (one connection per greenlet, no cap):",
        "",
        f"| reference | {header} |",
        "|---|" + "---:|" * len(columns),
    ]
    for n in names:
        e = summary[n]["external_wait"]
        held = summary.get(orm_held_of(summary[n]["meta"]))
        cells = []
        for w, c in columns:
            row = e.get(_wait_key(w, c))
            if row is None:
                cells.append("—")
                continue
            base = held["external_wait"].get(_wait_key(w, c)) if held else None
            to_held = _ratio(row["rps"], base["rps"]) if base else None
            err = f", {row['errors']} errors" if row["errors"] else ""
            cells.append(f"{row['rps']:,.0f} ({_fmt_ratio(to_held)} held{err})")
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Latency p50 / p99 in ms, peak server connections in `pg_stat_activity`, CPU time of the "
        "benchmark process per request:",
        "",
        f"| reference | {header} |",
        "|---|" + "---:|" * len(columns),
    ]
    for n in names:
        e = summary[n]["external_wait"]
        cells = []
        for w, c in columns:
            row = e.get(_wait_key(w, c))
            if row is None:
                cells.append("—")
                continue
            cells.append(
                f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f} ({row['peak_conns']} conns, "
                f"{_fmt_us(row['cpu_us_per_request'])}{_fmt_starved(row, c)})"
            )
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return lines
