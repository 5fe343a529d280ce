"""``python -m steps.data``: prepare any supported data format (see steps.data.prepare)."""

from __future__ import annotations

from steps.data.prepare import main

raise SystemExit(main())
