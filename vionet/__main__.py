"""``python -m vionet``: the sandboxed virtio-net worker (started by the parent only)."""

from vionet.worker import main

raise SystemExit(main())
