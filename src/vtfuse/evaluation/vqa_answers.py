"""VQAv2's official answer normalisation and soft accuracy (Antol et al. 2015; Goyal et al.
2017), as the VQA evaluation server computes them.

An answer is normalised by: punctuation removed (a mark next to a space, or any mark in an
answer with a digit-comma like "1,000", is deleted; elsewhere it becomes a space; a period
before a digit stays), lower case, number words → digits ("two" → "2"), articles dropped
("a", "an", "the"), apostrophe-less contractions restored ("dont" → "don't").

Accuracy of a prediction against the 10 human answers: for each human, min(1, #others among
the remaining 9 who gave the prediction / 3); averaged over the 10 (the 10-choose-9 subsets).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the official marks; the apostrophe stays
# A period goes unless a digit follows ("2.5" stays). The official pattern, "(?!<=\d)(\.)(?!\d)",
# means to protect a preceding digit too but, a typo for a lookbehind, does not: neither do we.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {
    word: str(n)
    for n, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
} | {"none": "0"}
ARTICLES = {"a", "an", "the"}

# Contractions the annotators often typed without an apostrophe; each maps back from every
# way of dropping its apostrophes. Words that also exist without one (were, well, its, ...)
# are not rewritten.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've
isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't
not've o'clock oughtn't shan't she'd she'd've she'll she's should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll something's that's there'd there'd've there're
there's they'd they'd've they'll they're they've wasn't we'd've we're we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd
you'd've you'll you're you've""".split()  # noqa: SIM905 (a word list reads best as words)
_REAL_WORDS = {"were", "well", "hell", "shell", "ill", "its", "wed", "id", "whore", "cant"}


def _apostrophe_drops(word: str) -> set[str]:
    """Every spelling of `word` with some of its apostrophes left out (not the word itself)."""
    spellings = {""}
    for part in word.split("'")[:-1]:
        spellings = {s + part + sep for s in spellings for sep in ("'", "")}
    last = word.split("'")[-1]
    return {s + last for s in spellings} - {word}


CONTRACTIONS = {
    spelling: word
    for word in _CONTRACTIONS
    for spelling in _apostrophe_drops(word)
    if spelling not in _REAL_WORDS
} | {"cant": "can't"}  # "cant" the noun is rarer in answers than "can't"


def normalise_vqa_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    strip_all = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if strip_all or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_score(prediction: str, human_answers: Sequence[str]) -> float:
    """min(1, matches among the other humans / 3), averaged over leaving each human out."""
    predicted = normalise_vqa_answer(prediction)
    humans = [normalise_vqa_answer(a) for a in human_answers]
    if not humans:
        raise ValueError("a VQA soft score needs the human answers")
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3))
    return sum(scores) / len(scores)
