"""When a conversation goes to a person, and why.

Signals, in order: an explicit request for a person (``/human`` or plain words); strong
signals that need a person at once, even on a first message (safety words, legal or
regulator threats, churn threats, abuse, one very negative message); a run of negative
messages (P(negative) above a threshold on N of the last W); a sustained
negative trend (an exponentially weighted average of P(negative)); the customer asking
the same thing again and again (the bot is not helping); and generation failures (the
pipeline reports those). Each decision carries its reason and the scores behind it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import EscalationSettings

REASON_REQUESTED = "customer_requested"
REASON_NEGATIVE = "negative_sentiment"
REASON_TREND = "negative_trend"
REASON_REPEATED = "repeated_question"
REASON_GENERATION = "generation_failed"
REASON_NO_ANSWER = "no_answer"
REASON_LANGUAGE = "other_language"
REASON_SAFETY = "safety"
SAFETY_MAX_POSITIVE = 0.9
"""P(positive) at which a safety word is read as gratitude for help already given."""
REASON_LEGAL = "legal_threat"
REASON_CHURN = "churn_threat"
REASON_PROFANITY = "profanity"
REASON_VERY_NEGATIVE = "very_negative"

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True, slots=True)
class Escalation:
    reason: str
    scores: dict[str, Any] = field(default_factory=dict)


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w*])(?:" + "|".join(alternatives) + r")(?![\w*])", re.IGNORECASE)


def _phrases(phrases: Sequence[str]) -> str | None:
    """Config phrases as one alternation of whole words, any run of spaces between them."""
    cleaned = sorted({p.strip().lower() for p in phrases if p.strip()}, key=len, reverse=True)
    return "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in cleaned) or None


_FUCK = (r"(?:mother|cluster)?f+[u*@#v]+[c*k]+k*(?:ing?|in'?|ed|er|ers|s|ery|en|face|wits?)?"
         r"|f\*+(?:ing?|in|ed|s)?|fu?c?kk?(?:ing?|in'?|ed|s)?|fkn|fcuk\w*|phuck\w*|eff(?:ing?|in'?)")
_SHIT = r"\w*(?:sh[i1!y*]+t|s\*+t|sh\*+)\w*|s\*{3}"
_SWEARS = (
    _FUCK, _SHIT, "wtf+", "stfu", "gtfo", "ffs", "omfg", "bs", "what the hell",
    "hell", r"god\s?damn\w*", "damn(?:ed|it|n)?", "dammit",
    r"crap(?:py|s)?", r"(?:dumb|jack|smart)?ass(?:es|holes?|hats?)?", "arse(?:holes?)?",
    r"bitch(?:es|ing|y)?", r"piss(?:ed|es|ing)?", "bastards?", r"dick(?:s|head)?",
    r"douche\w*", r"scumbags?",
)
_INSULTS = (
    r"suck(?:s|ed|y)?", r"screw\W+(?:you|u|y'?all|us|me|it|over|people|customers)",
    r"screw(?:s|ed|ing)\W+(?:you|u|y'?all|us|me|it|up|over|people|customers)",
    "screwed", r"ain'?t\s+shit", "racist", r"idiot(?:s|ic)?",
    r"moron(?:s|ic)?", "imbeciles?", r"incompeten(?:t|ce|cy)", "pathetic", "clowns?",
    r"(?:a|what\s+a|such\s+a|total|complete)\s+joke", "garbage", r"trash(?:y)?",
    "stupid", "dumb", "useless", "disgrace(?:ful)?", r"scam(?:mers?|s)?",
)
_TARGET = (r"you(?:'?re|'?ve|\s+guys|\s+people|\s+all)?|your|ur|u|y'?all|this\s+(?:company|airline"
           r"|bank|store|shop|place|service)|(?:the\s+)?(?:company|airline|bank|staff|crew|agents?"
           r"|employees?|customer\s+service|cs|support|management|pilots?|attendants?)")
_STRONG_NEGATIVE = _rx(
    *_INSULTS, r"wrong\s+with", "worst", "terrible", "horrible", "awful", "ridiculous", "rude",
    "unacceptable", "disgusting", r"hat(?:e|es|ed|ing)", r"frustrat\w*", r"delay(?:s|ed)?", "lost",
    r"cancel+(?:ed|ation)", "broken", "stuck", "missed", "mess", "racis[mt]", r"discriminat\w*",
    "angry", "mad", "furious",
    r"pissed", "upset", "livid", r"stress(?:ed|ful)", r"fed\s+up", "disappointed",
    "insult(?:ed|ing)",
    r"thanks\s+for\s+(?:nothing|ruining|screwing|losing|wasting|delaying|making\s+me|forcing|leaving)",
    r"no\s+help", "nightmare", "fail(?:ed|s|ure)?", "ruined", r"wtf+",
)
_WEAK_NEGATIVE = _rx(
    "late", "again", "waiting", r"wait(?:ed)?", r"hours?", "still", "never", "nobody", r"no\s+one",
    "seriously", "why", "error", r"charg(?:ed|ing)", r"refuse[ds]?", "nothing", r"can'?t",
    r"won'?t",
    r"didn'?t", r"doesn'?t", r"don'?t", r"isn'?t", r"wasn'?t", "not", r"\?!|!\?|!!",
)
_PRAISE_CUES = _rx(
    r"thanks?(?!\s+for\s+nothing)", r"thank\s+you", "thx", "ty", "awesome", "amazing", "great",
    "lov(?:e|ed|es|ing|ely)", "best", "kudos", r"shout\s*out", "appreciate[ds]?", "good", "nice",
    "wonderful",
    "excellent", "fantastic", "rock(?:s|ed)?", "fast", "quick", "helpful", "impressed", "perfect",
    "badass", "cool", "superb", "brilliant", "delighted", "happy", "props",
)
_DIRECT_ABUSE = (
    rf"(?:{_FUCK}|screw|damn|to\s+hell\s+with)\W+(?:you|u|y'?all|your|yourself|yourselves|this|off)\b",
    rf"(?:your|ur|you|u|their)\s+(?:{_FUCK}|{_SHIT}|damn|crappy|crap|bs|stupid|useless)",
    rf"(?:{_SHIT}|{_FUCK}|crappy|crap|bs|damn|garbage|trash|useless|pathetic|stupid)\s+(?:customer\s+)?"
    r"(?:service|care|support|airline|company|bank|staff|crew|employees?|agents?|attendants?|app"
    r"|website|site|management|people)",
    rf"(?:you|u|y'?all)\s+(?:guys\s+|people\s+|all\s+)?(?:are\s+|r\s+|'re\s+)?(?:such\s+|so\s+|a\s+bunch\s+of\s+|a\s+)?(?:{_FUCK}|{_SHIT}|{'|'.join(_SWEARS[2:])}|{'|'.join(_INSULTS)})",
    rf"(?:wtf|what\s+the\s+(?:{_FUCK}|hell|heck))\s+(?:is\s+)?wrong\s+with\s+(?:you|u|your|y'?all)",
    rf"(?:{_TARGET})\s+(?:really\s+|truly\s+|just\s+|totally\s+)?(?:is\s+|are\s+)?(?:{'|'.join(_INSULTS[:1])}|a\s+joke|garbage|trash|pathetic|useless|a\s+disgrace)",
)
_VERB = (r"(?:fly|flying|flown|book|booking|use|using|shop|shopping|bank|banking|buy|buying|order"
         r"|ordering|travel|travell?ing|choose|choosing|deal|dealing|spend|spending|recommend"
         r"|recommending|return)")
_US = r"(?:you|u|y'?all|your|this|@handle|{names})"
_CHURN = (
    r"switch(?:ing)?\s+(?:to\s+)?(?:a\s+|an\s+)?(?:another|other|different|new)?\s*"
    r"(?:airlines?|banks?|providers?|carriers?|companies|company|stores?|shops?|networks?|insurers?)",
    r"(?:switch(?:ing)?|mov(?:e|ing)|go(?:ing)?|time\s+to\s+switch)\s+(?:over\s+|back\s+)?"
    r"(?:to|2)\s+@handle",
    r"time\s+to\s+switch",
    r"(?:i'?d|i\s+would|we'?d)\s+rather\s+(?:fly|use|bank|shop|go)\b(?!\s+with\s+you)",
    r"should\s+have\s+(?:gone|flown|booked|stayed)\s+with\s+(?:@handle|another|a\s+different|other)",
    rf"(?:i'?m|i\s+am|we'?re|we\s+are|i'?ll\s+be|i\s+will\s+be)\s+leaving\s+{_US}",
    rf"(?:i'?m|i\s+am|we'?re|we\s+are|i'?ve|we'?ve|so)?\s*(?:\w+\s+)?done\s+with\s+{_US}",
    rf"(?:will|would|'ll|'d|going\s+to|gonna|i|we|shall|should)\s+never\s+(?:ever\s+)?(?:again\s+)?(?:be\s+)?"
    rf"{_VERB}\b(?:\s+(?:with|on|from|at|through))?(?:\s+{_US}\b|(?=\s*(?:[.!]|$)))",
    rf"never\s+(?:ever\s+)?{_VERB}\b(?!\s+(?:any\s+|an\s+)?other)(?:\s+\S+){{0,5}}?\s+again",
    rf"never\s+(?:ever\s+)?(?:fly|book|use)\w*\s+(?:with\s+|on\s+)?{_US}",
    rf"(?:don'?t|do\s+not|never)\s+(?:ever\s+)?(?:fly|book|use)\w*\s+(?:with\s+|on\s+)?{_US}",
    r"never\s*again",
    rf"(?:won'?t|will\s+not|wont|not\s+going\s+to|not\s+gonna|no\s+longer)\s+(?:be\s+)?(?:ever\s+)?"
    rf"(?:{_VERB}|a\s+customer|loyal|renew(?:ing)?)\b(?!\s+(?:any\s+|an\s+)?other)"
    r"(?:\s+\S+){0,5}?\s*(?:again|anymore|any\s+more|in\s+the\s+future|from\s+now\s+on|you|your|this|u)\b",
    rf"(?:still\s+)?not\s+(?:be\s+)?(?:flying|booking|using)\s+(?:with\s+)?{_US}(?:\s+\S+){{0,3}}?\s*(?:again|anymore|!)",
    rf"(?:stop|stopped|quit|quitting)\s+(?:flying|using|banking|shopping|booking|ordering|buying)\s+"
    rf"(?:with\s+|from\s+|at\s+|on\s+)?{_US}",
    r"(?:money|business|biz|custom)\s+(?:elsewhere|somewhere\s+else)",
    r"(?:take|taking|took)\s+(?:my|our)\s+(?:business|money|custom)\s+to",
    r"(?:lost|losing|lose)\s+(?:a|my|our|another|one|this)\s+(?:(?:loyal|long[\s-]?time|lifelong|valued)\s+)?"
    r"(?:customer|client|business|loyalty|flyer)",
    rf"(?:last|final)\s+time\s+(?:i|we)(?:'?ll|\s+will|\s+am|'?m|\s+ever)?\s*(?:ever\s+)?{_VERB}",
    rf"(?:last|final)\s+time\s+(?:i|we)(?:'?ll|\s+will|\s+am|'?m|\s+ever)?\s*(?:ever\s+)?"
    rf"(?:pick|select|choose)\w*\s+{_US}",
    rf"(?:last|final)\s+time\s+(?:ever\s+)?(?:flying|using|booking|shopping|banking|ordering|with\s+{_US})",
    r"boycott\w*", r"(?:with|to)\s+(?:a\s+|your\s+)?competitors?", r"your\s+competitors?",
    r"(?:booked|booking|book|flying|fly|went|going|shop|shopping|bank|banking)\s+elsewhere",
    rf"(?:breaking|broke|break)\s+up\s+with\s+{_US}",
    r"regret(?:ting|ted)?\s+(?:ever\s+)?(?:booking|flying|choosing|using|banking|shopping|ordering)",
    r"(?:last|final)\s+time\s+(?:on|with)\s+(?:a\s+|an\s+)?\S+(?:\s+\S+)?\s*(?:[.!]|$)",
    r"(?:choos(?:e|ing)|chose|try(?:ing)?|pick(?:ing)?|find(?:ing)?|book(?:ing)?\s+with|fly(?:ing)?\s+with"
    r"|go(?:ing)?\s+with)\s+(?:another|a\s+different|other|a\s+competing|a\s+new)\s+"
    r"(?:airlines?|banks?|providers?|carriers?|company|companies)",
    r"reasons?\s+(?:\S+\s+){0,6}?(?:to\s+)?(?:not|never)\s+(?:to\s+)?(?:fly|use|book|bank|shop)",
)
_ACCOUNT_CANCEL = (
    r"(?:cancel+(?:ing|ed)?|clos(?:e|ing)|terminat(?:e|ing)|end(?:ing)?)\s+(?:my|our|the)\s+"
    r"(?:account|subscription|membership|card|credit\s+card|contract|plan|policy|loyalty|miles\s+account)",
)
_LEGAL = (
    r"lawyers?", "attorneys?", r"law\s*suits?", r"legal\s+(?:action|team|counsel|advice)",
    r"small[\s-]+claims", r"class[\s-]+action", r"charge[\s-]?backs?",
    r"(?:see|take)\s+you\s+(?:to|in)\s+court",
    r"(?:to|will|'ll|gonna|going\s+to|should|could|i|we|and|then)\s+sue\b",
    r"su(?:ing|ed)\s+(?:you|your|the)",
    r"dispute\s+(?:the|this|these|my)\s+(?:charges?|transactions?|payments?)", "ombudsman",
    r"trading\s+standards", r"attorneys?\s+general", r"better\s+business\s+bureau",
    r"consumer\s+(?:protection|rights|affairs)", r"department\s+of\s+transportation",
    r"(?:report|reporting|reported|complain(?:t|ts|ing|ed)?|file|filing|filed|contact(?:ing|ed)?|writ(?:e|ing)|escalat(?:e|ing)|notify(?:ing)?|tell(?:ing)?)\b"
    r"(?:\s+\S+){0,5}?\s+(?:to|with)\s+(?:the\s+)?(?:faa|dot|bbb|ftc|cfpb|fca|caa|regulators?|authorities|ombudsman|attorney\s+general|consumer\s+\w+)",
    r"(?:faa|dot|bbb|ftc|cfpb|fca|caa)\s+(?:complaint|will|is\s+going|report)",
    r"(?:will|'ll|gonna|going\s+to)\s+(?:be\s+)?hearing\s+from\s+(?:me|us|my)",
)
_SAFETY = (
    "unsafe", "dangerous(?:ly)?", "danger", r"injur(?:y|ies|ed)", "hurt", r"bleed(?:ing)?",
    r"fire", r"(?:smoke|smoking)\s+(?:in|from|coming|filled|everywhere)", "smoke",
    r"burning\s+smell",
    r"smell\s+of\s+(?:burning|smoke|gas|fuel)", "fumes", r"gas\s+leak",
    r"(?:an?|is\s+an|medical|in\s+an)\s+emergency(?!\s+(?:exit|row|seat))",
    r"emergency\s+(?:landing|situation|stop|services|room|help|diversion|on\s+board)",
    r"threat(?:s|en|ened|ening)?", r"harass(?:ed|ing|ment)?", r"assault(?:ed)?", r"groped?",
    r"sexual(?:ly)?\s+(?:harass\w*|assault\w*|misconduct)", "violent", "violence", "weapons?",
    "guns?",
    "knife", "bomb", r"medical\s+(?:emergency|attention|help|assistance|issue|condition)",
    r"allergic\s+reaction", r"anaphyla\w*", r"epi\s*pen", r"chest\s+pains?", r"heart\s+attack",
    r"seizures?", "unconscious", "fainted", r"passed\s+out", r"can'?t\s+breathe?", r"in\s+pain",
    "ambulance", "paramedics?", r"(?:don'?t|didn'?t|do\s+not|did\s+not|never)\s+feel\s+safe",
    r"feel(?:s|ing)?\s+unsafe",
    r"stalk(?:ed|ing)", r"drunk\s+(?:passenger|pilot|man|woman|guy|driver)", r"carbon\s+monoxide",
)
_NEGATED = re.compile(
    r"(?:\b(?:no|not|nobody|no\s+one|none|never|without)|n't)\W+(?:\w+\W+){0,2}$", re.IGNORECASE
)
_NEGATABLE = frozenset({"hurt", "injured", "injury", "injuries", "dangerous", "danger", "unsafe"})


_PROFANITY = _rx(*_SWEARS, *_INSULTS)
_INTENSIFIERS = _rx(
    r"f\S*?(?:ing|in'?)", r"eff(?:ing|in'?)", r"(?:god\s?)?damn\w*", "hell",
    r"holy\s+(?:shit|crap|fuck|f\*+|sh\*t)", r"as\s+(?:fuck|f\*+|shit)", "af", r"freak(?:ing|in'?)",
    r"the\s+(?:actual\s+)?(?:fuck|f\*+|hell|heck)",
)


def contains_profanity(text: str) -> bool:
    """Swearing or abuse, obfuscations included (f*ck, sh1t, wtf): what a reply must not
    repeat back."""
    return bool(_PROFANITY.search(text.replace("\u2019", "'")))


def _complains(text: str) -> bool:
    """A negative construction: a strong complaint word, or a weak one with no praise."""
    return bool(_STRONG_NEGATIVE.search(text)
                or (_WEAK_NEGATIVE.search(text) and not _PRAISE_CUES.search(text)))


_LINK = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"@\w+")


def ewma(values: Sequence[float], alpha: float) -> float:
    average = values[0]
    for value in values[1:]:
        average = alpha * value + (1 - alpha) * average
    return average


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the words; cheap, and robust to reordering and punctuation."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)


def _compile(alternatives: Sequence[str], extra: Sequence[str]) -> re.Pattern[str]:
    added = _phrases(extra)
    return _rx(*alternatives, *((added,) if added else ()))


_SWEAR_TAG = re.compile(r"#(wtf+|fuck(?:ing|in)?|f+ck(?:ing)?|shit|bullshit)(?=[a-z])",
                        re.IGNORECASE)
"""A hashtag that opens with a swear word (#wtfisthis, #fuckthisairline): the word is
split off, so the rules read it as they would outside a hashtag."""


def _clean(text: str) -> str:
    """Links out, and handles as ``@handle`` (@fireflyair is not a fire, but "switching to
    @rival" is churn); curly apostrophes straightened, a swear word split off the hashtag
    it opens, '#' dropped so #neveragain reads."""
    text = _MENTION.sub(" @handle ", _LINK.sub(" ", text.replace("\u2019", "'")))
    text = _SWEAR_TAG.sub(r"\1 ", text)
    return re.sub(r"\s+", " ", text.replace("#", " ")).strip()


def _round(p: float | None) -> float | None:
    return None if p is None else round(p, 3)


class EscalationPolicy:
    """Stateless rules over the conversation so far; the store keeps the state."""

    __slots__ = (
        "_abuse", "_cancel", "_churn", "_human", "_legal", "_profanity", "_safety", "_settings",
        "_swears",
    )

    def __init__(self, settings: EscalationSettings) -> None:
        self._settings = settings
        phrases = sorted((p.strip().lower() for p in settings.human_phrases if p.strip()), key=len)
        alternatives = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in reversed(phrases))
        self._human = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if phrases else None
        self._safety = _compile(_SAFETY, settings.extra_safety_phrases)
        self._legal = _compile(_LEGAL, settings.extra_legal_phrases)
        us_names = _phrases(settings.company_names) or "@handle"
        self._churn = _compile(
            [c.replace("{names}", us_names) for c in _CHURN], settings.extra_churn_phrases
        )
        self._cancel = _rx(*_ACCOUNT_CANCEL)
        self._profanity = _compile((*_SWEARS, *_INSULTS), settings.extra_profanity)
        self._swears = _compile(_SWEARS, settings.extra_profanity)
        names = _phrases(settings.company_names)
        insults = "|".join(_INSULTS)
        self._abuse = _rx(*_DIRECT_ABUSE, *(
            (rf"(?:{names})\s+(?:\w+\s+)?(?:{insults})", rf"(?:{_FUCK}|screw)\s+(?:{names})")
            if names else ()
        ))

    def asks_for_human(self, text: str) -> bool:
        return bool(self._human and self._human.search(text))

    def strong_signal(
        self, text: str, p_negative: float | None = None, p_positive: float | None = None
    ) -> Escalation | None:
        """A message that needs a person now, whatever came before: safety first (any
        sentiment but plain gratitude), then legal or regulator threats, churn threats,
        abuse, and a single very negative message. Swearing and churn phrases are skipped
        when P(positive) is high or, with no scores, when the message praises and does not
        complain."""
        s = self._settings
        clean = _clean(text)
        evidence: dict[str, Any] = {"p_negative": _round(p_negative)}
        if p_positive is not None:
            evidence["p_positive"] = _round(p_positive)
        safety = self._first_unnegated(self._safety, clean)
        # A thank-you for help in an emergency that is over ("thank you for your
        # professionalism during my husband's medical emergency") needs no one urgently.
        grateful = p_positive is not None and p_positive >= SAFETY_MAX_POSITIVE
        if safety and not grateful:
            return Escalation(
                REASON_SAFETY, {"signal": REASON_SAFETY, "matched": safety, **evidence}
            )
        legal = self._legal.search(clean)
        if legal:
            return Escalation(
                REASON_LEGAL, {"signal": REASON_LEGAL, "matched": legal.group(0), **evidence}
            )
        positive = p_positive is not None and p_positive >= s.profanity_max_positive
        angry = p_negative is not None and p_negative >= s.profanity_min_negative
        complaint = _complains(clean)
        churn = self._churn.search(clean)
        if churn is None and (angry or complaint or self._profanity.search(clean)):
            churn = self._cancel.search(clean)
        unhappy = angry or bool(_STRONG_NEGATIVE.search(clean) or _WEAK_NEGATIVE.search(clean))
        if churn and not positive and (unhappy or not _PRAISE_CUES.search(clean)):
            return Escalation(
                REASON_CHURN, {"signal": REASON_CHURN, "matched": churn.group(0), **evidence}
            )
        swear = self._profanity.search(clean)
        if swear and not positive:
            abuse = self._abuse.search(clean)
            basis = ("sentiment" if angry else "aimed" if abuse
                     else "complaint" if self._swearing_complains(clean) else None)
            if basis:
                matched = (abuse or swear).group(0)
                return Escalation(REASON_PROFANITY, {
                    "signal": REASON_PROFANITY, "matched": matched, "basis": basis, **evidence,
                })
        if p_negative is not None and p_negative >= s.very_negative_threshold:
            return Escalation(REASON_VERY_NEGATIVE, {
                "signal": REASON_VERY_NEGATIVE, "threshold": s.very_negative_threshold, **evidence,
            })
        return None

    def _swearing_complains(self, text: str) -> bool:
        """Intensifiers ("fucking awesome", "holy shit", "funny as hell") say nothing about
        the mood, so they are set aside; any other swearing ("wtf", "this is shit", "you
        fucked up") reads as a complaint unless the message praises."""
        rest = _INTENSIFIERS.sub(" ", text)
        return _complains(rest) or bool(
            self._swears.search(rest) and not _PRAISE_CUES.search(rest)
        )

    @staticmethod
    def _first_unnegated(pattern: re.Pattern[str], text: str) -> str | None:
        """"Nobody was hurt" is not a safety report; only the words that read as a report
        when negated nearby are checked, the rest (harassment, fire) always count."""
        for match in pattern.finditer(text):
            word = match.group(0)
            if word.lower() in _NEGATABLE and _NEGATED.search(text[: match.start()]):
                continue
            return word
        return None

    def decide(
        self,
        text: str,
        negative_history: Sequence[float],
        earlier_texts: Sequence[str] = (),
        *,
        p_positive: float | None = None,
    ) -> Escalation | None:
        """``negative_history``: P(negative) of the customer's messages since the last
        ticket, oldest first, ending with this one; ``earlier_texts``: the customer's
        previous messages in that span, oldest first; ``p_positive``: P(positive) of this
        message, which keeps praise with a swear word from escalating."""
        s = self._settings
        if self.asks_for_human(text):
            return Escalation(REASON_REQUESTED, {"text": text[:200]})
        if s.strong_signals:
            strong = self.strong_signal(
                text, negative_history[-1] if negative_history else None, p_positive
            )
            if strong is not None:
                return strong
        window = list(negative_history)[-s.window :]
        hits = sum(p >= s.negative_threshold for p in window)
        rounded = [round(p, 3) for p in window]
        if hits >= s.negative_hits:
            return Escalation(
                REASON_NEGATIVE,
                {"p_negative": rounded, "hits": hits, "threshold": s.negative_threshold},
            )
        if len(negative_history) >= s.ewma_min_messages:
            trend = ewma(list(negative_history), s.ewma_alpha)
            if trend >= s.ewma_threshold:
                return Escalation(REASON_TREND, {"ewma": round(trend, 3), "p_negative": rounded})
        repeats = sum(similarity(text, t) >= s.repeat_similarity for t in earlier_texts)
        if repeats >= s.repeat_limit:
            return Escalation(REASON_REPEATED, {"repeats": repeats, "text": text[:200]})
        return None
