"""Where completions come from: the built-in engine, later upstream servers."""
