"""Lifecycle email sequences (behaviour §9): welcome, onboarding and upgrade.

- ``steps.py``    the step table, due times, idempotency keys and tags (pure);
- ``content.py``  the thirteen emails' copy and template values (pure) + ``templates/``;
- ``process.py``  one step of one user: checks, exit, send, record, advance (exactly once);
- ``due.py``      the sensor's set-based query and its retry cursor (pure planning);
- ``discover.py`` enrolment of engaged free users into ``upgrade``;
- ``defs.py``     the Dagster wiring (job, sensor, discovery job and schedule).
"""
