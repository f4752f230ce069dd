"""Runtimes execute shard jobs: in this process (`local`) or on Ray actors (`ray`)."""
