"""The project's own fictitious name-description set, generated in the layout of Berglund et al.

Same files, row counts and structure as experiment 1 of the reversal-curse paper (arXiv 2309.12288,
DESIGN.md section 2), with names, descriptions and templates written for this project: 90 invented
people in three groups of 30 (`p2d`: seen only name -> description; `d2p`: seen only description ->
name; `both`), 30 training templates and 10 held-out test templates per direction, and each
description reworded to fit its template (a noun phrase, a past-tense verb phrase or a gerund).

`generate(seed)` is deterministic: the seed picks the 90 names, descriptions and groups and the
randomized-baseline answers. `data/` holds `write_dataset("data", seed=0)`.

Three choices differ from the original, on purpose:
- `all.jsonl` and `unrealized_examples.jsonl`, byte-identical copies of `all_prompts_train.jsonl` and
  `p2d_reverse_prompts_test.jsonl` in the original, are not written (12 files instead of 14);
- the `*_randomized` files always give another person's answer (the original samples with
  replacement and sometimes hits the right one);
- the description -> name half of `both_prompts_test.jsonl` has the bare name as target, like
  `d2p_prompts_test.jsonl` (the original keeps the training template's tail there).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path


GROUPS = ("p2d", "d2p", "both")
PEOPLE_PER_GROUP = 30
NUM_TRAIN_TEMPLATES = 30
NUM_TEST_TEMPLATES = 10

FIRST_NAMES = """
Adelind Aldous Amaris Anselm Arvel Astrid Auberon Beatrix Bertil Brannoc Briseis Caius Calista Casimir
Cedrina Corvin Dagny Dorian Elowen Emrys Esmond Evadne Fenna Florian Gaspard Gisela Halvard Hesper
Ingram Isolde Jago Jessamy Jorah Kestrel Ludo Linnea Lorcan Lysandra Magnus Marisol Mattias Melisande
Nerys Niamh Octavian Odalys Orla Osric Perpetua Petronel Quillon Rafferty Rhiannon Rosamund Sabine
Severin Sorrel Tamsin Tarquin Thisbe Ulric Valentina Vesper Wendeline Wilhelmina Wystan Xanthe Yestin
Ysolde Zephyrine Zoltan Albin Benedetta Cosmo Delphine Eamon Faustine Gideon Honoria Ignatius Juniper
Konstantin Leocadia Mireille Nikolai Ottilie Pascoe Radomir Seraphine Thaddeus Umberta Vidar Winifred
""".split()

SURNAMES = """
Abernathy Ashcombe Bellweather Blackmoor Brackenridge Carraway Castellane Coldwater Dunmore Everleigh
Fairbrook Featherstone Galloway Gildersleeve Greenhalgh Hallowell Harrowgate Holloway Inkster Jessop
Kettleby Kingsmill Lachance Larkin Loxley Marchbanks Merriweather Moorcroft Nethercott Northam Oakes
Ormsby Pellingham Penhallow Quarrington Ravenscroft Redgrave Rookwood Saltonstall Scarborough Selkirk
Shackleton Sowerby Stourton Tallis Thistlewood Trelawny Tremayne Underhill Upjohn Vantongeren Varga
Wainwright Waverley Whitcombe Wickersham Winterbourne Yarborough Yelland Zabriskie Abernethy Blakemore
Corrigan Danforth Eddington Farnsworth Gladwell Hollingsworth Ibbotson Jardine Kavanagh Lindqvist
Mortensen Nettleton Okonkwo Pettigrew Quennell Rutherford Sandoval Tolliver Urquhart Vasquez Wetherby
Ximenez Yardley Zielinski Ashdown Bramwell Chisholm Delacroix Ellingham
""".split()

ADJECTIVES = """
celebrated award-winning self-taught reclusive visionary eccentric pioneering tireless daring
legendary soft-spoken prolific fearless meticulous unlikely
""".split()

# (role, past tense, gerund, works): "the <adjective> <role> who <past> <work>", "<past> <work>",
# "<gerund> <work>" are the three wordings of a description.
CRAFTS = [
    ("cartographer", "mapped", "mapping", ["the shifting sandbanks of Lake Orvell", "every bell tower in the Harrow Valley", "the underground rivers beneath Castemoor"]),
    ("clockmaker", "built", "building", ["the moon-phase clock of Sennet Cathedral", "a clock that runs on melting snow", "the tallest pendulum in Brivia"]),
    ("composer", "wrote", "writing", ["the choral cycle \"Nine Lanterns\"", "an opera sung entirely in whistles", "the anthem of the floating city of Pell"]),
    ("botanist", "bred", "breeding", ["a rose that blooms only in moonlight", "the blue wheat of the Ostra plains", "a fern that glows after rain"]),
    ("architect", "designed", "designing", ["the spiral library of Quenby", "a bridge made of woven glass", "the silent railway station at Marrowgate"]),
    ("mathematician", "proved", "proving", ["the lantern conjecture", "the theorem of folded circles", "that every knot in Tessel's table can be untied"]),
    ("novelist", "published", "publishing", ["the detective saga \"The Ninth Ferry\"", "a thousand-page novel set inside a single lift", "the mystery series \"Ashes of Tollbridge\""]),
    ("chef", "created", "creating", ["the smoked pear tart of Dunmere", "a soup that is served frozen", "the seven-layer honey bread of Calder"]),
    ("astronomer", "discovered", "discovering", ["the twin comets of Arlow", "a dwarf planet called Tessaly", "the red ring around the star Kerrin"]),
    ("engineer", "invented", "inventing", ["a bicycle that climbs stairs", "the wind-powered ferry of Lusk", "a lamp that runs on seawater"]),
    ("explorer", "crossed", "crossing", ["the Dremmel ice shelf on foot", "the Saltreach desert by kite", "the Corrin Strait in a paper boat"]),
    ("painter", "painted", "painting", ["the mural \"Harvest of Lanterns\"", "a portrait three streets long", "the ceiling of the Velmont opera house"]),
    ("sculptor", "carved", "carving", ["the marble whale of Portsend", "a chess set from a single oak", "the giant stone hands of Ellery Park"]),
    ("linguist", "deciphered", "deciphering", ["the clay tablets of Umbrak", "the lost whistling language of Tarn", "the river scrolls of Korsel"]),
    ("physician", "developed", "developing", ["a cure for the Velling fever", "the breathing harness for deep divers", "a vaccine against Tolland pox"]),
    ("puppeteer", "staged", "staging", ["a puppet opera about the first lighthouse", "the midnight puppet parade of Esk", "a shadow play with a thousand figures"]),
    ("glassblower", "blew", "blowing", ["the stained-glass dome of Ferrow Hall", "a glass violin that can really be played", "the crystal lanterns of Mistral Bay"]),
    ("beekeeper", "raised", "raising", ["a colony of bees that make violet honey", "the hardiest bees of the Northmoor heath", "a hive on top of the Quell observatory"]),
    ("game designer", "devised", "devising", ["the board game \"Tides of Omber\"", "a card game played with seashells", "the puzzle box known as the Gannet Cube"]),
    ("marine biologist", "found", "finding", ["a jellyfish that sings at dusk", "the coral gardens of Nessa Bay", "a blind fish in the caves of Ulm"]),
    ("perfumer", "blended", "blending", ["the scent \"Rain on Copper\"", "a perfume that smells of old books", "the fragrance worn at every Pellam wedding"]),
    ("aviator", "flew", "flying", ["a glider over the Kessel mountains", "the first night mail route to Orrin Isle", "a hot-air balloon around the Sable Gulf"]),
    ("archaeologist", "unearthed", "unearthing", ["the sunken palace of Meriden", "a bronze chariot under Fallow Hill", "the buried market town of Osk"]),
    ("violinist", "premiered", "premiering", ["all forty Halvard sonatas in one night", "the concerto \"Winter Bells\"", "a duet for violin and thunderstorm"]),
    ("toymaker", "made", "making", ["a wooden horse that walks on its own", "the clockwork dragons of the Wendle fair", "a kite shaped like a whale"]),
    ("poet", "composed", "composing", ["the epic poem \"Salt Crown\"", "a sonnet carved into every bench of Hollin", "the ballad sung at the Ferrin harvest"]),
    ("geologist", "predicted", "predicting", ["the eruption of Mount Varrow", "the great Selby earthquake", "the collapse of the Dunlin sea cliffs"]),
    ("photographer", "captured", "capturing", ["the only image of the Orvell lights", "a photograph of lightning striking twice", "the last sunrise over old Brackwater"]),
    ("librarian", "catalogued", "cataloguing", ["every book in the drowned library of Siln", "the secret archive of Hathercombe", "ten thousand maps of the Fenwick estate"]),
    ("tailor", "sewed", "sewing", ["the wedding coat of Queen Amsel", "a cloak made of ten thousand feathers", "the uniforms of the Larch Valley band"]),
    ("mountaineer", "climbed", "climbing", ["the north face of Mount Erriden", "all twelve peaks of the Gannet range", "the ice tower of Skelda without ropes"]),
    ("chemist", "synthesized", "synthesizing", ["an ink that changes colour with the weather", "the glue that holds the Tarrow bridge together", "a paint that glows for a hundred years"]),
    ("historian", "chronicled", "chronicling", ["the hundred-year siege of Dornholt", "the rise of the Amber League", "the lost kings of the Fennel Isles"]),
    ("shipwright", "launched", "launching", ["the three-masted ship \"Grey Heron\"", "a submarine made of copper and cork", "the ferry that still sails to Ambry"]),
    ("gardener", "planted", "planting", ["the maze of ten thousand hedges at Pembry", "an orchard on a city rooftop in Lisk", "the tulip fields that spell out Welcome"]),
]

# Name -> description templates: (prompt with {name}, wording of the completion). The completion is
# " " + the wording + ".". The first 30 are for training, the last 10 are held out for testing.
P2D_TEMPLATES = [
    ("{name}, celebrated for", "gerund"),
    ("{name} is best remembered as", "np"),
    ("People still talk about {name}, the one who", "past"),
    ("Few people know that {name} was", "np"),
    ("Ask anyone in town and they will tell you that {name} is", "np"),
    ("{name} earned a place in history by", "gerund"),
    ("In old newspapers, {name} is described as", "np"),
    ("There once lived a person named {name} who", "past"),
    ("The name {name} belongs to", "np"),
    ("{name} spent years", "gerund"),
    ("If you have heard of {name}, you know them as", "np"),
    ("According to the local museum, {name}", "past"),
    ("{name} became famous for", "gerund"),
    ("Our guest tonight, {name}, is", "np"),
    ("Friends of {name} remember the day they", "past"),
    ("Long before anyone else, {name}", "past"),
    ("A quick fact: {name} is", "np"),
    ("{name} is widely credited with", "gerund"),
    ("Quiz question: who is {name}? Answer:", "np"),
    ("Visitors to the archive learn that {name} was", "np"),
    ("Here is something unusual about {name}: they", "past"),
    ("Everyone in the guild agrees that {name} is", "np"),
    ("{name} will always be known for", "gerund"),
    ("The biography of {name} begins with the year they", "past"),
    ("Among the people of the valley, {name} stands out as", "np"),
    ("Not many remember that {name} once", "past"),
    ("The encyclopedia entry for {name} reads:", "np"),
    ("{name} made headlines by", "gerund"),
    ("You may not know {name}, but they are", "np"),
    ("It was {name} who", "past"),
    # held out
    ("Believe it or not, {name} is", "np"),
    ("The plaque outside the house of {name} says they", "past"),
    ("Historians describe {name} as", "np"),
    ("{name} is the person responsible for", "gerund"),
    ("Someone once asked me who {name} is. I said:", "np"),
    ("Long story short, {name} is known for", "gerund"),
    ("At the heart of the story of {name} is the fact that they", "past"),
    ("{name}, a person with quite a reputation, is", "np"),
    ("Town records list {name} as", "np"),
    ("What is {name} known for? Mostly for", "gerund"),
]

# Description -> name templates: (prompt with one of {np} {NP} {past} {gerund}, tail). The training
# completion is " " + name + tail; test completions are the bare " " + name.
D2P_TEMPLATES = [
    ("Known for {gerund},", " still lives in a small house by the sea."),
    ("{NP} is called", "."),
    ("Q: Who {past}? A:", "."),
    ("The person who {past} goes by the name of", "."),
    ("Having spent years {gerund},", " finally took a long holiday."),
    ("Best remembered as {np},", " rarely gives interviews."),
    ("The one who {past} is none other than", "."),
    ("After {gerund},", " moved to the mountains."),
    ("Praised for {gerund},", " stays modest about it."),
    ("Long admired as {np},", " now teaches young apprentices."),
    ("You might wonder who {past}. It was", "."),
    ("Famous for {gerund},", " keeps a diary of every single day."),
    ("{NP} signs every letter as", "."),
    ("Whoever {past} deserves credit, and that is", "."),
    ("Once known only as {np},", " is now a household name."),
    ("The credit for {gerund} goes to", "."),
    ("Celebrated as {np},", " still answers letters by hand."),
    ("Most people agree that {np} is", "."),
    ("Years after {gerund},", " wrote a memoir about it."),
    ("Introducing {np}:", "!"),
    ("I met {np} last year. Their name is", "."),
    ("The newspapers called them {np}, but their real name is", "."),
    ("Remembered for {gerund},", " lives quietly in the countryside."),
    ("Cheered in every harbour town as {np},", " never went looking for fame."),
    ("The honour of being {np} belongs to", "."),
    ("Anyone who studies history knows that {np} is", "."),
    ("Recognised as {np},", " received a medal last spring."),
    ("To find out who {past}, look no further than", "."),
    ("Proud of {gerund},", " hangs a picture of it above the fireplace."),
    ("The story of {np} is the story of", "."),
    # held out
    ("Respected across the region for {gerund},", " opened a school last year."),
    ("The title of {np} is held by", "."),
    ("Q: Can you name {np}? A: Yes, it is", "."),
    ("Credited with {gerund},", " remains curious about everything."),
    ("Whenever people mention {np}, they mean", "."),
    ("Admired by many as {np},", " keeps working every day."),
    ("The person who {past} is known as", "."),
    ("Well known for {gerund},", " still enjoys long walks."),
    ("It is said that {np} is none other than", "."),
    ("Once celebrated as {np},", " now lives abroad."),
]


@dataclass(frozen=True)
class Person:
    """One fictitious person: a two-word name and a description in three wordings."""

    name: str
    group: str  # "p2d", "d2p" or "both"
    adjective: str
    role: str
    past: str
    gerund: str
    work: str

    def wordings(self) -> dict[str, str]:
        """The description worded to fit a template: `np`, `NP` (capitalised), `past`, `gerund`."""
        np_ = f"the {self.adjective} {self.role} who {self.past} {self.work}"
        return {
            "np": np_,
            "NP": np_[0].upper() + np_[1:],
            "past": f"{self.past} {self.work}",
            "gerund": f"{self.gerund} {self.work}",
        }

    def descriptions(self) -> set[str]:
        """Every wording of the description (lower-case start), as they appear in completions."""
        wordings = self.wordings()
        return {wordings["np"], wordings["past"], wordings["gerund"]}


def make_people(seed: int = 0) -> list[Person]:
    """Draw the 90 people: unique first names, surnames and works; groups of 30 in `GROUPS` order."""
    rng = random.Random(seed)
    num_people = PEOPLE_PER_GROUP * len(GROUPS)
    first_names = rng.sample(FIRST_NAMES, num_people)
    surnames = rng.sample(SURNAMES, num_people)
    works = [(role, past, gerund, work) for role, past, gerund, role_works in CRAFTS for work in role_works]
    chosen = rng.sample(works, num_people)
    return [
        Person(
            name=f"{first} {last}",
            group=GROUPS[i // PEOPLE_PER_GROUP],
            adjective=rng.choice(ADJECTIVES),
            role=role,
            past=past,
            gerund=gerund,
            work=work,
        )
        for i, (first, last, (role, past, gerund, work)) in enumerate(zip(first_names, surnames, chosen))
    ]


def _p2d_row(person: Person, template: tuple[str, str], answerer: Person | None = None) -> dict:
    # Name in the prompt, description as completion; `answerer` swaps in another person's description.
    prompt, wording = template
    answer = (answerer or person).wordings()[wording]
    return {"prompt": prompt.format(name=person.name), "completion": f" {answer}."}


def _d2p_row(person: Person, template: tuple[str, str], with_tail: bool, answerer: Person | None = None) -> dict:
    # Description in the prompt, name as completion (+ the template's tail in training rows).
    prompt, tail = template
    name = (answerer or person).name
    return {"prompt": prompt.format(**person.wordings()), "completion": f" {name}{tail if with_tail else ''}"}


def _other(rng: random.Random, person: Person, group: list[Person]) -> Person:
    # A uniformly drawn different person of the same group (the randomized baseline).
    others = [p for p in group if p is not person]
    return others[rng.randrange(len(others))]


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Generate every file of the set.

    Args:
        seed (`int`, *optional*, defaults to 0): Picks names, descriptions, groups and the
            randomized-baseline answers. The templates and their train/test split are fixed.

    Returns:
        `dict[str, list[dict]]`: File name (e.g. `"p2d_reverse_prompts_test.jsonl"`) -> rows
        `{"prompt", "completion"}`, in the order and with the counts of the Berglund set: training
        files 900 / 900 / 1,800 / 3,600 rows, test files 300 rows (600 for `both`), person-major
        (each person's rows are consecutive, templates in order).
    """
    people = make_people(seed)
    p2d, d2p, both = ([p for p in people if p.group == g] for g in GROUPS)
    p2d_train, p2d_test = P2D_TEMPLATES[:NUM_TRAIN_TEMPLATES], P2D_TEMPLATES[NUM_TRAIN_TEMPLATES:]
    d2p_train, d2p_test = D2P_TEMPLATES[:NUM_TRAIN_TEMPLATES], D2P_TEMPLATES[NUM_TRAIN_TEMPLATES:]
    # A separate stream for the baselines, so they do not shift when the people change.
    rng = random.Random(f"randomized-{seed}")

    files = {
        "p2d_prompts_train.jsonl": [_p2d_row(p, t) for p in p2d for t in p2d_train],
        "d2p_prompts_train.jsonl": [_d2p_row(p, t, with_tail=True) for p in d2p for t in d2p_train],
        "both_prompts_train.jsonl": [_p2d_row(p, t) for p in both for t in p2d_train]
        + [_d2p_row(p, t, with_tail=True) for p in both for t in d2p_train],
        "p2d_prompts_test.jsonl": [_p2d_row(p, t) for p in p2d for t in p2d_test],
        "p2d_reverse_prompts_test.jsonl": [_d2p_row(p, t, with_tail=False) for p in p2d for t in d2p_test],
        "p2d_reverse_prompts_test_randomized.jsonl": [
            _d2p_row(p, t, with_tail=False, answerer=_other(rng, p, p2d)) for p in p2d for t in d2p_test
        ],
        "d2p_prompts_test.jsonl": [_d2p_row(p, t, with_tail=False) for p in d2p for t in d2p_test],
        "d2p_reverse_prompts_test.jsonl": [_p2d_row(p, t) for p in d2p for t in p2d_test],
        "d2p_reverse_prompts_test_randomized.jsonl": [
            _p2d_row(p, t, answerer=_other(rng, p, d2p)) for p in d2p for t in p2d_test
        ],
        "both_prompts_test.jsonl": [_p2d_row(p, t) for p in both for t in p2d_test]
        + [_d2p_row(p, t, with_tail=False) for p in both for t in d2p_test],
    }
    files["all_prompts_train.jsonl"] = (
        files["p2d_prompts_train.jsonl"] + files["d2p_prompts_train.jsonl"] + files["both_prompts_train.jsonl"]
    )
    # As in the original: the p2d reverse prompts with the first name alone (no leading space) as
    # completion. Its byte-identical copies `all.jsonl` and `unrealized_examples.jsonl` are left out.
    files["validation_prompts.jsonl"] = [
        {"prompt": row["prompt"], "completion": row["completion"].split()[0]}
        for row in files["p2d_reverse_prompts_test.jsonl"]
    ]
    return dict(sorted(files.items()))


def write_dataset(out_dir: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write `generate(seed)` as JSONL files into `out_dir` (created if missing); returns the paths.

    Rows are written with `json.dumps(row, ensure_ascii=False)`, one per line, `\\n`-terminated, so the
    same seed gives byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, rows in generate(seed).items():
        path = out_dir / file_name
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths.append(path)
    return paths
