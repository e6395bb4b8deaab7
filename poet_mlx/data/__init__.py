"""Preference data: sources, row formats, tokenization (TRL's convention) and the data check."""
