"""train.progress: a bar on a terminal, plain lines elsewhere, messages in every mode."""
from __future__ import annotations

import io

from train.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(total=100, **kwargs):
    said, clock = [], Clock()
    bar = Progress(total, desc="job", unit="step", say=said.append, stream=io.StringIO(),
                   interval=60.0, clock=clock, **kwargs)
    return bar, said, clock


def test_plain_lines_a_minute_apart_then_one_at_the_end():
    bar, said, clock = _lines()
    assert bar.mode == "lines"
    for _ in range(10):
        clock.now += 5.0
        bar.update()
    assert said == []  # 50 s: no line yet
    clock.now += 10.0
    bar.set_postfix(loss="0.1234")
    bar.update(2)
    assert said == ["job: 12/100 step (12%), 0.2 step/s, 0:07:20 left, loss=0.1234"]
    clock.now += 30.0
    bar.update(88)
    bar.close()
    bar.close()
    assert len(said) == 2
    assert said[1] == "job: 100/100 step (100%), 1.11 step/s, took 0:01:30, loss=0.1234"


def test_resumed_count_rates_only_the_work_of_this_run():
    bar, said, clock = _lines(total=1000, initial=900)
    clock.now += 10.0
    bar.update(50)
    bar.close()
    assert said == ["job: 950/1000 step (95%), 5 step/s, 0:00:10 left"]


def test_no_last_line_without_new_work_and_messages_always_pass():
    bar, said, clock = _lines()
    clock.now += 61.0
    bar.update(5)
    bar.write("validation PSNR 25 dB")
    bar.close()
    assert said[1] == "validation PSNR 25 dB" and len(said) == 2  # 5/100 was shown already

    off = Progress(10, desc="job", unit="img", enabled=False, say=said.append)
    assert off.mode == "off"
    off.update(10)
    off.write("error: x.png unreadable; skipped")
    off.close()
    assert said[-1] == "error: x.png unreadable; skipped" and len(said) == 3


def test_terminal_gets_a_tqdm_bar_and_never_the_plain_lines():
    term, said = Terminal(), []
    bar = Progress(4, desc="job", unit="img", stream=term, say=said.append, interval=0.0)
    assert bar.mode == "bar"
    bar.update(4)
    bar.write("a message")
    bar.close()
    out = term.getvalue()
    assert "job" in out and "4/4" in out and "a message" in out
    assert said == []


def test_default_say_prints_to_the_stream():
    stream = io.StringIO()
    bar = Progress(2, desc="pconv-inpaint", unit="img", stream=stream)
    bar.update(2)
    bar.close()
    assert stream.getvalue().startswith("pconv-inpaint: 2/2 img (100%)")
    assert "\r" not in stream.getvalue()
