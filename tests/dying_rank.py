"""``d2export`` whose rank $D2_TEST_DIE_RANK dies (os._exit, as a killed process does) once it has
finished layer 0: what a lost rank looks like to the others (tests/test_streaming.py)."""

import os

from d2export.cli import app
from d2quant.pipeline import Calibrator

_finish = Calibrator._finish_layer


def _finish_then_die(self, i, *args):
    _finish(self, i, *args)
    if self.group.rank == int(os.environ["D2_TEST_DIE_RANK"]):
        os._exit(9)


Calibrator._finish_layer = _finish_then_die
app()
