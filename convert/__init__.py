"""convert package (commands grow in later issues)."""
