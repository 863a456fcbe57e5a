"""The `collect` section and its sub-sections: the candidate sources, the query list, image fetching."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from clip.config.base import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Section, Uri
from clip.formats.images import WEBDATASET_IMAGE_KEYS


class TableSourceConfig(Section):
    """(url, caption) metadata tables: the form CC3M, CC12M, LAION and DataComp publish."""

    paths: list[str] = Field(
        default_factory=list, description="metadata files or globs (local or s3://): .parquet, .csv, .tsv, .jsonl")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="file format; auto: from each file's extension")
    url_column: str = Field("url", description="column holding the image URL")
    caption_column: str = Field("caption", description="column holding the caption")


class FolderSourceConfig(Section):
    """A folder of images with sidecar caption files (img.jpg + img.txt)."""

    path: str | None = Field(None, description="the folder of images and captions; required for source: folder")
    caption_extension: str = Field(".txt", description="extension of the caption file next to each image")


class WebdatasetSourceConfig(Section):
    """Existing webdataset tars of (image, caption) samples."""

    urls: list[str] = Field(default_factory=list, description="tar paths, brace patterns or s3:// URLs")
    caption_key: str = Field("txt", description="member extension of the caption in each sample")
    image_keys: list[str] = Field(
        default_factory=lambda: list(WEBDATASET_IMAGE_KEYS),
        description="member extensions tried, in order, for the image of each sample")


class SyntheticSourceConfig(Section):
    """Built-in generator: deterministic scenes (shapes, colours, sizes, counts, positions, words)."""

    num_samples: PositiveInt = Field(4096, description="number of generated (image, caption) candidates")
    image_size: PositiveInt = Field(64, description="side (pixels) of the generated square images")
    heldout_fraction: Fraction = Field(
        0.2, description="share of attribute combinations never shown in training (held out for evaluation)")


class QueriesConfig(Section):
    """The query list captions are matched against (data/queries.txt), as in the CLIP paper."""

    corpus_paths: list[str] = Field(default_factory=list, description="text files to mine words and bigrams from")
    extra_lists: list[str] = Field(
        default_factory=list, description="user query lists (titles, synsets), one query per line")
    min_word_count: PositiveInt = Field(
        100, description="a word becomes a query when it occurs at least this often (the paper's value: 100)")
    min_bigram_count: PositiveInt = Field(20, description="a bigram is a candidate query when it occurs this often")
    min_pmi: float = Field(3.0, description="minimum pointwise mutual information of a bigram kept as a query")
    max_queries: PositiveInt = Field(500_000, description="at most this many mined queries, the most frequent kept")
    from_captions: bool = Field(
        True, description="when no corpus is given, mine the candidate captions themselves")


class FetchConfig(Section):
    """Downloading images: politeness, safety limits, and image validation and re-encoding."""

    threads: PositiveInt = Field(64, description="concurrent download threads")
    timeout_s: PositiveFloat = Field(
        10.0, description="per request, in seconds: DNS look-up, connect and read each")
    total_timeout_s: PositiveFloat | None = Field(
        None, description="bound (seconds) on a whole exchange incl. the body (slow-drip bound); null: 3 x timeout_s")
    retries: NonNegativeInt = Field(2, description="retries of a request that failed with a retryable error")
    backoff_base_s: PositiveFloat = Field(
        0.5, description="base delay (seconds) of the exponential backoff with jitter between retries")
    max_retry_after_s: PositiveFloat = Field(
        30.0, description="cap (seconds) on a server's Retry-After wait; longer waits are cut to it")
    max_bytes: PositiveInt = Field(20_000_000, description="largest image body (bytes); reading stops past it")
    user_agent: str = Field(
        "clip-pipeline/0.1 (+https://github.com/clip-pipeline/clip-pipeline)",
        description="User-Agent header sent with every request")
    respect_robots_txt: bool = Field(False, description="fetch and obey each host's robots.txt")
    respect_x_robots_tag: bool = Field(
        True, description="skip images served with X-Robots-Tag noai / noimageai (read from the headers)")
    allow_private_addresses: bool = Field(
        False, description="private, loopback, link-local, metadata addresses: refused unless true")
    allow_loopback: bool = Field(
        False, description="let loopback addresses (127.0.0.0/8, ::1) only through; for local tests")
    per_host_concurrency: PositiveInt = Field(8, description="concurrent requests to one host")
    per_host_rate: PositiveFloat = Field(50.0, description="requests per second per host")
    dns_ttl_s: PositiveFloat = Field(300.0, description="how long (seconds) a host's DNS answer is cached")
    max_redirects: NonNegativeInt = Field(5, description="redirects followed per request, each hop checked again")
    # image validation and re-encoding
    min_size: PositiveInt = Field(32, description="images with a side shorter than this (pixels) are rejected")
    max_aspect_ratio: PositiveFloat = Field(
        3.0, description="images whose long side exceeds this multiple of the short side are rejected")
    max_pixels: PositiveInt = Field(
        89_478_485, description="decompression-bomb limit: width x height above it is rejected (PIL's default)")
    max_side: PositiveInt = Field(
        256, description="stored images are shrunk so the longest side is at most this (pixels); never upscaled")
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = Field(90, description="JPEG quality of the re-encoded images")
    retry_failed: bool = Field(
        False, description="on a rerun, try again candidates that failed with a retryable error")


class CollectConfig(Section):
    """collect: build queries, match and balance candidate pairs, fetch and validate images -> data/raw/."""

    source: Literal["synthetic", "table", "folder", "webdataset"] = Field(
        "synthetic", description="where candidate pairs come from (the matching sub-section configures it)")
    output_dir: Uri = Field(
        "data/raw", description="raw shards, candidates.parquet and stats (local path or s3://bucket/prefix)")
    queries_path: str = Field("data/queries.txt", description="where the query list is written, one per line")
    per_query_cap: PositiveInt = Field(20_000, description="K: at most this many pairs per query")
    samples_per_shard: PositiveInt = Field(1000, description="samples per raw webdataset shard")
    partition_size: PositiveInt = Field(10_000, description="candidates per Dask partition")
    max_caption_bytes: PositiveInt = Field(
        4096, description="captions longer than this many UTF-8 bytes are refused (reason caption_too_long)")
    seed: int = Field(0, description="random seed of the synthetic generator and of the per-query balancing")
    queries: QueriesConfig = Field(default_factory=QueriesConfig, description="the query list")
    table: TableSourceConfig = Field(default_factory=TableSourceConfig, description="settings of source: table")
    folder: FolderSourceConfig = Field(default_factory=FolderSourceConfig, description="settings of source: folder")
    webdataset: WebdatasetSourceConfig = Field(
        default_factory=WebdatasetSourceConfig, description="settings of source: webdataset")
    synthetic: SyntheticSourceConfig = Field(
        default_factory=SyntheticSourceConfig, description="settings of source: synthetic")
    fetch: FetchConfig = Field(default_factory=FetchConfig, description="image downloading and validation")

    @model_validator(mode="after")
    def _source_has_input(self) -> CollectConfig:
        if self.source == "table" and not self.table.paths:
            raise ValueError("collect.source is 'table' but collect.table.paths is empty")
        if self.source == "folder" and not self.folder.path:
            raise ValueError("collect.source is 'folder' but collect.folder.path is not set")
        if self.source == "webdataset" and not self.webdataset.urls:
            raise ValueError("collect.source is 'webdataset' but collect.webdataset.urls is empty")
        return self
