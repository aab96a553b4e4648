"""Built-in tasks (registered in `optima.plugins.builtin`)."""
