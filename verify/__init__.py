"""verify package (commands grow in later issues)."""
