"""What an admin sees: /metrics, /healthz and the status pages, on one HTTP listener.

Off unless `http_listen` is set.  It runs on the daemon's own event loop and only reads:
the stats object, the window, the writer's spool figures, the database (a few bounded
queries, cached).  Nothing in the policy path waits for it.
"""
