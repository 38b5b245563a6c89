"""Domain mixtures: which share of the tokens each domain gets (``mileloss data --domain-field F --mix M``).

A mix is a mapping domain -> weight, from a YAML or JSON file or a preset (``pile``: the Pile's 22 domains
with the MiLe paper's sampling weights, ``presets/pile.json``, its source recorded in the manifest). Weights
are non-negative and normalised to sum 1; weight 0 leaves a domain out on purpose.

Sampling scheme (deterministic for a seed, one streaming pass after a counting pass):

1. A counting pass tokenizes every document once and sums the tokens ``N_d`` of each domain ``d``
   (document tokens plus the end-of-document token, exactly as they will be written).
2. The target size is ``S = max_epochs * min_d N_d / w_d`` over the domains with ``w_d > 0``: the largest
   corpus in which no domain is repeated more than ``max_epochs`` times (default 1: every domain is
   down-sampled, none repeated; the domain that is scarcest relative to its weight is used entirely).
3. Domain ``d`` gets the rate ``r_d = w_d * S / N_d`` (its expected epochs; ``r_d <= max_epochs``).
4. Document ``i`` (its index in corpus order) of domain ``d`` is written ``floor(r_d) + [u(seed, i) <
   frac(r_d)]`` times, ``u`` a uniform number from a keyed hash (blake2b) of the seed and the index. So the
   expected tokens of ``d`` are ``r_d * N_d = w_d * S``: token shares follow the weights, up to the
   sampling noise of whole documents (relative standard deviation about ``sqrt((1 - f) / (f n_d))`` for
   ``n_d`` similar documents kept at a rate ``f < 1``).

The train/val assignment is made once per kept source document, stratified by domain
(``writer.stratified_split``: ``val_fraction`` of each domain's kept documents), and every copy of a document
goes to that split: val never shares a document with train, and val keeps the per-domain shares of the mix
(for per-domain perplexity), up to document-length noise.

Mismatches: a domain found in the data but absent from the mix raises ``DomainMismatchError`` (a misspelt
name would otherwise drop a whole domain silently; give it weight 0 to drop it on purpose). A domain of the
mix absent from the data is logged as a warning, recorded in the manifest (``mix.missing_domains``), and the
remaining weights are renormalised: a sample of the Pile need not hold all 22 domains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mileloss.errors import DomainMismatchError, MixtureError

logger = logging.getLogger(__name__)

PRESETS = ("pile",)
SCHEME = "per-document copies floor(r_d) + Bernoulli(frac(r_d)), r_d = w_d * S / N_d, S = max_epochs * min N_d / w_d"


@dataclass(frozen=True)
class Mixture:
    """Normalised domain weights, where they came from, and the domain field a preset implies."""

    weights: dict[str, float]
    source: str
    domain_field: str | None = None
    raw_weights: dict[str, float] = field(default_factory=dict)


def load_mix(spec: str | Path | Mapping[str, float]) -> Mixture:
    """A ``Mixture`` from a preset name (``pile``), a ``.json``/``.yaml``/``.yml`` file, or a mapping.

    Raises:
        MixtureError: unknown preset, unreadable file, not a mapping of names to non-negative finite numbers,
            or no positive weight.
    """
    if isinstance(spec, Mapping):
        return _mixture(dict(spec), "mapping", None, "the mix")
    spec_text = str(spec)
    if spec_text in PRESETS:
        data = json.loads(resources.files("mileloss.data.presets").joinpath(f"{spec_text}.json").read_text())
        return _mixture(data["weights"], f"preset {spec_text}: {data['source']}", data.get("domain_field"), spec_text)
    path = Path(spec_text).expanduser()
    if not path.is_file():
        raise MixtureError(f"--mix {spec_text!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as error:  # UnicodeDecodeError and JSONDecodeError: ValueErrors
        raise MixtureError(f"--mix {path}: cannot read it as {path.suffix.lstrip('.') or 'JSON'} ({error})") from error
    return _mixture(data, str(path), None, str(path))


def _mixture(data, source: str, domain_field: str | None, where: str) -> Mixture:
    if not isinstance(data, dict) or not data:
        raise MixtureError(f"{where}: expected a non-empty mapping of domain -> weight, got {type(data).__name__}")
    raw = {}
    for name, weight in data.items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, int | float):
            raise MixtureError(f"{where}: entry {name!r}: {weight!r} is not a number")
        if not math.isfinite(weight) or weight < 0:
            raise MixtureError(f"{where}: weight of {name!r} is {weight}; weights must be finite and >= 0")
        raw[name] = float(weight)
    total = sum(raw.values())
    if total <= 0:
        raise MixtureError(f"{where}: no domain has a positive weight")
    return Mixture({name: weight / total for name, weight in raw.items()}, source, domain_field, raw)


@dataclass(frozen=True)
class SamplingPlan:
    """Per-domain rates (expected copies of each document) computed from the per-domain token counts."""

    rates: dict[str, float]
    weights: dict[str, float]  # renormalised over the domains present
    source_tokens: dict[str, int]
    missing_domains: list[str]
    max_epochs: float
    seed: int

    def copies(self, index: int, domain: str | None) -> int:
        """How many times document ``index`` of ``domain`` is written (0: left out)."""
        rate = self.rates.get(domain, 0.0)
        whole = math.floor(rate)
        return whole + (mix_uniform(self.seed, index) < rate - whole)

    def to_json(self, mixture: Mixture, domain_field: str) -> dict:
        return {
            "source": mixture.source,
            "domain_field": domain_field,
            "scheme": SCHEME,
            "max_epochs": self.max_epochs,
            "weights": self.weights,
            "rates": self.rates,
            "source_tokens": self.source_tokens,
            "missing_domains": self.missing_domains,
        }


def mix_uniform(seed: int, index: int) -> float:
    """A uniform number in [0, 1) for document ``index``, keyed apart from the train/val hash."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, key=b"mileloss-mix").digest()
    return int.from_bytes(digest, "little") / 2**64


def plan_sampling(mixture: Mixture, source_tokens: Mapping[str, int], *, seed: int, max_epochs: float = 1.0):
    """The ``SamplingPlan`` for a corpus with ``source_tokens[d]`` tokens in domain ``d`` (see the module doc).

    Raises:
        DomainMismatchError: a domain with tokens is not named by the mix.
        MixtureError: ``max_epochs`` is not positive, or no domain with a positive weight has any token.
    """
    if not (math.isfinite(max_epochs) and max_epochs > 0):
        raise MixtureError(f"--max-epochs must be a positive number, got {max_epochs}")
    unknown = sorted(domain for domain, tokens in source_tokens.items() if tokens and domain not in mixture.weights)
    if unknown:
        raise DomainMismatchError(
            f"the corpus holds domain(s) {unknown} that the mix ({mixture.source[:80]}) does not name; "
            "give each a weight (0 leaves it out)"
        )
    missing = sorted(d for d, weight in mixture.weights.items() if weight > 0 and not source_tokens.get(d))
    if missing:
        logger.warning("the mix names domain(s) absent from the corpus; renormalising without them: %s", missing)
    present = {d: w for d, w in mixture.weights.items() if w > 0 and source_tokens.get(d)}
    if not present:
        raise MixtureError("no domain with a positive weight in the mix has any text in the corpus")
    total = sum(present.values())
    weights = {d: w / total for d, w in sorted(present.items())}
    size = max_epochs * min(source_tokens[d] / w for d, w in weights.items())
    rates = {d: min(max_epochs, w * size / source_tokens[d]) for d, w in weights.items()}
    return SamplingPlan(rates, weights, {d: int(n) for d, n in sorted(source_tokens.items())}, missing,
                        float(max_epochs), seed)


def count_domain_tokens(documents: Iterable, encode_pieces, specials_per_document: int = 1) -> dict[str, int]:
    """Tokens per domain (each document's tokens + the special tokens written around it), streaming.

    ``encode_pieces(list_of_texts)`` returns one token-id array per text; ``specials_per_document`` is
    ``len(document_start) + len(document_end)`` (1: just the eos).
    """
    from mileloss.data.writer import BATCH_CHARS

    counts: dict[str, int] = {}
    pending: list[tuple[str, str]] = []
    pending_chars = 0

    def flush():
        for (domain, _), ids in zip(pending, encode_pieces([text for _, text in pending]), strict=True):
            counts[domain] = counts.get(domain, 0) + len(ids)
        pending.clear()

    for document in documents:
        counts[document.domain] = counts.get(document.domain, 0) + specials_per_document
        for piece in document.chunks():
            pending.append((document.domain, piece))
            pending_chars += len(piece)
            if pending_chars >= BATCH_CHARS:
                flush()
                pending_chars = 0
    flush()
    return counts
