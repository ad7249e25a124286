"""The ``cfs`` command: a thin layer over the public API (``computable_flows_shim``)."""
