"""The gateway's Prometheus figures (GET /metrics, docs/metrics.md): `recording` adds each relayed
request to plain counters on the request path; `workers` copies them off it, writes them as snapshots
so that one worker answers a scrape for all, and reads the processes' figures from /proc;
`exposition` renders them as Prometheus text, only on a scrape. metrics_http.py serves them."""
