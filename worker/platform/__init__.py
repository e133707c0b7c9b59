"""The platform: settings, the database engine, the per-process runtime, the explicit
bootstrap (schema, KEK) and the Celery application (configured lazily).
"""
