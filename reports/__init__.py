"""Self-contained HTML reports from run stores. Imports no torch."""
