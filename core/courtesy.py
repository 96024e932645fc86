"""Fixed, safe replies for messages that are not questions: praise, greetings and
closings, complaints with no question, and unclear messages.

The caller decides the act (a classifier does that); this module only words the reply.
Nothing here is generated, so nothing can promise what a person would have to keep: no
refunds, credits or upgrades, no facts about the case. The one part taken from the
customer is a short span naming what went wrong, turned to the second person, with
swearing dropped, so an apology sounds like it was listening.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from core.escalation import contains_profanity

HELP_OFFER = "Is there anything else I can help you with?"
GREETING = "Hi! What can I help you with today?"
REPLY_TO_OTHER = "Sorry, I'm not sure I understood. What can I help you with today?"
GENERIC_APOLOGY = "I'm sorry about your experience."

_PROMISES = re.compile(
    r"\b(?:refund\w*|upgrad\w*|credit\w*|compensat\w*|vouchers?|free|reimburs\w*|discount\w*)\b",
    re.IGNORECASE,
)
"""Words no courtesy reply may contain: each reads as an offer a person must honour."""

_LINK = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"(?<!\w)@\w+")

_STAFF = re.compile(
    r"\b(?:crew|staff|team|agents?|pilots?|attendants?|employees?|cashiers?|tellers?|people"
    r"|folks|guys|gate|desk|captain|driver|rep|representative|advisor|she|he)\b",
    re.IGNORECASE,
)
_THANKS = re.compile(r"\b(?:thanks?|thank\s+you|thx|ty|cheers|appreciate\w*)\b", re.IGNORECASE)
_CLOSING = re.compile(
    r"\b(?:bye|goodbye|good\s+bye|cya|see\s+(?:you|ya)|that'?s\s+(?:all|it)|that\s+is\s+all"
    r"|nothing\s+else|no\s+more\s+questions|have\s+a\s+(?:good|great|nice)\s+\w+|take\s+care"
    r"|all\s+(?:good|set|sorted)|good\s*night|later)\b",
    re.IGNORECASE,
)
_BARE_THANKS = re.compile(r"^\W*(?:ok(?:ay)?|great|perfect|cool|alright)?\W*(?:thanks?|thank\s+you"
                          r"|thx|ty|cheers)(?:\s+(?:so\s+much|a\s+lot|again))?\W*$", re.IGNORECASE)

_PRAISE_STAFF = (
    "Thank you so much for the kind words about our team!",
    "That's lovely to hear, thank you for taking the time to say it about our team!",
    "Thank you! Kind words like these about our team are always welcome.",
)
_PRAISE_SERVICE = (
    "Thank you, we're really glad to hear that!",
    "That's great to hear, thank you for letting us know!",
    "Thank you for the kind words, it's good to hear that!",
)
_THANKED = (
    "You're very welcome!",
    "You're welcome, happy to help!",
    "My pleasure!",
)
_GOODBYES = (
    "Thanks for getting in touch. Have a great day!",
    "You're welcome. Take care, and have a good day!",
    "Thanks for chatting with us. Goodbye!",
)
_SORRY = ("I'm sorry that {span}.", "I'm really sorry that {span}.", "Sorry to hear that {span}.")
_SORRY_ABOUT = ("I'm sorry about {span}.", "I'm really sorry about {span}.",
                "Sorry to hear about {span}.")
_OFFERS = (
    "If you'd like a person from our team to look into it, just say so and I'll pass this on.",
    "If you'd like, I can pass this on to a person from our team to look into.",
    "If you'd like someone from our team to look into it, just let me know and I'll pass it on.",
)

_PROBLEM = re.compile(
    r"\b(?:delay(?:ed|s)?|cancel+ed|cancel+ation|lost|losing|broken|broke|damaged|late|rude"
    r"|charged\s+(?:twice|double|two\s+times)|double[\s-]charged|overcharged|never\s+(?:arrived"
    r"|came|showed|got)|(?:has|have|hasn't|haven't|didn't|did\s+not|still\s+not)\s+(?:arrived|come)"
    r"|missing|stuck|stranded|waiting|waited|wait|on\s+hold|overbooked|bumped|missed"
    r"|not\s+working|doesn'?t\s+work|isn'?t\s+working|stopped\s+working|declined|locked\s+out"
    r"|wrong|dirty|cold|unhelpful|ignored|hung\s+up)\b",
    re.IGNORECASE,
)
_SUBJECT = frozenset({
    "my", "our", "i", "we", "i'm", "im", "i've", "ive", "we're", "we've", "the", "this", "his",
    "her", "their", "me", "us", "a", "an",
})
_DETERMINERS = frozenset({"my", "our", "the", "this", "his", "her", "their", "a", "an"})
_PARTICIPLES = frozenset({
    "delayed", "cancelled", "canceled", "lost", "broken", "damaged", "charged", "overcharged",
    "overbooked", "bumped", "stranded", "declined", "missed", "stuck", "ignored", "late",
})
_AUXILIARIES = frozenset({
    "is", "was", "were", "are", "has", "have", "had", "got", "been", "being", "get", "gets",
    "never", "still", "keeps", "kept", "just",
})
_TRAILING = frozenset({
    "for", "the", "a", "an", "to", "and", "of", "at", "with", "on", "in", "by", "from", "but",
    "so", "or", "because", "that", "which", "who", "your", "my", "our", "this", "is", "was",
    "again", "lol", "smh", "ugh", "now", "like", "w", "w/",
})
_PERSON = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
    "i'm": "you're", "im": "you're", "i've": "you've", "ive": "you've", "i'd": "you'd",
    "i'll": "you'll", "we": "you", "us": "you", "our": "your", "ours": "yours",
    "ourselves": "yourselves", "we're": "you're", "we've": "you've", "we'd": "you'd",
    "we'll": "you'll", "am": "are",
}
_AT_COMPANY = frozenset({"you", "your", "u", "ur", "y'all", "yall", "you're", "youre", "yours"})
_COMPANY_DID = re.compile(
    r"\b(?:you|u|they|y'?all)\s+(?:guys\s+)?(?:have\s+|'ve\s+)?(lost|broke|damaged|cancel+ed"
    r"|delayed|misplaced|overbooked|bumped|charged)\s+(my|our)\s+((?:\w+\s+){0,2}?\w+)\b",
    re.IGNORECASE,
)
_CLAUSE = re.compile(r"[.!?;:\n()\"]+|,\s*|\s+-+\s+|\s+(?:but|because|although|though)\s+",
                     re.IGNORECASE)
_MAX_WORDS = 12
_PHRASE_STARTS = frozenset({
    "for", "to", "at", "in", "on", "with", "from", "by", "and", "but", "so", "because",
    "after", "before", "while", "when", "until", "since", "via", "then",
})
_DROPPABLE = re.compile(r"(?:ing|in'?|n'|damn|damned|bloody|crappy|shitty)\W*$", re.IGNORECASE)
"""Swear words that only intensify ("my fucking card"): dropped, the rest still reads."""


def _pick(options: Sequence[str], text: str, salt: str = "") -> str:
    """The same text gets the same variant on every run and host (``hash()`` is salted)."""
    return options[zlib.crc32(f"{salt}{text}".encode()) % len(options)]


def _clean(text: str) -> str:
    text = _MENTION.sub(" ", _LINK.sub(" ", text.replace("\u2019", "'")))
    text = re.sub(r"#(\w)", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _tokens(clause: str) -> list[str]:
    return [t for t in re.split(r"\s+", clause.strip()) if t]


def _plural(noun: str) -> bool:
    return noun.lower().endswith("s") and not noun.lower().endswith("ss")


def _second_person(words: list[str]) -> list[str]:
    """"my flight" -> "your flight", "I was" -> "you were", "we" -> "you"."""
    out: list[str] = []
    for i, word in enumerate(words):
        low = word.lower()
        if low == "was" and i and words[i - 1].lower() in ("i", "we"):
            out.append("were")
        else:
            out.append(_PERSON.get(low, low if low in ("i", "i'm") else word))
    return out


def _span_from_clause(clause: str) -> str | None:
    match = _PROBLEM.search(clause)
    if match is None:
        return None
    words = _tokens(clause)
    before = len(_tokens(clause[: match.start()]))
    near = [i for i in range(max(0, before - 7), before) if words[i].lower() in _SUBJECT]
    far = [i for i in range(before) if words[i].lower() in _DETERMINERS]
    if near:
        chosen = words[near[0]:]
    elif far:  # "my flight from A to B via C was delayed": keep "my flight ... was delayed"
        aux = [words[before - 1]] if words[before - 1].lower() in _AUXILIARIES else []
        chosen = [*words[far[0] : far[0] + 2], *aux, *words[before:]]
    elif words[before].lower() in ("rude", "unhelpful", "dirty", "cold", "broken", "wrong"):
        chosen = words[before:]  # "rude staff at the desk" -> "the rude staff at the desk"
    else:
        return None  # "delayed last minute": no subject to say it of, so say nothing of it
    swears = [w for w in chosen if contains_profanity(w)]
    if any(not _DROPPABLE.search(w) for w in swears):
        return None  # the swearing carries the sentence: skip it rather than mangle it
    kept = [w for w in chosen if w not in swears]
    kept = [w for w in kept if re.search(r"[\w$£€]", w)]
    kept = [re.sub(r"^\W+|[^\w%$£€']+$", "", w) for w in kept]
    if len(kept) > _MAX_WORDS:
        # Cut before the last phrase the limit would break ("... for the next flight to
        # get"), so the span still ends where a phrase of the customer's ends.
        kept = kept[:_MAX_WORDS]
        breaks = [i for i, w in enumerate(kept) if i >= 3 and w.lower() in _PHRASE_STARTS]
        kept = kept[: breaks[-1]] if breaks else kept
    promised = [i for i, w in enumerate(kept) if _PROMISES.fullmatch(w)]
    kept = kept[: promised[0]] if promised else kept
    kept = [w.lower() if i == 0 or (len(w) > 3 and w.isupper()) else w for i, w in enumerate(kept)]
    while kept and kept[-1].lower() in _TRAILING:
        kept.pop()
    at_company = [i for i, w in enumerate(kept) if w.lower() in _AT_COMPANY]
    kept = kept[: at_company[0]] if at_company else kept
    while kept and kept[-1].lower() in _TRAILING:
        kept.pop()
    if len(kept) < 2:
        return None
    if kept[0].lower() in ("rude", "unhelpful", "dirty", "long", "late", "cold", "broken", "wrong"):
        kept.insert(0, "the")
    if (len(kept) >= 3 and kept[0].lower() in _DETERMINERS and kept[1].lower() not in _AUXILIARIES
            and kept[2].lower() in _PARTICIPLES):
        kept.insert(2, "were" if _plural(kept[1]) else "was")
    return " ".join(_second_person(kept))


def _company_did(text: str) -> str | None:
    """"you lost my bag" -> "your bag being lost": what happened, without saying who."""
    match = _COMPANY_DID.search(text)
    if match is None:
        return None
    verb, owner, noun = match.group(1).lower(), match.group(2), match.group(3)
    if contains_profanity(noun):
        return None
    return f"{_PERSON[owner.lower()]} {noun} being {verb}"


def problem_span(text: str) -> str | None:
    """A short span, in the second person, naming what went wrong; None when nothing
    clear is found (or every candidate swears or mentions money back)."""
    clean = _clean(text)
    candidates = [_company_did(clean)]
    candidates += [_span_from_clause(c) for c in _CLAUSE.split(clean) if c and c.strip()]
    for span in candidates:
        if span and not _PROMISES.search(span) and not contains_profanity(span):
            return span
    return None


_SUBJECT_PRONOUNS = frozenset({"you", "you're", "you've", "you'd", "you'll"})


def _is_clause(span: str) -> bool:
    """"your flight was delayed" takes "sorry that"; "the rude staff" takes "sorry about"."""
    words = span.split()
    if "being" in words[1:] and words[0] not in _SUBJECT_PRONOUNS:
        return False  # "your bag being lost" names a thing: "sorry about", not "sorry that"
    return len(words) >= 2 and (
        words[0] in _SUBJECT_PRONOUNS
        or any(w in _AUXILIARIES or w.endswith("ed") or w in _PARTICIPLES for w in words[1:])
    ) and words[0] not in ("the", "a", "an")


def apologise(text: str) -> str:
    """An apology naming the problem in the customer's words, then a hand-off offer."""
    span = problem_span(text)
    if span is None:
        sorry = GENERIC_APOLOGY
    else:
        sorry = _pick(_SORRY if _is_clause(span) else _SORRY_ABOUT, text).format(span=span)
    return f"{sorry} {_pick(_OFFERS, text, 'offer')}"


def acknowledge_praise(text: str) -> str:
    """Thanks that fits what was praised: the people, the service, or plain thanks."""
    clean = _clean(text)
    if _BARE_THANKS.match(clean):
        opening = _pick(_THANKED, clean)
    elif _STAFF.search(clean):
        opening = _pick(_PRAISE_STAFF, clean)
    elif _THANKS.search(clean) and len(clean.split()) <= 6:
        opening = _pick(_THANKED, clean)
    else:
        opening = _pick(_PRAISE_SERVICE, clean)
    return f"{opening} {HELP_OFFER}"


_NOTED = (
    "Thank you for letting us know.",
    "Thanks for telling us about this.",
    "Thank you for taking the time to tell us.",
)


def acknowledge(text: str) -> str:
    """Thanks for the message that suits praise and criticism alike: for when the two
    signals disagree (praise that reads as negative, a "complaint" that reads as happy),
    where "lovely to hear!" or "sorry about your experience" could be the insult."""
    return f"{_pick(_NOTED, _clean(text))} {HELP_OFFER}"


def greet(text: str) -> str:
    """A goodbye for a closing ("ok bye", "that's all, thanks"), else the greeting."""
    if _CLOSING.search(_clean(text)) or _BARE_THANKS.match(_clean(text)):
        return _pick(_GOODBYES, text)
    return GREETING


_STATEMENT_WORDS = 5
_ASKS = re.compile(
    r"\b(?:please|pls|plz|need|want|would like|i'?d like|can you|could you|help|how|"
    r"trying to|tried to|can'?t|cannot|unable|let me know|change|cancel|refund|rebook|fix)\b",
    re.IGNORECASE)
"""Words of a request: a statement with them wants something done, and a thank-you would
read as if it were."""


def states_something(text: str) -> bool:
    """A statement with content and no ask ("had an idea for first class...", "boarding
    now, love flying with you"), which a person at the desk would thank for; a short or
    unclear message, or one with a question mark, is not."""
    clean = _clean(text)
    return ("?" not in clean and not _ASKS.search(clean)
            and len(re.findall(r"[^\W\d_]{2,}", clean)) >= _STATEMENT_WORDS)


def reply_to_other(text: str) -> str:
    """A message that is no question, praise, complaint or greeting: thanked when it
    :func:`states_something`, else :func:`clarify`'s question back."""
    return acknowledge(text) if states_something(text) else clarify(text)


def clarify(text: str) -> str:
    """An unclear message gets a question back rather than a guess; ``text`` is taken so
    every reply function has the same shape."""
    return REPLY_TO_OTHER


__all__ = [
    "GENERIC_APOLOGY",
    "GREETING",
    "HELP_OFFER",
    "REPLY_TO_OTHER",
    "acknowledge",
    "acknowledge_praise",
    "apologise",
    "clarify",
    "greet",
    "problem_span",
    "reply_to_other",
    "states_something",
]
