"""Built-in losses (registered in `optima.plugins.builtin`)."""
