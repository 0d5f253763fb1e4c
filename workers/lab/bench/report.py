"""The human-readable table of one bench result (the JSON object is printed as well)."""

from __future__ import annotations

from typing import Any

from workers.lab.bench.memory import format_state_memory

__all__ = ["format_table"]


def format_table(result: dict[str, Any]) -> str:
    lines = []
    if "ceiling" in result:
        c = result["ceiling"]
        lines.append(f"ceiling (consume->parse->produce): {c['msgs_per_s']} msg/s")
    if "floor" in result:
        f = result["floor"]
        lines.append(
            f"floor (raw pass-through, {result.get('config', {}).get('rate', 0):.0f} ev/s): "
            f"p50 {f.get('p50_ms', 0):.1f} ms  p99 {f.get('p99_ms', 0):.1f}  "
            f"(unanswered {f['unanswered']})"
        )
    for topology, figures in (result.get("topologies") or {"": result}).items():
        if topology:
            lines.append(f"topology {topology}:")
        lines.extend(
            _format_run(figures, result.get("config", {}).get("rate", 0), "  " if topology else "")
        )
    for name, c in (result.get("catalog") or {}).items():
        target = c.get("target")
        met = (
            f"; target recall@10 >= {target['recall@10']} at >= "
            f"{target['ann_users_per_s']:.0f} users/s "
            + ("met" if target["met_at_default_nprobe"] else "missed")
            + f" (smallest nprobe meeting it: {target['smallest_nprobe_meeting_it']})"
            if target
            else ""
        )
        lines.append(
            f"catalog {name} {c['items']:,} items: ANN recall@10 {c['recall@10']} "
            f"over {c['exact_users']:,} users, {c['ann_users_per_s']} users/s "
            f"(exact {c['exact_users_per_s']}), build {c['build_seconds']} s, "
            f"nprobe {c['nprobe']}/nlist {c['nlist']}{met}"
        )
        lines.append(
            "  nprobe: recall@10, users/s: "
            + "; ".join(
                f"{p['nprobe']}: {p['recall@10']}, {p['ann_users_per_s']:.0f}"
                for p in c.get("nprobe_curve", [])
            )
        )
        spread = c.get("spread", {})
        if spread:
            lines.append(
                "  spread: item nearest-neighbour cosine "
                f"{spread.get('item_nearest_neighbour_cosine_mean')}"
                + (
                    f", text nearest-origin cosine {spread['text_nearest_origin_cosine_mean']} "
                    f"(share > 0.95: {spread['text_share_above_0.95_to_nearest_origin']}; "
                    "origins to each other: "
                    f"{spread['text_origins_nearest_other_origin_cosine_mean']})"
                    if "text_nearest_origin_cosine_mean" in spread
                    else ""
                )
            )
    if "state_memory" in result:
        lines.extend(format_state_memory(result["state_memory"]))
    return "\n".join(lines)


def _format_run(figures: dict[str, Any], rate: float, indent: str) -> list[str]:
    """The table lines of one topology's offered load, saturation and per-stage figures."""
    lines: list[str] = []
    if "offered" in figures:
        o = figures["offered"]
        achieved = (
            f" (achieved {o['achieved_events_per_s']:.0f}, at most "
            f"{o['producer_max_behind_schedule_ms']:.0f} ms behind schedule)"
            if o.get("achieved_events_per_s")
            else ""
        )
        lines.append(
            indent + f"offered {rate:.0f} ev/s{achieved}: p50 {o.get('p50_ms', 0):.1f} ms  "
            f"p90 {o.get('p90_ms', 0):.1f}  p99 {o.get('p99_ms', 0):.1f}  "
            f"p99.9 {o.get('p99.9_ms', 0):.1f}  max {o.get('max_ms', 0):.1f}  "
            f"(unanswered {o['unanswered']})"
            + (
                f"; x floor: p50 {o['p50_ratio_to_floor']}, p99 {o.get('p99_ratio_to_floor')}"
                if "p50_ratio_to_floor" in o
                else ""
            )
        )
        if "recommendations_per_s" in o:
            lag = o.get("consumer_lag_at_end")
            lag_text = (
                (
                    ", consumer lag when producing stopped: "
                    + ", ".join(f"{w} {n}" for w, n in lag.items())
                )
                if lag
                else ""
            )
            lines.append(
                indent + f"  recommendations consumed: {o['recommendations_per_s']:.0f}/s{lag_text}"
            )
        if o.get("by_10s_window"):
            lines.append(
                indent
                + "  by 10 s window, p50/p99 ms: "
                + ", ".join(f"{w['p50_ms']:.0f}/{w['p99_ms']:.0f}" for w in o["by_10s_window"])
            )
        if o.get("by_minute"):
            lines.append(
                indent
                + "  by minute, p50/p99 ms: "
                + ", ".join(f"{w['p50_ms']:.0f}/{w['p99_ms']:.0f}" for w in o["by_minute"])
            )
        if "broker_cpu_share" in o:
            lines.append(
                indent + f"  embedded broker CPU during the offered load: "
                f"{100 * o['broker_cpu_share']:.0f}% of a core"
            )
    if "saturation" in figures:
        s = figures["saturation"]
        lines.append(
            indent + f"saturation: {s['events_per_s']} events/s sustained "
            f"(ratio to ceiling {s.get('ratio_to_ceiling')}), CPU s/1000 events "
            f"{s['cpu_seconds_per_1000_events']}"
        )
    for phase in ("offered", "saturation"):
        sizes = (figures.get(phase) or {}).get("mean_batch_records")
        if sizes:
            lines.append(
                indent
                + f"records per micro-batch, {phase}: "
                + ", ".join(f"{w} {n}" for w, n in sizes.items())
            )
    for worker, stages in (figures.get("stage_seconds") or {}).items():
        lines.append(
            indent
            + f"{worker} seconds per stage: "
            + ", ".join(f"{k} {v}" for k, v in stages.items())
        )
    encodes = figures.get("user_encodes") or {}
    if encodes:
        total = sum(encodes.values()) or 1
        lines.append(
            indent + f"updater user vectors: {encodes.get('incremental', 0)} incremental, "
            f"{encodes.get('full', 0)} full re-encodes "
            f"({100 * encodes.get('incremental', 0) / total:.0f}% incremental)"
        )
    return lines
