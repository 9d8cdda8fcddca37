"""What a precompute run did: `PrecomputeSummary`, merged over ranks, and its one-line report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrecomputeSummary:
    """What one run did. Counts are over this shard's examples."""

    examples: int = 0  # valid examples of this shard
    computed: int = 0  # examples computed by this run (stale ones included)
    skipped: int = 0  # already in the store with the same token hash
    stale: int = 0  # in the store with another token hash: rows dropped, recomputed
    non_finite: int = 0  # in the store with NaN/inf in their values: rows dropped, recomputed
    responses_repaired: int = 0  # responses of stored examples whose post-only rows were non-finite or missing
    reference_reset: bool = False  # the store held another reference: every part dropped
    response_tokens: int = 0  # response steps computed
    responses_computed: int = 0  # distinct responses whose post-only targets were computed
    bytes_written: int = 0
    parts_written: int = 0
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)  # invalid rows / unencodable examples skipped
    computed_per_rank: list[int] = field(default_factory=list)  # merged runs: `computed` of each rank

    @classmethod
    def merge(cls, summaries: list[PrecomputeSummary]) -> PrecomputeSummary:
        """The summary of a multi-rank run: counts summed, the slowest rank's time."""
        merged = cls(
            reference_reset=any(s.reference_reset for s in summaries),
            seconds=max(s.seconds for s in summaries),
            dropped=[line for s in summaries for line in s.dropped],
            computed_per_rank=[s.computed for s in summaries],
        )
        for name in ("examples", "computed", "skipped", "stale", "non_finite", "responses_repaired",
                     "response_tokens", "responses_computed", "bytes_written", "parts_written"):  # fmt: skip
            setattr(merged, name, sum(getattr(s, name) for s in summaries))
        return merged

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.seconds if self.seconds > 0 else float("nan")
        stale = f", {self.stale} stale recomputed" if self.stale else ""
        if self.non_finite:
            stale += f", {self.non_finite} recomputed (non-finite)"
        if self.responses_repaired:
            plural = "s" if self.responses_repaired != 1 else ""
            stale += f", {self.responses_repaired} post-only response{plural} recomputed (non-finite or missing)"
        dropped = f", {len(self.dropped)} invalid dropped" if self.dropped else ""
        ranks = (
            f" ({len(self.computed_per_rank)} ranks, computed per rank: {' + '.join(map(str, self.computed_per_rank))})"
            if len(self.computed_per_rank) > 1
            else ""
        )
        return (
            f"precompute{ranks}: {self.computed} examples computed, {self.skipped} skipped (up to date){stale}{dropped}; "
            f"{self.response_tokens} response tokens, {self.responses_computed} distinct responses; "
            f"{_human_bytes(self.bytes_written)} written in {self.parts_written} part{'s' if self.parts_written != 1 else ''}; "
            f"{self.seconds:.1f} s ({self.computed / rate:.1f} examples/s, {self.response_tokens / rate:.0f} tokens/s)"
        )


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
