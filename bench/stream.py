"""What one streamed reply looked like from the caller's side."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trace:
    started: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.started if self.token_times else float("nan")

    @property
    def end(self) -> float:
        return self.token_times[-1] if self.token_times else self.started

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]
