"""The application layer: what runs do (start, process, advance, reap), the commands and
read views the scheduler and the CLI call, and the stacked webhook.

It orchestrates the pure core, the Kubernetes module and the models' query functions; it
writes no SQL text itself (the queries live in :mod:`models.queries`).
"""
