"""Loss-explosion evaluation suite: tiny GPT runs that do and do not explode, recorded for offline detectors."""
