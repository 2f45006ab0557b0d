"""Weekly Notion sync (behaviour §11).

- ``markdown.py`` / ``pages.py``  blocks → markdown (byte-identical to the backend), titles, metadata (pure);
- ``client.py``  the real notion-client with this code's pacing and retries, and ``NotionResource``;
- ``fetch.py``   the cursor arithmetic, the data-source query and breadth-first block trees;
- ``ingest.py``  stale/unchanged/apply decisions, the note cap, document writes, sync_runs/sync_state;
- ``targets.py`` which connections are eligible, and which databases are read in full;
- ``batch.py``   one query response: decide, load the blocks, write (a refused page is isolated);
- ``results.py`` / ``summary.py``  a connection's status and counters; the run's totals from sync_runs;
- ``sync.py``    one connection end to end (cursor, sync_runs, seed digest);
- ``defs.py``    the Dagster job (one step per connection), its summary and the weekly schedule.
"""
