"""Built-in models (registered in `optima.plugins.builtin`)."""
