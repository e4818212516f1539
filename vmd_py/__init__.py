"""vmd-py: a privilege-separated VM daemon for Linux (shared, unprivileged-side helpers)."""
