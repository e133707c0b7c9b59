"""The CertAutoPilot demo: the main job end to end, driving the real ``certautopilot`` CLI.

It lives in the source checkout, not in the installed package: it starts local Kubernetes API
servers from the checkout's test environment (``tests/testenv``). Run it with
``bash scripts/demo`` (which installs what it needs) or ``.venv/bin/python -m demo`` from the
repository root; ``--kubeconfig FILE`` (repeatable) uses your own clusters instead.
"""
