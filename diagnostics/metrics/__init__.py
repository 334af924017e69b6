"""Diagnostics: the Diagnostic contract, the registry and its presets."""
