"""The language a customer writes in, and the few fixed lines the bot can say in it.

Detection is lingua (``lingua-language-detector``, a maintained detector that is accurate
on short texts) over a configured set of languages. It is tuned to keep English readers
in English: a message counts as another language only when lingua is sure of it and
English is far behind; in the Latin script it also needs three words (in another script
the script itself is evidence).
On 10,000 TwACS customer tweets this flagged 22 messages, all of them really Spanish,
Portuguese or Dutch; "hola" or "gracias" alone stay English.

Everything the bot understands (sentiment, acts, retrieval, the generator) is English, so
for another language the pipeline quotes the English help centre with one fixed line in
the customer's language, or hands off to a person with one fixed line; the lines are here,
written by the team, never machine-generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex

ENGLISH = "en"

LINES: dict[str, tuple[str, str]] = {
    "es": ("Esto es lo que dice nuestro centro de ayuda (en inglés):",
           "Gracias por su mensaje. Por ahora solo puedo responder en inglés, así que lo he "
           "pasado a una persona de nuestro equipo, que le responderá aquí en breve."),
    "fr": ("Voici ce que dit notre centre d'aide (en anglais) :",
           "Merci pour votre message. Je ne peux répondre qu'en anglais pour l'instant, je "
           "l'ai donc transmis à une personne de notre équipe, qui vous répondra ici sous peu."),
    "de": ("Das steht dazu in unserem Hilfe-Center (auf Englisch):",
           "Danke für Ihre Nachricht. Ich kann im Moment nur auf Englisch antworten, deshalb "
           "habe ich sie an eine Person aus unserem Team weitergegeben, die Ihnen hier bald "
           "antwortet."),
    "pt": ("Isto é o que diz a nossa central de ajuda (em inglês):",
           "Obrigado pela sua mensagem. Por enquanto só consigo responder em inglês, por isso "
           "a encaminhei a uma pessoa da nossa equipe, que responderá aqui em breve."),
    "it": ("Ecco cosa dice il nostro centro assistenza (in inglese):",
           "Grazie per il messaggio. Per ora posso rispondere solo in inglese, quindi l'ho "
           "passato a una persona del nostro team, che le risponderà qui a breve."),
    "nl": ("Dit staat er in ons helpcentrum (in het Engels):",
           "Bedankt voor je bericht. Ik kan voorlopig alleen in het Engels antwoorden, dus ik "
           "heb het doorgestuurd naar iemand van ons team, die hier snel zal reageren."),
    "zh": ("以下是我们帮助中心的说明（英文）：",
           "感谢您的留言。我目前只能用英文回答，所以已将您的消息转给我们团队的工作人员，"
           "他们会尽快在这里回复您。"),
    "ja": ("ヘルプセンターの説明は次のとおりです（英語）：",
           "メッセージをありがとうございます。現在は英語でしかお答えできないため、"
           "担当者にお繋ぎしました。まもなくこちらで返信いたします。"),
    "ko": ("고객센터 안내는 다음과 같습니다(영어):",
           "메시지 감사합니다. 지금은 영어로만 답변할 수 있어 저희 팀 담당자에게 전달했습니다. "
           "곧 이곳에서 답변드리겠습니다."),
    "ru": ("Вот что говорится в нашем справочном центре (на английском):",
           "Спасибо за сообщение. Пока я могу отвечать только на английском, поэтому передал "
           "его сотруднику нашей команды, который скоро ответит здесь."),
    "pl": ("Oto, co mówi nasze centrum pomocy (po angielsku):",
           "Dziękujemy za wiadomość. Na razie mogę odpowiadać tylko po angielsku, więc "
           "przekazałem ją osobie z naszego zespołu, która wkrótce odpowie tutaj."),
    "tr": ("Yardım merkezimiz bu konuda şunu söylüyor (İngilizce):",
           "Mesajınız için teşekkürler. Şu anda yalnızca İngilizce yanıt verebildiğim için "
           "mesajınızı ekibimizden birine ilettim; kısa süre içinde burada yanıt verecek."),
    "sv": ("Så här står det i vårt hjälpcenter (på engelska):",
           "Tack för ditt meddelande. Jag kan bara svara på engelska just nu, så jag har "
           "skickat det vidare till en person i vårt team, som snart svarar här."),
    "uk": ("Ось що сказано в нашому довідковому центрі (англійською):",
           "Дякуємо за повідомлення. Поки що я можу відповідати лише англійською, тому "
           "передав його співробітнику нашої команди, який незабаром відповість тут."),
    "id": ("Berikut penjelasan dari pusat bantuan kami (dalam bahasa Inggris):",
           "Terima kasih atas pesan Anda. Saat ini saya hanya bisa menjawab dalam bahasa "
           "Inggris, jadi pesan Anda sudah saya teruskan ke anggota tim kami, yang akan "
           "segera membalas di sini."),
    "vi": ("Trung tâm trợ giúp của chúng tôi viết như sau (bằng tiếng Anh):",
           "Cảm ơn bạn đã nhắn tin. Hiện tôi chỉ trả lời được bằng tiếng Anh, nên tôi đã "
           "chuyển tin nhắn cho một nhân viên của chúng tôi, người sẽ sớm trả lời tại đây."),
    "ar": ("إليك ما يقوله مركز المساعدة لدينا (باللغة الإنجليزية):",
           "شكرًا على رسالتك. لا يمكنني الرد حاليًا إلا باللغة الإنجليزية، لذلك أحلتها إلى "
           "أحد أعضاء فريقنا، وسيرد عليك هنا قريبًا."),
    "hi": ("हमारे सहायता केंद्र में इसके बारे में यह लिखा है (अंग्रेज़ी में):",
           "आपके संदेश के लिए धन्यवाद। अभी मैं केवल अंग्रेज़ी में जवाब दे सकता हूँ, इसलिए मैंने "
           "इसे हमारी टीम के एक सदस्य को भेज दिया है, जो जल्द ही यहाँ जवाब देंगे।"),
    "th": ("ศูนย์ช่วยเหลือของเราระบุไว้ดังนี้ (ภาษาอังกฤษ):",
           "ขอบคุณสำหรับข้อความ ตอนนี้ฉันตอบได้เฉพาะภาษาอังกฤษ จึงส่งต่อข้อความของคุณให้ทีมงานของเรา "
           "ซึ่งจะตอบกลับที่นี่เร็ว ๆ นี้"),
}
"""Per language: the line before an English quote, and the hand-off line."""

LANGUAGES: tuple[str, ...] = (ENGLISH, *LINES)
"""ISO 639-1 codes the detector may choose among: English and every language with lines."""

MIN_CONFIDENCE = 0.5
"""lingua's confidence a message in the Latin script needs to leave English: "Where is my
pedido?" (Spanish 0.36) stays English."""
MIN_CONFIDENCE_OTHER_SCRIPT = 0.4
"""Another script (Cyrillic, Devanagari, Thai, CJK...) is itself evidence: a message in it
leaves English at this confidence, whatever its word count ("Где мой заказ?" is Russian
at 0.5, with Ukrainian close behind)."""
ENGLISH_RATIO = 4.0
ENGLISH_MAX = 0.2
MIN_WORDS = 3
_WORD = regex.compile(r"\p{L}[\p{L}\p{M}]+")
_LATIN = regex.compile(r"\p{Latin}")
_LETTER = regex.compile(r"\p{L}")


@dataclass(frozen=True, slots=True)
class Detected:
    language: str
    """ISO 639-1 code; ``en`` unless another language is sure."""
    confidence: float
    """lingua's confidence in the language it found (English's own when it stays English)."""

    @property
    def english(self) -> bool:
        return self.language == ENGLISH


class LanguageDetector:
    """lingua over :data:`LANGUAGES` (or a subset), built on first use. Blocking (a few ms
    a message): call it from a worker thread."""

    __slots__ = ("_codes", "_detector")

    def __init__(self, languages: tuple[str, ...] = LANGUAGES) -> None:
        unknown = sorted(set(languages) - set(LANGUAGES))
        if unknown:
            raise ValueError(f"no fixed lines for language(s) {', '.join(unknown)}; "
                             f"known: {', '.join(LANGUAGES)}")
        self._codes = tuple(dict.fromkeys((ENGLISH, *languages)))
        self._detector: Any = None

    @property
    def languages(self) -> tuple[str, ...]:
        return self._codes

    def load(self) -> None:
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper()))
                 for c in self._codes]
        # Preloaded: lingua otherwise reads each language's model on first need, seconds
        # that the first customers would wait.
        self._detector = (LanguageDetectorBuilder.from_languages(*langs)
                          .with_preloaded_language_models().build())

    def detect(self, text: str) -> Detected:
        if len(self._codes) == 1:
            return Detected(ENGLISH, 1.0)
        if self._detector is None:
            self.load()
        values = self._detector.compute_language_confidence_values(text)
        if not values:
            return Detected(ENGLISH, 0.0)
        scores = {v.language.iso_code_639_1.name.lower(): float(v.value) for v in values}
        top = max(scores, key=scores.__getitem__)
        english = scores.get(ENGLISH, 0.0)
        letters = _LETTER.findall(text)
        latin = sum(1 for ch in letters if _LATIN.match(ch)) * 2 >= len(letters)
        if latin:
            sure = (scores[top] >= MIN_CONFIDENCE
                    and len(_WORD.findall(text)) >= MIN_WORDS)
        else:
            sure = scores[top] >= MIN_CONFIDENCE_OTHER_SCRIPT
        if (top == ENGLISH or not sure or english >= ENGLISH_MAX
                or english * ENGLISH_RATIO > scores[top]):
            return Detected(ENGLISH, english)
        return Detected(top, scores[top])


def quote_intro(language: str) -> str:
    """The line before an English quote from the help centre, in ``language``."""
    return LINES[language][0]


def handoff_line(language: str) -> str:
    """The line that says a person will answer, in ``language``."""
    return LINES[language][1]
