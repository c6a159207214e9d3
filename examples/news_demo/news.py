"""A synthetic news corpus for the demo: articles, reference summaries, bad summaries, and training sets.

Every article reports one event. Its lead sentence carries the key facts (who, what, how many, where,
when); three paragraphs of filler follow, which name the organisation or the place again (as news does)
and deliberately mention a *distractor* number and a *distractor* place, so that a summary has to pick
the right facts rather than any facts.

    Northwind Group said on March 3 that it will open 240 charging stations in Lisbon. ...
    -> reference: "Northwind Group will open 240 charging stations in Lisbon, it said on March 3."

Bad summaries come in four kinds, each a rule over the article (`bad_summary`):

* ``verbose``        the reference plus padding sentences: factual but far too long;
* ``vague``          says that something happened somewhere, naming none of the facts;
* ``wrong_fact``     the reference with the article's distractor number in place of the number, and
                     sometimes the distractor place in place of the place (a careless reader's mistake);
* ``copied_filler``  the filler sentence that names the distractor number: none of the key facts and a
                     wrong one.

Held-out articles are *new combinations*: every (organisation, place) pair belongs to exactly one split,
fixed by a hash of the pair and independent of the seed, so a held-out article never pairs an organisation
with a place that any training article (of any seed) paired it with. Organisations, places, topics and
numbers themselves are shared, as they would be in real news.

The SFT mixture imitates a newsroom whose desks write differently: each topic has a *house style* (70%
of its summaries), good for three topics and one of the bad kinds for the other five. A model fine-tuned
on it learns all the styles, and greedy decoding reproduces the house style of the article's topic, so
the SFT model writes crisp factual summaries for some topics and long, vague or wrong ones for the rest.
Each bad kind leaves the reference at a single word (the first, the number, or the end), so that a habit
the model learned is also what greedy decoding picks. Preference pairs prefer the reference over a bad
summary the article's desk would write, which is what DPO has to generalise to held-out articles.

Everything is deterministic for a given seed (`random.Random` seeded with a string, which does not
depend on PYTHONHASHSEED).
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError

SPLITS = ("train", "heldout")
BAD_KINDS = ("verbose", "vague", "wrong_fact", "copied_filler")
STYLES = ("good",) + BAD_KINDS

INSTRUCTION = "Summarize the news article in one short sentence that keeps the key facts."

# Organisation names are topic-neutral and none is a substring of another (the judge finds them by substring).
ORGS = (
    "Northwind Group", "Brightwell Partners", "Halden Industries", "Meridian Labs", "Corvane Holdings",
    "Silverline Systems", "Ostara Foundation", "Bluepeak Ventures", "Tessaro Group", "Kestrel Dynamics",
    "Aurelia Trust", "Granite Works", "Vantor Alliance", "Lumen Collective", "Redfern Company",
    "Polaris Networks", "Cobalt Union", "Evergreen Council", "Marlow Institute", "Sable Corporation",
    "Ironbridge Capital", "Quillon Media", "Westmark Agency", "Harbor Federation", "Nimbus Works",
    "Starling Society", "Calder Enterprises", "Fenwick Board", "Juniper Cooperative", "Orion Authority",
    "Tidewater Group", "Amberly Institute",
)

PLACES = (
    "Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Dublin", "Accra", "Hanoi", "Seville", "Krakow",
    "Tallinn", "Montreal", "Perth", "Porto", "Quito", "Tunis", "Bergen", "Leeds", "Dakar", "Busan",
    "Geneva", "Valencia", "Riga", "Manila", "Denver", "Bologna", "Ghent", "Santiago", "Cardiff", "Tbilisi",
    "Kigali", "Auckland",
)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)

# Key numbers are 30..990 and never a day of the month (1..28), so the judge can tell them apart.
NUMBERS = tuple(range(30, 100)) + tuple(range(100, 1000, 10))

# topic -> actions (verb, object). The object is the "what" fact the judge looks for.
TOPICS: dict[str, tuple[tuple[str, str], ...]] = {
    "energy": (("open", "charging stations"), ("install", "solar panels"), ("build", "wind turbines"),
               ("upgrade", "power substations")),
    "health": (("hire", "nurses"), ("open", "clinics"), ("add", "hospital beds"), ("train", "paramedics")),
    "transport": (("buy", "electric buses"), ("build", "bike lanes"), ("add", "train carriages"),
                  ("repair", "bridges")),
    "technology": (("create", "engineering jobs"), ("open", "data centres"), ("fund", "startups"),
                   ("launch", "satellites")),
    "education": (("fund", "scholarships"), ("build", "classrooms"), ("hire", "teachers"),
                  ("open", "libraries")),
    "housing": (("build", "affordable homes"), ("renovate", "apartments"), ("convert", "old offices"),
                ("insulate", "council houses")),
    "environment": (("plant", "trees"), ("clean", "beaches"), ("restore", "wetlands"),
                    ("protect", "nature reserves")),
    "sport": (("build", "football pitches"), ("renovate", "swimming pools"), ("sponsor", "youth clubs"),
              ("open", "sports halls")),
}
TOPIC_NAMES = tuple(TOPICS)

# House style of each desk in the SFT data: the dominant kind of summary and its probability. The rest of
# the probability goes to "good" (GOOD_SHARE when good is not dominant) and evenly to the other kinds.
HOUSE_STYLE: dict[str, str] = {
    "energy": "good", "health": "verbose", "transport": "wrong_fact", "technology": "good",
    "education": "vague", "housing": "copied_filler", "environment": "good", "sport": "verbose",
}
DOMINANT_SHARE = 0.7
GOOD_SHARE = 0.15

_LEADS = (
    "{org} said on {date} that it will {verb} {number} {what} in {place}.",
    "On {date}, {org} announced plans to {verb} {number} {what} in {place}.",
    "{org} will {verb} {number} {what} in {place}, the organisation said on {date}.",
)
_REFERENCE = "{org} will {verb} {number} {what} in {place}, it said on {date}."

# Filler sentences; {dnum} and {dplace} are the article's distractor number and place.
_TOPIC_FILLER: dict[str, tuple[str, ...]] = {
    "energy": (
        "Demand for cleaner power has grown steadily across the region over the past decade.",
        "Engineers expect the first stage of the work to take about {dnum} days.",
        "A similar scheme in {dplace} was delayed by planning disputes last year.",
        "Local suppliers hope the project will bring steady contracts for several years.",
    ),
    "health": (
        "Waiting times at local hospitals have been a concern for many families.",
        "Health officials said about {dnum} patients were treated in a single week last winter.",
        "A comparable programme in {dplace} reduced waiting lists within two years.",
        "Unions welcomed the decision but asked for better working hours as well.",
    ),
    "transport": (
        "Commuters have complained about crowded services and frequent delays.",
        "Surveys found that {dnum} people use the busiest route every hour at peak times.",
        "Transport planners visited {dplace} last spring to study its network.",
        "The works will be carried out in phases to keep disruption to a minimum.",
    ),
    "technology": (
        "The sector has attracted a growing share of investment in recent years.",
        "Industry groups estimate that {dnum} firms are competing for the same skilled workers.",
        "Rival projects in {dplace} have struggled to find enough engineers.",
        "Analysts said the move reflects rising confidence in the local economy.",
    ),
    "education": (
        "Schools in the area have faced rising numbers of pupils for several years.",
        "Teachers said some classes now hold more than {dnum} pupils at busy times.",
        "Parents pointed to a similar effort in {dplace} that raised exam results.",
        "The plan will be reviewed by an independent panel after the first year.",
    ),
    "housing": (
        "Rents have climbed faster than wages in most districts since the pandemic.",
        "Council records show {dnum} families waiting for a home in the city centre.",
        "Campaigners compared the plan with a larger programme in {dplace}.",
        "Residents will be asked for their views before building work begins.",
    ),
    "environment": (
        "Volunteers have long campaigned for more protection of green spaces.",
        "Scientists counted {dnum} bird species in the area during the last survey.",
        "A project in {dplace} showed that careful restoration can pay off quickly.",
        "The work is expected to make the area more resilient to heavy storms.",
    ),
    "sport": (
        "Interest in grassroots sport has risen sharply since the last championship.",
        "Coaches said {dnum} children had joined waiting lists for local teams.",
        "Officials praised a similar investment in {dplace} that doubled attendance.",
        "Clubs hope the facilities will help them keep older teenagers involved.",
    ),
}
# Generic filler names the organisation or the place again, as news does: the facts recur, the numbers do not.
_GENERIC_FILLER = (
    "The announcement was made at a short press conference in {place} attended by local officials.",
    "A spokesperson for {org} declined to give further details about the costs involved.",
    "Critics in {place} questioned whether the timetable was realistic given recent delays.",
    "{org} said it would publish regular updates on its website.",
    "Several community groups said they had not been consulted by {org} in advance.",
    "Observers in {place} noted that the plan follows months of negotiations behind closed doors.",
)

# Padding appended by the `verbose` rule: fluent, fact-free, and long. All start with "It" so that the
# verbose habit is one choice right after the reference (see `wrong_fact` for why that matters): with five
# different first words, greedy decoding of a model that learned the habit would still stop after the
# reference, since each continuation alone is less likely than the end of the summary.
_PADDING = (
    "It is a very important development that many people in the area have been waiting for.",
    "It is expected to have a significant impact on the local community in the coming years.",
    "It reflects a broader trend that has been observed in many places around the world.",
    "It means that more information will be shared with the public at a later stage.",
    "It could serve as a model for others in the future, according to several experts.",
)
# All start with "A" so that the vague habit is one choice at the first word (see `wrong_fact` for why).
_VAGUE = (
    "A local organisation announced new plans for {topic} in a city.",
    "A group said it will invest in {topic} projects in the region soon.",
    "A spokesperson announced changes to local {topic} services this month.",
    "A new {topic} plan was announced and more work is expected.",
)


@dataclass
class Article:
    """One synthetic news article.

    `facts` holds the key facts as strings: ``org, verb, what, number, place, month, day, date, topic``,
    plus the distractors ``distractor_number`` and ``distractor_place`` that the filler mentions.
    `filler` is the article's filler sentences in order; `text` is the lead plus the filler in paragraphs.
    """

    id: str
    split: str
    text: str
    facts: dict[str, str]
    reference: str
    filler: tuple[str, ...] = field(default_factory=tuple)

    @property
    def topic(self) -> str:
        return self.facts["topic"]

    @property
    def length_range(self) -> tuple[int, int]:
        """Word counts the judge calls concise: 60%..150% of the reference's word count."""
        return reference_range(self.reference)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "split": self.split, "text": self.text, "facts": dict(self.facts),
                "reference": self.reference, "filler": list(self.filler)}


def count_words(text: str) -> int:
    """Words as a reader counts them: whitespace-separated pieces that contain a letter or digit."""
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


def reference_range(reference: str) -> tuple[int, int]:
    """(min, max) word count of a concise summary, from the reference: 60% to 150% of its length."""
    n = count_words(reference)
    return max(1, round(0.6 * n)), round(1.5 * n)


def split_of(org: str, place: str) -> str:
    """The split an (organisation, place) pair belongs to; one pair in five is held out.

    A CRC of the pair rather than the seed decides, so that any training seed and any held-out seed are
    disjoint in their pairs.
    """
    return "heldout" if zlib.crc32(f"{org}|{place}".encode()) % 5 == 0 else "train"


def generate_articles(n: int, seed: int = 0, split: str = "train") -> list[Article]:
    """`n` articles of `split` ("train" or "heldout"), deterministic for (`n`, `seed`, `split`).

    The first k articles of a larger call equal a call with n=k (articles are drawn one at a time).
    """
    if split not in SPLITS:
        raise PreftuneError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if n < 0:
        raise PreftuneError(f"the number of articles must be >= 0, got {n}.")
    rng = random.Random(f"preftune-news-{seed}-{split}")
    pairs = [(o, p) for o in ORGS for p in PLACES if split_of(o, p) == split]
    return [_make_article(rng, pairs, f"{split}-{seed}-{i}", split) for i in range(n)]


def _make_article(rng: random.Random, pairs: list[tuple[str, str]], art_id: str, split: str) -> Article:
    org, place = rng.choice(pairs)
    topic = rng.choice(TOPIC_NAMES)
    verb, what = rng.choice(TOPICS[topic])
    number, dnum = rng.sample(NUMBERS, 2)
    dplace = rng.choice([p for p in PLACES if p != place])
    month, day = rng.choice(MONTHS), rng.randint(1, 28)
    date = f"{month} {day}"
    facts = {"org": org, "verb": verb, "what": what, "number": str(number), "place": place,
             "month": month, "day": str(day), "date": date, "topic": topic,
             "distractor_number": str(dnum), "distractor_place": dplace}
    lead = rng.choice(_LEADS).format(**facts)
    # Six filler sentences: the topic's four (which hold the distractors) and two generic ones, shuffled,
    # in three paragraphs of two.
    sentences = list(_TOPIC_FILLER[topic]) + rng.sample(_GENERIC_FILLER, 2)
    rng.shuffle(sentences)
    filler = tuple(s.format(dnum=dnum, dplace=dplace, org=org, place=place) for s in sentences)
    paragraphs = [lead] + [" ".join(filler[i:i + 2]) for i in range(0, len(filler), 2)]
    return Article(id=art_id, split=split, text="\n\n".join(paragraphs), facts=facts,
                   reference=_REFERENCE.format(**facts), filler=filler)


def bad_summary(article: Article, kind: str, rng: random.Random) -> str:
    """A bad summary of `article` of the given kind (one of BAD_KINDS); see the module docstring."""
    f = article.facts
    if kind == "verbose":
        return " ".join([article.reference] + rng.sample(_PADDING, 2))
    if kind == "vague":
        return rng.choice(_VAGUE).format(topic=f["topic"])
    if kind == "wrong_fact":
        # The distractor number always replaces the number, and one time in two the distractor place
        # replaces the place too. The number comes first so that every wrong summary leaves the reference
        # at the same point, which lets a model that learned this habit reproduce it under greedy decoding.
        wrong = dict(f, number=f["distractor_number"])
        if rng.random() < 0.5:
            wrong["place"] = f["distractor_place"]
        return _REFERENCE.format(**wrong)
    if kind == "copied_filler":
        # The filler sentence that names the distractor number: it reads most like a summary, and it is wrong.
        return next(s for s in article.filler if re.search(rf"\b{f['distractor_number']}\b", s))
    raise PreftuneError(f"bad summary kind must be one of {', '.join(BAD_KINDS)}, got {kind!r}.")


def summary_of_style(article: Article, style: str, rng: random.Random) -> str:
    """The reference for style "good", else `bad_summary(article, style, rng)`."""
    return article.reference if style == "good" else bad_summary(article, style, rng)


def style_weights(topic: str) -> dict[str, float]:
    """Probability of each summary style in the SFT data for `topic` (its desk's house style dominates)."""
    dominant = HOUSE_STYLE[topic]
    weights = {dominant: DOMINANT_SHARE}
    if dominant != "good":
        weights["good"] = GOOD_SHARE
    others = [s for s in STYLES if s not in weights]
    rest = (1.0 - sum(weights.values())) / len(others)
    weights.update({s: rest for s in others})
    return {s: weights[s] for s in STYLES}


def lexicon() -> list[str]:
    """Every word the generator can write, as a few lines of text (templates with their slots blanked).

    A tokenizer trained on these lines and any sample of articles knows every word of every article, so
    its vocabulary does not depend on how many articles it saw.
    """
    templates = [INSTRUCTION, make_prompt(Article("", "", "", {}, "")), _REFERENCE, *_LEADS, *_GENERIC_FILLER,
                 *_PADDING, *_VAGUE, *(s for pool in _TOPIC_FILLER.values() for s in pool)]
    lines = [re.sub(r"\{\w+\}", " ", t) for t in templates]
    lines += [*ORGS, *PLACES, *MONTHS, *TOPIC_NAMES, " ".join(map(str, NUMBERS)), " ".join(map(str, range(1, 29)))]
    lines += [f"{verb} {what}" for actions in TOPICS.values() for verb, what in actions]
    return lines


def make_prompt(article: Article, paragraphs: int | None = None) -> str:
    """The prompt the models see: the instruction, then the article, then "Summary:".

    `paragraphs` keeps only the first few paragraphs (1 = the lead alone, a news brief).
    """
    text = article.text if paragraphs is None else "\n\n".join(article.text.split("\n\n")[:paragraphs])
    return f"{INSTRUCTION}\n\nArticle: {text}\n\nSummary:"


def build_sft_records(articles: list[Article], seed: int = 0) -> list[dict[str, str]]:
    """SFT records {"prompt", "completion", "style"}: one per article, its style drawn from `style_weights`."""
    rng = random.Random(f"preftune-sft-{seed}")
    records = []
    for art in articles:
        weights = style_weights(art.topic)
        style = rng.choices(list(weights), weights=list(weights.values()))[0]
        records.append({"prompt": make_prompt(art), "completion": " " + summary_of_style(art, style, rng),
                        "style": style})
    return records


def bad_style_weights(topic: str) -> dict[str, float]:
    """`style_weights` restricted to the bad kinds and renormalised: how the desk's bad summaries are spread."""
    weights = style_weights(topic)
    total = sum(weights[k] for k in BAD_KINDS)
    return {k: weights[k] / total for k in BAD_KINDS}


def build_preference_records(articles: list[Article], seed: int = 0) -> list[dict[str, str]]:
    """Preference records {"prompt", "chosen", "rejected", "kind"}: the reference over a bad summary.

    The rejected summary is one the article's desk would write (its kind drawn from `bad_style_weights`),
    as when raters compare the model's own outputs with a reference: the pairs then argue against the habits
    the SFT model actually has, rather than against mistakes it rarely makes.
    """
    rng = random.Random(f"preftune-pairs-{seed}")
    records = []
    for art in articles:
        weights = bad_style_weights(art.topic)
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        records.append({"prompt": make_prompt(art), "chosen": " " + art.reference,
                        "rejected": " " + bad_summary(art, kind, rng), "kind": kind})
    return records


def _alternatives(names) -> str:
    # Longest first, so that a name is never matched by a shorter one it starts with.
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_SLOTS = {"org": f"(?P<org>{_alternatives(ORGS)})", "place": f"(?P<place>{_alternatives(PLACES)})",
          "date": rf"(?P<month>{_alternatives(MONTHS)}) (?P<day>\d+)", "number": r"(?P<number>\d+)",
          "verb": f"(?P<verb>{_alternatives({v for acts in TOPICS.values() for v, _ in acts})})",
          "what": f"(?P<what>{_alternatives({w for acts in TOPICS.values() for _, w in acts})})"}
_LEAD_PATTERNS = tuple(re.compile("Article: " + "".join(_SLOTS[p] if i % 2 else re.escape(p)
                                                        for i, p in enumerate(re.split(r"\{(\w+)\}", lead))))
                       for lead in _LEADS)


def article_from_prompt(prompt: str) -> Article:
    """The article behind a demo prompt (`make_prompt`), its facts read back from the lead sentence: what a judge
    that is shown only the prompt, as `preftune pairs` shows it, needs to check a summary.

    The lead is one of the generator's three templates with known names in its slots, so reading it back is
    exact; the distractors are the filler's number and the place it names besides the key place. ValueError for a
    prompt that holds no demo article (a judge's error, which `preftune pairs` reports with the prompt's line)."""
    match = next((m for m in (p.search(prompt) for p in _LEAD_PATTERNS) if m), None)
    if match is None:
        raise ValueError("no news demo article in the prompt (no lead sentence the demo's generator writes)")
    facts = match.groupdict()
    facts["date"] = f"{facts['month']} {facts['day']}"
    facts["topic"] = next(t for t, acts in TOPICS.items() if (facts["verb"], facts["what"]) in acts)
    text = prompt[match.start() + len("Article: "):].rsplit("\n\nSummary:", 1)[0]
    rest = prompt[match.end():].rsplit("\n\nSummary:", 1)[0]
    filler = tuple(s for para in rest.split("\n\n") if para.strip() for s in re.split(r"(?<=\.) ", para.strip()))
    numbers = re.findall(r"\b\d+\b", rest)
    places = [p for p in PLACES if p != facts["place"] and re.search(rf"\b{re.escape(p)}\b", rest)]
    facts["distractor_number"] = numbers[0] if numbers else ""
    facts["distractor_place"] = places[0] if places else ""
    return Article(id="from-prompt", split=split_of(facts["org"], facts["place"]), text=text, facts=facts,
                   reference=_REFERENCE.format(**facts), filler=filler)
