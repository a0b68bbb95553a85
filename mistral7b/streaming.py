"""Text-level stop strings for streamed output."""

from __future__ import annotations


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail that could start one,
    so nothing past a stop string is ever emitted."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add streamed text; return what is safe to show now (`stopped` tells when a stop matched)."""
        if self.stopped:
            return ""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out

    def flush(self) -> str:
        """The held-back tail, once the stream has ended without a stop."""
        out, self.buffer = self.buffer, ""
        return out
