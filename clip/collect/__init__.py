"""The collection stage: query lists, candidate sources, matching and balancing, image fetching and
validation, raw webdataset shards (docs/formats.md "Raw shards").

    from clip.collect import stage
    result = stage.run(cfg.collect, storage=cfg.storage, compute=cfg.compute, progress=progress)
    result.metrics, result.outputs, result.stats       # flat metrics, what was written, stats.json

Modules, one job each:
- stage: `run` and the orchestration of the steps (queries, map, balance, plan, build, summaries);
- partitions: the map tasks over source partitions (caption n-gram counts, query matches);
- build: building one raw shard from its planned candidates, its done-record and fingerprint, shared fetchers;
- summary: candidates.parquet, query_counts.json and the stats (stats.json), and the stage's flat metrics;
- queries (query lists), sources (table / folder / webdataset / synthetic candidates), matching (n-gram
  matching, per-query balancing), images (validate / resize / re-encode / hash), fetch (the HTTP fetcher),
  writer (raw shard output and done-records);
- net/: the fetcher's network pieces (DNS resolver, SSRF guard, pinned connections, per-host limits, robots.txt,
  header checks, latency figures), see clip/collect/net/__init__.py.
The synthetic generator and its evaluation sets live in clip/synthetic.py (dedup uses them too).
"""
