"""What sits above the library: ``analyze`` (checkpoints through the Monitor machinery), the demo, and specs
that resolve ``module:attr`` and ``path/to/file.py:attr`` into model, data and loss factories."""
