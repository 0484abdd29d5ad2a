"""Preference data readers, grain pipelines and the embedded toy task."""
