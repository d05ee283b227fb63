"""Progress of long jobs (training, evaluation, inpainting folders).

On a terminal: a tqdm bar. Anywhere else (a log file, a batch system's output, a pipe):
one plain line a minute and one at the end, since a bar's carriage returns would pile up
in the file, hundreds of kilobytes an hour, as one unreadable line. Disabled: nothing but
the messages passed to :meth:`Progress.write`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LINE_INTERVAL_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts work done out of ``total`` units (``unit``: "step", "img") from ``initial``.

    ``say`` prints one message line (default: to ``stream``, standard error when None);
    the trainer passes its logger. :meth:`write` prints a message in every mode, above the
    bar on a terminal. ``interval`` is the time between plain lines, ``clock`` their clock.
    """

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0,
                 enabled: bool = True, say: Callable[[str], None] | None = None,
                 stream: TextIO | None = None, interval: float = LINE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = self._shown = initial
        self._stream = stream if stream is not None else sys.stderr
        self._say = say if say is not None else self._print
        self._interval, self._clock = interval, clock
        self._began = self._last_line = clock()
        self._postfix: dict[str, object] = {}
        self._closed = False
        self._bar = None
        self.mode = "off"
        if enabled:
            self.mode = "lines"
            if getattr(self._stream, "isatty", lambda: False)():
                try:
                    from tqdm import tqdm
                except ImportError:  # tqdm is in the train and apps extras
                    tqdm = None
                if tqdm is not None:
                    self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                                     file=self._stream, dynamic_ncols=True)
                    self.mode = "bar"

    def _print(self, message: str) -> None:
        print(message, file=self._stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self._clock() - self._last_line >= self._interval:
            self._line()

    def set_postfix(self, **values) -> None:
        """Values shown after the count (the bar's postfix, the end of each plain line)."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            self._say(message)

    def line(self) -> str:
        """The plain progress line for the count so far."""
        elapsed = max(self._clock() - self._began, 1e-9)
        done = self.n - self._start
        rate = done / elapsed
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total > 0:
            text += f" ({100.0 * self.n / self.total:.0f}%)"
        text += f", {rate:.3g} {self.unit}/s"
        if done > 0 and self.n < self.total:
            text += f", {_duration((self.total - self.n) / rate)} left"
        elif self.n >= self.total:
            text += f", took {_duration(elapsed)}"
        if self._postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self._postfix.items())
        return text

    def _line(self) -> None:
        self._say(self.line())
        self._last_line, self._shown = self._clock(), self.n

    def close(self) -> None:
        """Ends the bar, or prints the last plain line when work was done since one."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.n != self._shown:
            self._line()
