"""Prometheus metrics: what the database knows (runs, users, tokens, proposals, replicas),
read at scrape time, and the events this process observes (scheduler lag)."""
