"""Whether the server is shutting down, as the HTTP layer needs to know it.

On SIGTERM uvicorn may tell running requests that their client disconnected before it
cancels them; a request that hears of a disconnect while this is set treats it as the
shutdown it is (recorded as a 503 once the grace period cuts it), not as a client that left.
"""

from __future__ import annotations

import threading

SHUTTING_DOWN = threading.Event()
"""Set by the serve command when the server is told to exit."""
