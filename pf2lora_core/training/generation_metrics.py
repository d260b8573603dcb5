"""Generation metrics: corpus BLEU, ROUGE-L, METEOR (all 0-100) and perplexity.

Every hypothesis is scored against all references of its prompt (E2E and WebNLG have several
per input; so do Rotten Tomatoes prompts, one per snippet of the same movie and verdict):

- BLEU: sacrebleu's corpus BLEU (13a tokenization, brevity penalty over the corpus), the
  E2E / GEM convention. Prompts with fewer references are padded with ``None`` (sacrebleu skips it).
- ROUGE-L: F1 of the longest common subsequence (rouge-score, Porter stemming), the best
  reference per hypothesis, averaged over hypotheses.
- METEOR: nltk's ``meteor_score`` (exact, stem and WordNet-synonym matches; alpha 0.9, beta 3,
  gamma 0.5) against all references (best one), averaged over hypotheses. WordNet is read from
  a local copy: nltk's own data if present, else Debian's ``wordnet-base`` (``/usr/share/wordnet``).
- perplexity: ``exp(sum of target-token NLL / number of target tokens)`` (``perplexity``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pf2lora_core.config.keys import BLEU, METEOR, ROUGE_L

# Where Debian/Ubuntu's `wordnet-base` puts the WordNet 3.0 database; $PF2LORA_WORDNET overrides.
WORDNET_ENV = "PF2LORA_WORDNET"
DEBIAN_WORDNET = "/usr/share/wordnet"
WORDNET_HINT = (
    "METEOR needs the WordNet database: `apt-get install wordnet-base` (Debian/Ubuntu; `make install` "
    "does this where apt-get runs as root), or `python -m nltk.downloader wordnet`, or point "
    f"${WORDNET_ENV} at a WordNet 3.0 dict directory; or drop meteor from generation.metrics"
)
# WordNet 3.0's lexicographer files (lexnames(5WN)); nltk's reader needs this file, which Debian's
# package leaves out. Number = position; the syntactic category is 1 noun, 2 verb, 3 adj, 4 adv.
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_TOKEN = re.compile(r"\w+|[^\w\s]")


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp(nll_sum / tokens)``: the perplexity of held-out target tokens (NaN when there are none)."""
    return math.exp(nll_sum / tokens) if tokens > 0 else float("nan")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of each hypothesis against all of its references."""
    import sacrebleu

    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over hypotheses of the best ROUGE-L F1 against their references (0-100)."""
    from rouge_score import rouge_scorer

    from pf2lora_core.run.console import detach_absl_stream

    detach_absl_stream()  # rouge-score imported absl, whose handler would hold (and close) our stderr
    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(hypotheses, references, strict=True)
    scores = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in pairs]
    return 100.0 * sum(scores) / len(scores)


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over hypotheses of nltk's METEOR against all their references (0-100)."""
    from nltk.translate.meteor_score import meteor_score

    _check(hypotheses, references)
    if not hypotheses:
        return float("nan")
    wn = wordnet()
    scores = [
        meteor_score([tokenize(r) for r in refs], tokenize(hyp), wordnet=wn)
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    BLEU: bleu,
    ROUGE_L: rouge_l,
    METEOR: meteor,
}


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (METEOR's matching unit)."""
    return _TOKEN.findall(text.lower())


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"hypotheses {empty[:5]} have no reference")


@functools.lru_cache(maxsize=1)
def wordnet() -> Any:
    """nltk's WordNet reader over a local database, without any download (cached per process)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNet(WordNetCorpusReader):
        """WordNet without the Open Multilingual Wordnet mapping (Debian ships no index.sense)."""

        def map_wn(self, version: str = "wordnet") -> None:
            return None  # only multilingual (OMW) look-ups use the map; METEOR is English

    try:
        found = nltk.data.find("corpora/wordnet")
    except LookupError:
        source = Path(os.environ.get(WORDNET_ENV, DEBIAN_WORDNET))
        if not (source / "data.noun").is_file():
            raise RuntimeError(f"no WordNet database at {source}. {WORDNET_HINT}") from None
        root = _nltk_wordnet_dir(source)
        # nltk reads only below its data path: authorise our copy.
        if str(root.parent.parent) not in nltk.data.path:
            nltk.data.path.append(str(root.parent.parent))
        found = nltk.data.find("corpora/wordnet")
    has_sense_index = True
    try:
        found.join("index.sense")
    except OSError:
        has_sense_index = False
    return (WordNetCorpusReader if has_sense_index else LocalWordNet)(found, None)


def _nltk_wordnet_dir(source: Path) -> Path:
    """``<cache>/nltk_data/corpora/wordnet``: ``source``'s files plus the missing ``lexnames``."""
    from pf2lora_core.training.models import cache_root

    root = cache_root("") / "nltk_data" / "corpora" / "wordnet"
    if (root / "lexnames").is_file():
        return root
    tmp = root.with_name(f".wordnet-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():  # nltk refuses symlinks and hard links out of its root: a copy (28 MB)
            shutil.copy2(file, tmp / file.name)
    lines = [f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
    (tmp / "lexnames").write_text("\n".join(lines) + "\n")
    try:
        tmp.rename(root)  # atomic: concurrent processes never see half a directory
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root
