"""Progress off a terminal: plain lines with counts, elapsed time, an estimate of what is left and the item."""

import io

from nsa.progress import LineProgress, progress_bar


def test_lines_carry_count_eta_and_postfix(monkeypatch):
    clock = iter(range(0, 1000, 10))  # each monotonic() call: 10 s later
    monkeypatch.setattr("nsa.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(total=4, desc="tune paper", unit="cand", interval=15.0, file=out)
    bar.set_postfix_str("window|T=1024")
    for _ in range(4):
        bar.update()
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("tune paper: 2/4 cand (50.0%), ") and "left [window|T=1024]" in lines[0]
    assert lines[-1].startswith("tune paper: 4/4 cand (100.0%)") and "left" not in lines[-1]
    assert sum(line.startswith("tune paper: 4/4") for line in lines) == 1


def test_iterating_counts_from_initial_and_ends_with_a_line():
    out = io.StringIO()
    bar = LineProgress(range(3, 6), total=6, initial=3, desc="train nsa", unit="step", interval=1e9, file=out)
    assert list(bar) == [3, 4, 5]
    assert out.getvalue().startswith("train nsa: 6/6 step (100.0%)")


def test_progress_bar_off_a_terminal_writes_lines(capsys):
    with progress_bar(total=2, desc="smoke", unit="row") as bar:
        bar.update(2)
    assert "smoke: 2/2 row (100.0%)" in capsys.readouterr().err
    with progress_bar(total=2, desc="quiet", unit="row", enabled=False) as bar:
        bar.update(2)
    assert "quiet" not in capsys.readouterr().err
