"""One rule for the schedule flags `--update-every` and `--l1-start`, shared by `l1ra train` and `l1ra compare`.

A value in (0, 1) is a fraction of the run's optimizer steps; a whole number >= 1 is a count of optimizer steps
(`--l1-start` also takes 0: from the first step). Anything else (2.5, 1.5, a negative number, inf) is an error that
names the flag and the two accepted forms, never silently rounded. The library's `L1RAConfig` takes the result as is:
a float for a fraction, an int for a step count.
"""

from __future__ import annotations

import math
from typing import Optional, Union

from .errors import UserError

# flag -> whether 0 is allowed ("from the first step")
SCHEDULE_FLAGS = {"--update-every": False, "--l1-start": True}


class ScheduleError(UserError, ValueError):
    """A schedule flag that is neither a fraction of the steps nor a whole number of steps."""


def steps_or_fraction(flag: str, value) -> Optional[Union[int, float]]:
    """`value` of `flag` (a key of SCHEDULE_FLAGS) as L1RAConfig takes it: float in (0, 1) (or 0.0 where allowed) for
    a fraction, int >= 1 for a step count; None stays None. Raises `ScheduleError` otherwise."""
    if value is None:
        return None
    zero_ok = SCHEDULE_FLAGS[flag]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if 0 < number < 1 or (zero_ok and number == 0):
        return number
    if math.isfinite(number) and number >= 1 and number.is_integer():
        return int(number)
    fraction = "0 <= f < 1" if zero_ok else "0 < f < 1"
    shown = f"{value:g}" if isinstance(value, (int, float)) else repr(value)
    raise ScheduleError(f"{flag} {shown}: use a fraction of the steps ({fraction}) or a whole number of optimizer "
                        "steps (1, 2, ...)")
