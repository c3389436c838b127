"""New tokens to text deltas: incremental detokenization and stop strings."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a token ending mid-character decodes to


class TextStream:
    """Text of the generated tokens, released as it becomes final.

    Each delta is the text that decoding a few tokens of context plus the new ones adds to decoding
    the context alone (as vLLM and TGI do), so a word-piece's leading space survives and decoding
    stays linear in length; a delta ending mid-character waits for the next token. Text that could
    be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the decoded context
        self.text = ""  # all text so far
        self.sent = 0  # characters of `text` released
        self.stopped = False

    def push(self, token: int) -> str:
        """The text now final after `token` (empty while undecided); sets `stopped` on a stop string."""
        self.ids.append(token)
        context = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(context) and not full.endswith(REPLACEMENT):
            self.text += full[len(context) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is left, once no token follows."""
        if not self.stopped:
            context = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(context) :]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = len(self.text)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            cut, self.stopped = min(hits), True
            self.text = self.text[:cut]
        elif not final and self.stop:
            cut = max(self.sent, cut - max(len(s) for s in self.stop) + 1)
        delta, self.sent = self.text[self.sent : cut], cut
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
