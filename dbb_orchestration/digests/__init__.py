"""Note digests: which notes to send (``selection``), how a note reads in an email (``excerpt``) and the
digest email itself (``render``)."""
