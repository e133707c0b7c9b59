"""The application layer: what runs do (start, process, advance, reap), the commands and
read views the scheduler and the CLI call, and the stacked webhook.

It orchestrates the pure core, the Kubernetes module and the models' query functions; it
writes no SQL text itself (the queries live in :mod:`models.queries`). Modules:

* ``runs``: the run state machine; ``dispatch``: the messages it sends (a protocol tasks/
  implements) and stacking the next distribution; ``webhook``: the webhook run.
* ``commands`` and ``views``: what the scheduler and the CLI call, re-exported by ``service``.
* ``clients``: the Kubernetes client for a target; ``fanout``: a group's fan-out settings.
"""
