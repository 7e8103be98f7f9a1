"""The usage ledger: one row per request, kept durably, read by `tallygate usage`.

`rows` turns a UsageRecord into a row (pure); `store` keeps rows in SQLite or PostgreSQL
(idempotent inserts, versioned schema); `writer` is the sink: it batches rows off the event
loop, commits them as a group, and spools them to a local file while the store is away;
`report` totals rows by any grouping (pure). docs/ledger.md says what is kept, and what can be
lost when.
"""
