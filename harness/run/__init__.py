"""Running methods: the pipeline over (method, mode) cells, latency runs, export. The only layer that imports `methods`."""
