"""``python -m computable_flows_shim``: the ``cfs`` command."""

from computable_flows_shim.cli._main import main

raise SystemExit(main())
