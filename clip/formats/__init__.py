"""The artifact formats of docs/formats.md, in code: the only place that knows a layout.

Every stage reads its inputs and writes its outputs through these modules and `clip.storage` (which knows
locations: local paths and s3:// URIs). Stage packages never import one another; they meet here.

| artifact | written by | module |
|---|---|---|
| webdataset tars (reader and deterministic writer) | collect, shard | `clip.formats.tar` |
| raw shards `raw-NNNNN.tar`, sample JSON, done-record names | collect | `clip.formats.raw` |
| `candidates.parquet` (every candidate's status) | collect | `clip.formats.candidates` |
| `keep.parquet`, `removed.parquet`, `overlap_report.json` | dedup | `clip.formats.dedup` |
| training shards, `sizes.json`, `manifest.json` (the data version) | shard | `clip.formats.manifest` |
| `step-NNNNNNNN.pt`, `final.pt` | train | `clip.formats.checkpoint` |
| the export bundle and its `manifest.json` | export | `clip.formats.bundle` |
| the evaluation results table | evaluate | `clip.formats.results` |
| the photo search index (`index.json`, embeddings, parts) | `clip-pipeline index` | `clip.formats.index` |
| `reports/metrics/<stage>.json` | every stage | `clip.formats.metrics` |
| errors: missing, malformed, stale input | all | `clip.formats.errors` |

Import the submodule you need (`from clip.formats.manifest import read_manifest`); this package imports
nothing on its own, so importing one format never pulls in torch or pyarrow for another.
"""
