"""A seeded, randomized fault scenario with invariants (issue 17 §9): the net.

* :mod:`tests.chaos.model` — pure: the fault schedule, the expected-state model, the checkers;
* :mod:`tests.chaos.driver` — one round on the real environment;
* ``python -m tests.chaos --minutes 30 [--seed N]`` — rounds until time is up.

``tests/integration/test_chaos.py`` runs one short fixed-seed round in CI.
"""
