"""Progress bars: on standard error with rate and ETA when asked for, silent when it is not a terminal."""

import re

from common import progress

# A tqdm line: description, percentage, count, elapsed<remaining (the ETA) and the rate.
BAR = re.compile(r"rounds: +\d+%\|.*\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/round|round/s)\]")


def test_bar_shows_with_progress_and_is_silent_off_a_terminal(capsys):
    assert list(progress.bar(range(3), desc="rounds", enabled=True, unit="round")) == [0, 1, 2]
    shown = capsys.readouterr()
    assert BAR.search(shown.err) and "3/3" in shown.err and shown.out == ""
    # capsys's stderr is not a terminal: without --progress the same loop prints nothing.
    assert list(progress.bar(range(3), desc="rounds", unit="round")) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")
    assert not progress.shown(False) and progress.shown(True)
