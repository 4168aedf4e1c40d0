"""Small helpers shared by the GPU scripts in this folder."""
from __future__ import annotations

import math


def json_safe(rows: list[dict]) -> list[dict]:
    """NaN -> None, so the rows serialise as strict JSON."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows]
