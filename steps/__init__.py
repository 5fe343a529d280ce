"""PrefFlow library: the work behind each flow step, importable and testable without Metaflow."""
