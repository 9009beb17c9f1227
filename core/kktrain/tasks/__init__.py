"""Built-in tasks (``kktrain.tasks.latin`` is the default)."""
