"""The one exception type users see: its message is a single line naming the problem and the fix."""


class D2Error(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2."""


class Interrupted(D2Error):
    """A calibration stopped by something outside it (a lost process): its checkpoint's written
    layers stay, for ``--resume``. Any other D2Error would recur with the same options, so the
    partial checkpoint of a fresh run is removed."""
