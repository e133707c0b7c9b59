"""The pure core: certificate bundles, name templates, fan-out plans, the desired Secret and
its diff, the rollback snapshot, envelope encryption.

Nothing here imports Celery, SQLAlchemy, the Kubernetes client, urllib3 or any other layer
of the project (an import-linter contract in CI enforces it), so every module is unit-tested
without a server and can be reasoned about as plain functions over values.
"""
