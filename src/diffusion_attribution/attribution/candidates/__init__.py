"""Per-query candidate shortlists for the unlearning attributor (`method/candidates=...`)."""

from diffusion_attribution.attribution.candidates.base import (
    CandidateError,
    CandidateRanker,
    check_k_form,
    resolve_k,
    top_ids,
)
from diffusion_attribution.attribution.candidates.rankers import (
    AllExamples,
    CaptionRanker,
    FeatureRanker,
    ScoresRanker,
    UnionRanker,
)

__all__ = [
    "AllExamples",
    "CandidateError",
    "CandidateRanker",
    "CaptionRanker",
    "FeatureRanker",
    "ScoresRanker",
    "UnionRanker",
    "check_k_form",
    "resolve_k",
    "top_ids",
]
