"""`python -m replay.synthetic`: see replay/synthetic/record.py."""

from .record import main

raise SystemExit(main())
