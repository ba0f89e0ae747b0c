"""cgroup drivers: the protocols (``base``), the no-op driver (``none``), v1/v2 (``v1``/``v2``).

``detect_driver`` (in ``detect``) picks one for the host.
"""

from __future__ import annotations

from .base import CgroupDriver, CgroupError, JobCgroup
from .detect import detect_driver
from .none import NoCgroupDriver, NoJobCgroup

__all__ = ["CgroupDriver", "CgroupError", "JobCgroup", "NoCgroupDriver", "NoJobCgroup",
           "detect_driver"]
