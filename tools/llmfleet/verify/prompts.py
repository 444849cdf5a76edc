"""Prompts of an exact token count, built by asking the server's tokenizer (``/tokenize``).

A prompt is ``"<seed>: "`` followed by common English words (nearly always one token each with
a leading space); the seed makes every load prompt differ from its first block, so prefix
caching cannot flatter the figures. The number of words is found by galloping then bisecting on
the count, then the last word is swapped until the count is exact. Every count is the server's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .errors import VerifyError

Counter = Callable[[str], Awaitable[int]]

WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
)
_STRIDE = 7  # coprime with len(WORDS): each seed walks the list in another order
MAX_COUNTS = 64  # /tokenize calls one prompt may take before giving up


def _words(seed: int, start: int, k: int) -> str:
    n = len(WORDS)
    return "".join(" " + WORDS[(seed + j * _STRIDE) % n] for j in range(start, start + k))


class PromptBuilder:
    """Builds prompts of exactly ``n`` tokens; remembers word counts to need ~1 count per prompt."""

    def __init__(self, count: Counter) -> None:
        self._count = count
        self._guess: dict[int, int] = {}  # n → words that last gave n tokens
        self.calls = 0  # /tokenize calls, all builds together

    async def build(self, n: int, seed: int = 0, count_with: Counter | None = None) -> str:
        """A prompt of exactly ``n`` tokens as the server counts them (special tokens included).

        ``count_with`` replaces the builder's counter for this build (e.g. another connection).
        """
        counter = count_with or self._count
        if n < 1:
            raise VerifyError(f"cannot build a prompt of {n} tokens")
        used = 0  # this build's calls (builds may run concurrently)

        async def count_text(t: str) -> int:
            nonlocal used
            if used >= MAX_COUNTS:
                raise VerifyError(f"could not build a prompt of exactly {n} tokens in {MAX_COUNTS} /tokenize calls")
            used += 1
            self.calls += 1
            return await counter(t)

        head = f"{seed}:"
        base = await count_text(head)
        if base > n:  # a tiny n: drop the seed
            head = ""
            base = await count_text(head)
            if base > n:
                raise VerifyError(f"cannot build a prompt of {n} tokens: the empty prompt already counts {base}")

        cache: dict[int, int] = {0: base}

        def text(k: int) -> str:
            return head + _words(seed, 0, k)

        async def count(k: int) -> int:
            if k not in cache:
                cache[k] = await count_text(text(k))
            return cache[k]

        k = self._guess.get(n, max(0, n - base))
        c = await count(k)
        # bracket: lo with count(lo) <= n, hi with count(hi) > n (hi None: not found yet)
        lo: int | None = None
        hi: int | None = None
        if c <= n:
            lo = k
            while c < n:
                step = max(1, n - c)
                nxt = lo + step
                c = await count(nxt)
                if c <= n:
                    lo = nxt
                else:
                    hi = nxt
                    break
        else:
            hi = k
            lo = 0
            while True:
                step = max(1, c - n)
                nxt = max(0, hi - step)
                c = await count(nxt)
                if c > n:
                    hi = nxt
                    if nxt == 0:
                        break
                else:
                    lo = nxt
                    break
        assert lo is not None
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if await count(mid) <= n:
                    lo = mid
                else:
                    hi = mid
        if cache[lo] == n:
            self._guess[n] = lo
            return text(lo)
        # count(lo) < n < count(lo + 1): the next word takes several tokens; try other last words
        prefix = text(lo)
        for word in WORDS:
            if await count_text(prefix + " " + word) == n:
                self._guess[n] = lo + 1
                return prefix + " " + word
        raise VerifyError(f"could not build a prompt of exactly {n} tokens with this tokenizer (closest: {cache[lo]})")
