"""The collection stage: query lists, candidate sources, matching and balancing, image fetching and
validation, raw webdataset shards (docs/formats.md "Raw shards").

    from clip.collect.stage import run_collect
    stats = run_collect(cfg.collect, cfg.compute, cfg.storage)

Modules: queries (query lists), sources (table / folder / webdataset / synthetic candidates), synthetic (the
built-in generator and its evaluation sets), matching (n-gram matching, per-query balancing), images
(validate / resize / re-encode / hash), fetch (HTTP), writer (raw shards and done-records), stage (the run).
"""
