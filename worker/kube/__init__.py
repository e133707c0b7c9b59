"""The Kubernetes module: deploy a certificate as a ``kubernetes.io/tls`` Secret.

Submodules, from the network inwards:

* :mod:`worker.kube.connect` — kubeconfig vetting, in-cluster detection, cached API clients;
* :mod:`worker.kube.client` — the only module that calls the API (retries, error mapping);
* :mod:`worker.kube.deploy` — deploy / dry-run / rollback / health check of one target;
* :mod:`worker.kube.errors` — the error vocabulary (reason codes and fixes).

The pure parts it builds on (the desired Secret, its diff) live in :mod:`worker.core.secret`.
This package module imports nothing, so importing ``errors`` never pulls in the client library.
"""
