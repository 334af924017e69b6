"""The run store: one schema-versioned SQLite file per run directory. Imports no torch."""
