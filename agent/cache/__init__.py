"""Input-locality cache: reuse model outputs for repeated or nearly repeated inputs, with a measured bound.

Three layers (see ``docs/cache.md``):

1. **Exact**: key = xxh3-64 of the input bytes *after* conversion to the model's input dtype,
   seeded with the model's sha256, so two float frames that quantize to the same tensor share an
   entry and two models never do. LRU, bounded in bytes.
2. **Near duplicate**: a cheap signature of the input (strided subsample, coarsely quantized to
   256 levels over the input's value range) is compared with the signature of the *last input that
   was actually computed* (the reference; never the previous input, so small drifts cannot pile
   up). The distance is divided by the reference's *margin* (classifiers: top-1 minus top-2 score;
   other models: the input distance at which the outputs move by a whole tolerance, a running
   mean over the computed pairs), giving a *score*: confident answers get small scores, fragile
   ones large or infinite. Reuse happens only below the score limit that the evidence supports, within
   ``near_threshold`` (a ceiling), 3x the mean distance of agreeing verdicts (the envelope),
   ``max_age_s`` and ``max_consecutive``. A manifest's ``output_roles`` make the verdict judge a
   detector on its detections (scores after their activation, boxes only where one is detected).
3. **Evidence**: every computed frame that had a reference is a free verdict (would reusing the
   reference have changed the answer?), and a share of near hits is recomputed on purpose (more
   where a cell's evidence is thin). Verdicts are counted per cell of (context, score band); the
   context is how many recent verdicts disagreed at or near that score, so a scene whose answers
   flicker is not judged on the evidence of a calm one at the same scores. Disagreement only grows
   with the score and the context, so a cell is bounded by the verdicts at and above it: a
   one-sided Clopper-Pearson upper bound (at ``confidence``) under ``target_disagreement`` lets it
   be reused freely; under 4x the target, on a budget that keeps the expected disagreement over
   all answers under the target. Every reuse stays charged at its cell's *current* bound, and the
   reported upper bound is the Poisson quantile of that expected count: a bound on how many
   reused answers really differed, not only on how many were expected to. No evidence, no reuse.

All state sits behind one lock: callers on several threads share one cache.

Modules: :mod:`~agent.cache.core` (the cache and its decision), :mod:`~agent.cache.evidence` (verdict
counts per cell, the bounds they allow, the file carried across restarts),
:mod:`~agent.cache.bounds` (the confidence bounds), :mod:`~agent.cache.signature` (an input's
signature and distance), :mod:`~agent.cache.judges` (whether two answers are the same).
"""

from agent.cache.bounds import binomial_upper, poisson_quantile
from agent.cache.core import CacheSpec, InferenceCache, Lookup, resolve_cache
from agent.cache.evidence import (
           EVIDENCE_FORMAT,
           EVIDENCE_MAX_BYTES,
           EvidenceError,
           EvidenceMismatch,
           parse_evidence,
)
from agent.cache.judges import OutputJudge, output_change, output_judges, output_ranges, output_tolerances
from agent.cache.signature import input_signature, signature_distance

__all__ = ["EVIDENCE_FORMAT", "EVIDENCE_MAX_BYTES", "CacheSpec", "EvidenceError", "EvidenceMismatch",
           "InferenceCache", "Lookup", "OutputJudge", "binomial_upper", "input_signature", "output_change",
           "output_judges", "output_ranges", "output_tolerances", "parse_evidence", "poisson_quantile",
           "resolve_cache", "signature_distance"]
