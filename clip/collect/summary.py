"""The collect stage's summaries of a run: candidates.parquet, query_counts.json and the stats (stats.json).

They are always rewritten from the shards' done-records and the match results, so a resumed run summarises the
whole pool, not only the shards it built. Formats: docs/formats.md "Raw shards".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from clip.collect.build import ShardTask
from clip.collect.net.reasons import CAPTION_TOO_LONG
from clip.collect.partitions import PartitionMatches, caption_too_long
from clip.collect.sources import CandidateSource, Partition
from clip.collect.writer import RawOutput
from clip.config import CollectConfig
from clip.formats.candidates import CANDIDATE_COLUMNS, CANDIDATE_STATUSES, write_candidates
from clip.formats.raw import QUERY_COUNTS_NAME, raw_shard_name


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def write_summaries(
    cfg: CollectConfig, source: CandidateSource, parts: list[Partition], output: RawOutput, queries: list[str],
    balanced: Any, records: dict[int, dict[str, Any]], tasks: list[ShardTask], results: list[PartitionMatches],
    part_start: np.ndarray,
) -> dict[str, Any]:
    """candidates.parquet (streamed, one partition at a time), query_counts.json; returns the stats.

    candidates.parquet: kept candidates carry key, shard, their assigned query and the status from their
    shard's record; skipped ones have no key: `query_full` names their rarest matching query, `no_query` none;
    nor have those filtered as `caption_too_long` (refused before matching).
    `balanced`: the `clip.collect.matching.balance` result; `part_start[p]`: global id of partition p's row 0.
    """
    by_candidate: dict[int, tuple[dict[str, Any], int]] = {}
    for index, record in records.items():
        for sample in record["samples"]:
            by_candidate[sample["candidate"]] = (sample, index)
    status_counts: Counter = Counter()
    reason_counts: Counter = Counter()
    ok_per_query: Counter = Counter()
    assigned = balanced.assigned
    query_order = np.empty(len(queries), np.int64)  # rarest-first rank, for naming a full query
    query_order[np.lexsort((np.arange(len(queries)), balanced.match_counts))] = np.arange(len(queries))
    entry_query = {e.candidate: e.query for t in tasks for e in t.entries}

    def partition_rows() -> Iterator[dict[str, list[Any]]]:
        """One batch of candidates.parquet rows per partition; counts the statuses on the way."""
        for p, result in enumerate(results):
            columns: dict[str, list[Any]] = {name: [] for name in CANDIDATE_COLUMNS}
            base = int(part_start[p])
            offsets, qids = result.offsets, result.query_ids
            for row, cand in enumerate(source.iter_candidates(parts[p])):
                candidate = base + row
                key = query = reason = shard = None
                if assigned[candidate] >= 0:
                    sample, shard_index = by_candidate[candidate]
                    key, status, reason = sample["key"], sample["status"], sample["reason"]
                    query, shard = entry_query[candidate], raw_shard_name(shard_index)
                    if status == "ok":
                        ok_per_query[query] += 1
                elif caption_too_long(cand.caption, cfg.max_caption_bytes):  # refused before matching
                    status, reason = "filtered", CAPTION_TOO_LONG
                else:
                    status = "skipped"
                    matched = qids[offsets[row]:offsets[row + 1]]
                    if len(matched):
                        reason = "query_full"
                        query = queries[int(matched[np.argmin(query_order[matched])])]
                    else:
                        reason = "no_query"
                status_counts[status] += 1
                if reason:
                    reason_counts[reason] += 1
                for name, value in zip(CANDIDATE_COLUMNS, (key, cand.url, cand.caption, query, status, reason, shard),
                                       strict=True):
                    columns[name].append(value)
            yield columns

    write_candidates(output.uri, partition_rows(), output.storage_cfg)

    counts = {
        queries[q]: {"matched": int(balanced.match_counts[q]), "assigned": int(balanced.assigned_counts[q]),
                     "ok": int(ok_per_query.get(queries[q], 0))}
        for q in np.flatnonzero(balanced.match_counts).tolist()
    }
    output.write_json({"per_query_cap": cfg.per_query_cap, "num_queries": len(queries), "counts": counts},
                      QUERY_COUNTS_NAME)

    stats: dict[str, Any] = {
        "source": source.name,
        "candidates": int(part_start[-1]),
        "matched": sum(int(np.count_nonzero(np.diff(r.offsets))) for r in results),
        "assigned": int(np.count_nonzero(assigned >= 0)),
        "by_status": {s: status_counts.get(s, 0) for s in CANDIDATE_STATUSES},
        "by_reason": dict(sorted(reason_counts.items())),
        "queries_with_matches": len(counts),
    }
    if source.needs_fetch:
        stats.update(fetch_latency_stats(records))
    return stats


def fetch_latency_stats(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """DNS / download latency (median, p99) over every fetched sample, and each shard's own figures."""
    dns = [s["dns_ms"] for r in records.values() for s in r["samples"] if s.get("dns_ms") is not None]
    download = [s["download_ms"] for r in records.values() for s in r["samples"] if s.get("download_ms") is not None]
    return {
        "fetch_latency_ms": {
            "dns_median": _percentile(dns, 50), "dns_p99": _percentile(dns, 99),
            "download_median": _percentile(download, 50), "download_p99": _percentile(download, 99),
            "dns_samples": len(dns), "download_samples": len(download),
        },
        "fetch_latency_ms_per_shard": {
            r["shard"]: r["latency"] for _, r in sorted(records.items()) if r.get("latency")
        },
    }


def stage_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics of a collect run (reports/metrics/collect.json): every number of the stats as
    `collect_<name>`, and the sample count of each status as `collect_<status>`."""
    metrics = {
        "collect_" + name: value for name, value in stats.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    metrics.update({f"collect_{status}": count for status, count in stats["by_status"].items()})
    return metrics
