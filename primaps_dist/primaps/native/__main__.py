"""``python -m primaps_dist.primaps.native``: build the CPU proposal kernel now (``make install`` runs this).

Exit 0 when the kernel is ready, or when it cannot be built and ``PRIMAPS_DIST_NATIVE`` allows the
batched fallback (a warning says why); exit 1 when ``PRIMAPS_DIST_NATIVE=1`` and the build fails.
"""

import sys

from primaps_dist.primaps.native import NativeUnavailable, build, mode

try:
    kernel = build()
except NativeUnavailable as error:
    print(f"warning: {error}; proposals will use the batched torch path", file=sys.stderr)
    sys.exit(1 if mode() == "1" else 0)
print(f"PriMaPs C++ kernel ready: {kernel.__file__}")
