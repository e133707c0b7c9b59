"""The Kubernetes module: deploy a certificate as a ``kubernetes.io/tls`` Secret.

Submodules, from the network inwards:

* :mod:`worker.kube.connect` — kubeconfig vetting, in-cluster detection, cached API clients;
* :mod:`worker.kube.client` — the only module that calls the API (retries, error mapping);
* :mod:`worker.kube.deploy` — deploy / dry-run / rollback / health check of one target;
* :mod:`worker.kube.secret` — pure: the desired Secret, the update body, the diff;
* :mod:`worker.kube.errors` — the error vocabulary (reason codes and fixes).

This package module imports nothing, so importing the pure ``secret`` module never pulls
in the Kubernetes client library.
"""
