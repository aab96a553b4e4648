"""Built-in rewards (registered in `optima.plugins.builtin`)."""
