"""`python -m benchmarks`: run the whole set; see `python -m benchmarks --help`."""

from __future__ import annotations

from benchmarks._suite import main

raise SystemExit(main())
