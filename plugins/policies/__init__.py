"""Built-in policies (registered in `optima.plugins.builtin`)."""
