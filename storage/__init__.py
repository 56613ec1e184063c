"""The database: schema, engines, sessions and migrations, on SQLite or PostgreSQL.

:mod:`storage.models` holds the tables and the writes several parts share,
:mod:`storage.engine` makes engines and sessions, :mod:`storage.migrate` upgrades the
schema, and :mod:`storage.types` has the column types for UTC times and money. Importing
this package connects to nothing.
"""
