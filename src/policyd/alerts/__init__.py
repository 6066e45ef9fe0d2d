"""Telling the admin when a user crosses a limit: once per incident (incidents.py), by
mail and/or webhook (notify.py), batched, retried, never on a policy answer's path
(alerter.py)."""
