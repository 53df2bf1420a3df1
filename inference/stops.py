"""Stop strings in streamed text (vLLM keeps its stop checker apart too).

Plain Python, no llama.cpp: one matcher per sequence, fed the text of each new
token as it is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in streamed text, holding back what might begin one.

    A stop string may span several tokens, so text that ends with the start of
    a stop string is kept until the next token shows whether the stop follows.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return what is safe to emit and whether a stop was found.

        After a stop, the text before it is returned and nothing after it.
        """
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:length]):
                    hold = length
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self, text: str) -> str:
        """The text held back, with ``text`` after it, once the stream ends."""
        out, self.pending = self.pending + text, ""
        return out
