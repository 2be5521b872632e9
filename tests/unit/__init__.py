"""Fast tests that need no database."""
