"""The network machinery under the collect stage's fetcher (`clip.collect.fetch.Fetcher`), one job per module.

Each module is thread-safe where it holds state and knows nothing of the others' internals:

- resolver: caching, single-flight DNS with a bounded wait per lookup
- netguard: the SSRF guard, a pure verdict on one IP address
- urls: a scraped URL turned into the request target (scheme, IDNA host, port, ASCII request path)
- connections: HTTP(S) connections pinned to a checked IP, and the pool of idle keep-alive ones
- limits: per-host concurrency slots and request rate
- watchdog: the per-exchange deadline, enforced by shutting the socket
- exchange: one GET over one pinned connection, classified into a reason without raising
- robots: robots.txt, fetched once per origin and cached under RFC 9309's rules
- headers: what response headers decide before the body (X-Robots-Tag opt-out, content type, Retry-After)
- reasons: the vocabulary of outcomes (ok / failed / filtered) and which reasons are policy
- latency: DNS and download latency figures from bounded samples
"""
