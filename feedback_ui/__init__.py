"""Preference collection: candidates, a login-protected Gradio labeling app, export.

Modules (one concept each):

- ``store``      database schema, engine set-up (SQLite WAL / PostgreSQL), schema version
- ``auth``       scrypt password hashing and user accounts
- ``candidates`` K responses per prompt from a policy, gold items, comparisons
- ``assign``     per-labeler task queue: overlap, gold rate, no repeats
- ``voting``     recording votes (idempotent), skips, edits
- ``agreement``  pure agreement metrics (Cohen's kappa, Krippendorff's alpha)
- ``pairs``      pure ranking -> pairs, majority, margin, split by prompt
- ``export``     votes -> preference JSONL
- ``stats``      progress, per-labeler numbers and agreement from the database
- ``app``        the Gradio UI; ``server`` serves it behind the login
- ``commands``   the ``rlhf label ...`` argparse subtree
"""
