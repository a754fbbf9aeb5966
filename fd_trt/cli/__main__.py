"""``python -m fd_trt.cli``: the ``fd-trt`` command."""

from fd_trt.cli import main

raise SystemExit(main())
