"""Built-in heads (registered in `optima.plugins.builtin`)."""
