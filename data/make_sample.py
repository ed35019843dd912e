"""Write data/sample_trn.json: invented products shaped like the real LF-AmazonTitles-1.3M trn.json.

    python data/make_sample.py            # rewrites data/sample_trn.json (seeded: the same file every time)
    python data/make_sample.py --products 1000 --out /tmp/gen1000.json --seed 1   # N products, no trap rows

The sample should score what the real file scores, so that the demo tells the truth (README.md, "Learning the
catalogue"): most products are books, and a book's description is often a publisher's blurb or a row of review
quotes; the rest spans many categories; descriptions have a median of 398 characters and a 75th percentile of 805.
Every text here is generated from the word lists below (no text from the real dataset), with a lognormal length around
that median and spread. Titles and quotes draw on lists large enough that products rarely look alike, and sentences
keep one natural order: a sample of look-alike titles, the same eight quotes and shuffled sentences measured far
harder to recall than real records (seen ROUGE-L 0.54 against 0.83 after the same training). The traps the real file
has are kept as fixed rows: HTML entities (some escaped twice), HTML tags, glued edition notes, empty and too-short
descriptions, empty titles, repeated titles and one ~30,000-character description. tests/test_data.py counts them.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sample_trn.json"
PRODUCTS = 280  # regular products; with the 20 trap rows, 300 lines, like the 300-record real head
BOOK_SHARE = 0.6  # the head of the real file is mostly books
# Lognormal target length of a description. Whole sentences overshoot it, so these sit below the real file's median
# (398) and 75th percentile (805); the file written measures median 397, 75th percentile 808 (non-empty descriptions).
MEDIAN, SIGMA = 370, 1.1

FIRST = (
    "Ada Bram Celia Dorian Edith Felix Greta Hollis Ines Jasper Kit Lena Milo Nora Otto Petra Quinn Rosa Silas Tova"
)
LAST = (
    "Ashdown Brightwell Carrow Dunmore Ellery Fenwick Garland Holloway Ingram Jessop Kettering Lowther Marsh Norcott"
)
PLACES = (
    "Cornwall, the Hebrides, Lisbon, Prague, Nova Scotia, the Yorkshire moors, Trieste, a Baltic port, Kyoto, Ohio, "
    "Tangier, the Fens, Valparaiso, Odessa, the Outer Banks, Tasmania, Galway, Marrakesh, Bruges, the Dolomites, "
    "Zanzibar, Quebec, the Orkneys, Seville, Montana, Hokkaido, Dubrovnik, the Camargue, Wellington, Lapland"
)
# Real titles are mostly distinct words: a small vocabulary would give the model look-alike titles to confuse, which
# makes recall harder than on the real file (measured: seen ROUGE-L 0.55 here against 0.83 on real records, the books
# with look-alike titles and rows of the same few review quotes scoring lowest).
BOOK_THINGS = (
    "Ledger, Orchard, Lantern, Harbour, Atlas, Cipher, Garden, Winter, Archive, Compass, Letters, Bell, River, "
    "Salt Road, Glasshouse, Lighthouse, Weaver, Cartographer, Apothecary, Tide, Ferryman, Beekeeper, Clockmaker, "
    "Saltmarsh, Falconer, Ropewalk, Observatory, Quarry, Vineyard, Hourglass, Mapmaker, Lamplighter, Inkwell, "
    "Chapel, Canal, Foundry, Printer, Ice House, Tannery, Nightingale"
)
ADJECTIVES = (
    "Silent Drowned Last Painted Hollow Borrowed Northern Crooked Burning Secret Paper Golden Forgotten Salt Glass "
    "Distant Lost Wild Quiet Broken Second Iron Midnight Velvet Narrow Restless Bright Small Unquiet Amber"
)
TITLES = [
    "The {thing} of {place}",
    "{first}'s {thing}",
    "The {adj} {thing}",
    "A {adj} {thing}",
    "Notes from the {thing}",
    "{adj} Water, {adj2} Sky",
    "The {thing} and the {thing2}",
    "Return to {place}",
]
BOOK_FORMS = "Hardcover, Paperback, Mass Market Paperback, Audio CD, Board book, Library Binding"
PAPERS = (
    "Sunday Times, Daily Telegraph, Guardian, Observer, Independent, Spectator, Literary Review, Kirkus Reviews, "
    "Publishers Weekly, Library Journal, The Scotsman, Irish Times, New Statesman, Booklist, The Herald, "
    "Evening Standard"
)
# Review quotes as the real file has them: many, and each worded its own way (a row of the same eight quotes would be
# the hardest thing in the sample to tell apart, harder than anything in the real file).
PRAISE = [
    "A {q} and {q2} {n}",
    "{q}, {q2} and {q3}",
    "Quite simply the most {q} {n} of the year",
    "{q} from the first page to the last",
    "A {n} of rare {virtue}",
    "{author} writes with {virtue} and {virtue2}",
    "I could not put this {q} {n} down",
]
QUALITIES = (
    "gripping wise tender funny luminous haunting fierce generous exact playful sombre dazzling patient "
    "unsentimental brave strange lyrical sharp humane restless"
).split()
PRAISE_NOUNS = "book novel debut story portrait memoir chronicle fable history account".split()
VIRTUES = "grace wit tenderness precision courage warmth clarity nerve humour patience".split()
GENRES = ["novel", "thriller", "memoir", "cookbook", "history", "picture book", "field guide", "poetry collection"]
EVENTS = [
    "finds a stranger's diary washed ashore",
    "inherits a house no one has entered for forty years",
    "is asked to forge a letter that could start a war",
    "discovers that the family business was built on a lie",
    "takes a job cataloguing a dead collector's maps",
    "must guide a convoy through the worst winter in memory",
    "opens a bookshop in a town that has stopped reading",
    "answers an advertisement for a lighthouse keeper",
    "follows a missing brother's letters across three countries",
    "is hired to restore a chapel's painted ceiling",
    "wins a racehorse in a card game",
    "tries to save an orchard from the bank",
    "teaches a village to swim the year the dam breaks",
    "smuggles seeds out of a city under siege",
    "sets out to map a river that changes course every spring",
]
# Each category: product names (the noun last), variants, materials, facts, and what-is-in-the-box lines.
CATEGORIES = {
    "clothing": (
        ["Girls Ballet Tutu", "Men's Merino Crew Socks", "Women's Rain Jacket", "Kids Fleece Hoodie", "Linen Shirt"],
        ["Neon Blue", "Navy", "Forest Green", "Charcoal", "Zebra Stripes", "Mustard"],
        ["{layers} layers of soft tulle", "{pct}% merino wool", "a water-resistant ripstop shell", "brushed fleece"],
        ["Sizes {a} to {b}.", "Machine washable at {wash} degrees.", "Length {n} inches.", "An elastic waist."],
    ),
    "kitchen": (
        ["Cast Iron Skillet", "Steel Garlic Press", "Bamboo Cutting Board", "Glass Storage Jars", "Hand Mixer"],
        ["10 Inch", "Large", "Set of {n}", "Pro", "Matte Black", "{a} Speed"],
        ["pre-seasoned cast iron", "18/8 stainless steel", "solid moso bamboo", "borosilicate glass", "brushed steel"],
        ["Dishwasher safe.", "Oven safe to {oven} F.", "Holds {n} cups.", "Weighs {g} grams."],
    ),
    "toys": (
        ["Wooden Train Set", "Magnetic Building Tiles", "Plush Elephant", "Jigsaw Puzzle", "Kids Art Easel"],
        ["{n} Pieces", "Rainbow", "Deluxe", "Starter Set", "Grey"],
        ["smooth beech wood", "ABS plastic with sealed magnets", "a hypoallergenic fibre filling", "thick card"],
        ["For ages {a} and up.", "{n} pieces in all.", "Comes in a storage box.", "Finished in non-toxic paints."],
    ),
    "electronics": (
        ["USB-C Charging Cable", "Bluetooth Speaker", "Wireless Mouse", "HDMI Switch", "Portable Power Bank"],
        ["{a} ft", "Waterproof", "Silent Click", "{a} Port", "{mah}mAh"],
        ["a braided nylon jacket", "a rubberised aluminium shell", "recycled plastic", "a fire-resistant casing"],
        ["Covered by a {n}-month warranty.", "The battery lasts {b} hours.", "Charges fully in {a} hours."],
    ),
    "music": (
        ["Greatest Hits", "Live at the Ballroom", "Songs for a Long Drive", "The Quiet Sessions", "Piano Nocturnes"],
        ["Audio CD", "Remastered", "2 CD Deluxe Edition", "Vinyl"],
        ["{n} tracks", "a {n}-page booklet of liner notes", "{a} previously unreleased songs", "a live encore"],
        ["The running time is {mins} minutes.", "It was recorded in {y}.", "It includes {a} bonus tracks."],
    ),
    "home": (
        ["Blackout Curtains", "Linen Throw Pillow Cover", "Scented Soy Candle", "Wool Area Rug", "Wall Clock"],
        ["2 Panels", "18x18", "Cedarwood", "5x7", "Silent Sweep"],
        ["triple-weave polyester", "washed linen", "natural soy wax", "hand-tufted wool", "a silent quartz movement"],
        ["It burns for {n} hours.", "It measures {a} x {b} inches.", "It blocks {pct}% of light.", "Spot clean only."],
    ),
    "sports": (
        ["Yoga Mat", "Adjustable Dumbbells", "Cycling Gloves", "Trail Running Shoes", "Insulated Water Bottle"],
        ["6mm", "Pair", "Gel Padded", "Men's", "{n} oz"],
        ["non-slip natural rubber", "cast steel plates", "gel palm padding", "a grippy lugged sole", "double walls"],
        ["It keeps drinks cold for {b} hours.", "From {a} to {lb} lb.", "It is {a} mm thick.", "Weighs {g} grams."],
    ),
}
EXTRAS = [
    "Designed in {place} by a team of {team} and tested for {a} months before launch.",
    "Rated {stars} stars by {reviews} customers, who praise how well it {verb}.",
    "In the box: the {noun}, a care card and a {a}-year guarantee.",
    "It ships in plastic-free packaging made from {pct}% recycled card.",
    "Part of our {category} range since {since}; this is the {ordinal} version.",
    "Customers who bought it often add the matching {other}.",
    "If it arrives damaged, our {city} team replaces it within {a} days.",
    "Available in {a} colours; the one shown is {colour}.",
]
# The traps of the real file, as fixed rows (tests/test_data.py counts them): (title, content).
TRAPS = [
    ("Replacement Vacuum Filter", ""),
    ("Spiral Notebook College Ruled", ""),
    ("AA Batteries 24 Pack", ""),
    ("Phone Stand Aluminum", ""),
    ("Shower Curtain Hooks", ""),
    ("Sticky Notes Assorted", ""),
    ("Kitchen Timer Magnetic", ""),
    ("Shoe Laces Flat 45 Inch", ""),
    ("Picture Hanging Kit", ""),
    ("Microfiber Cleaning Cloths", ""),
    ("", "A set of three nesting storage baskets woven from water hyacinth."),
    ("", "Sturdy metal bookends with a non-skid base, sold as a pair."),
    ("", ""),
    ("   ", "Glass spice jars with bamboo lids and printed labels, set of 12."),
    ("Rubber Door Stop", "Grey rubber wedge."),
    ("Key Ring", "Steel."),
]
DUPLICATES = 4  # later copies of an earlier title (differently spaced and cased): the first one wins
NOTES = [
    "--This text refers to theHardcoveredition.",
    "--This text refers to thePaperbackedition.",
    "--This text refers to an out of print or unavailable edition of this title.",
]


def words(text: str) -> list[str]:
    return [w.strip() for w in text.replace(",", " ,").split(" ,") if w.strip()] if "," in text else text.split()


def fill(rng: random.Random, text: str, **known: str) -> str:
    values = {
        "n": rng.choice([2, 3, 4, 6, 8, 10, 12, 24, 36, 48]),
        "a": rng.randint(2, 9),
        "b": rng.randint(10, 16),
        "wash": rng.choice([30, 40, 60]),
        "oven": rng.choice([350, 450, 500]),
        "g": rng.choice([85, 150, 220, 300, 450, 900]),
        "mah": rng.choice([5000, 10000, 20000]),
        "mins": rng.randint(38, 79),
        "lb": rng.choice([25, 52, 90]),
        "pct": rng.choice([70, 85, 90, 99, 100]),
        "layers": rng.randint(2, 5),
        "y": rng.randint(1962, 2019),
        "place": rng.choice(words(PLACES)),
        "city": rng.choice(["Leeds", "Austin", "Lyon", "Osaka", "Porto"]),
        "team": rng.randint(3, 40),
        "stars": rng.choice(["4.1", "4.4", "4.6", "4.8"]),
        "reviews": rng.randint(12, 4000),
        "verb": rng.choice(["holds up", "works", "washes", "travels", "lasts"]),
        "since": rng.randint(1990, 2019),
        "ordinal": rng.choice(["second", "third", "fourth", "fifth"]),
        "colour": rng.choice(["slate", "sand", "plum", "teal", "ivory"]),
        "other": rng.choice(["travel case", "spare set", "gift box", "refill pack", "wall mount"]),
        **known,
    }
    return text.format(**values)


def target_length(rng: random.Random) -> int:
    return max(40, min(4000, round(MEDIAN * math.exp(rng.gauss(0, SIGMA)))))


def grow(rng: random.Random, sentences: list[str], length: int) -> str:
    """Whole sentences, in order, until the text reaches about `length` characters."""
    out = []
    for s in sentences:
        out.append(s)
        if sum(len(x) + 1 for x in out) >= length:
            break
    return " ".join(out)


def book(rng: random.Random) -> tuple[str, str]:
    first, last, places = words(FIRST), words(LAST), words(PLACES)
    hero, author = f"{rng.choice(first)} {rng.choice(last)}", f"{rng.choice(first)} {rng.choice(last)}"
    things, adjectives = words(BOOK_THINGS), ADJECTIVES.split()
    thing, thing2 = rng.sample(things, 2)
    adj, adj2 = rng.sample(adjectives, 2)
    genre, place, year = rng.choice(GENRES), rng.choice(places), rng.randint(1790, 2015)
    # The description tells of what the title names (its place, hero, thing), as a real blurb does: a title the text
    # never mentions is a harder thing to recall than the real file asks.
    title = rng.choice(TITLES).format(
        thing=thing,
        thing2=thing2,
        adj=adj,
        adj2=adj2,
        place=place.replace("the ", "").title(),
        first=hero.split()[0],
    )
    if rng.random() < 0.4:
        title += f" ({rng.choice(words(BOOK_FORMS))})"
    quotes = [
        "'{}' {}".format(
            rng.choice(PRAISE)
            .format(
                q=rng.choice(QUALITIES),
                q2=rng.choice(QUALITIES),
                q3=rng.choice(QUALITIES),
                n=rng.choice(PRAISE_NOUNS),
                virtue=rng.choice(VIRTUES),
                virtue2=rng.choice(VIRTUES),
                author=author.split()[-1],
            )
            .capitalize(),
            rng.choice(words(PAPERS)),
        )
        for _ in range(rng.randint(1, 6))
    ]
    plot = [
        f"In {year}, in {place}, {hero} {rng.choice(EVENTS)}.",
        f"At its centre is the {thing.lower()}, {adj.lower()} and {rng.choice(QUALITIES)}, and a {thing2.lower()} "
        f"no one in {place} will speak of.",
        f"What follows is a {genre} about {rng.choice(['loyalty', 'grief', 'ambition', 'home', 'secrets', 'luck'])}, "
        f"told over {rng.randint(2, 40)} {rng.choice(['days', 'years', 'letters', 'chapters'])}.",
        f"{author} has written {rng.randint(2, 19)} books and lives in {rng.choice(places)}.",
        f"This is book {rng.randint(1, 5)} of the {rng.choice(words(LAST))} series, and stands on its own.",
        f"With {rng.randint(8, 120)} {rng.choice(['illustrations', 'recipes', 'maps', 'photographs'])} and an index.",
        f"Shortlisted for the {rng.choice(words(LAST))} Prize in {rng.randint(1995, 2016)}.",
        f"As the {rng.choice(['storm', 'war', 'trial', 'harvest', 'election'])} draws near, {hero.split()[0]} must "
        f"choose between {rng.choice(['a brother', 'a lover', 'an old friend', 'a rival'])} and the truth.",
        f"Told in {rng.choice(['three voices', 'letters', 'short chapters', 'two timelines'])}, it moves from "
        f"{rng.choice(places)} to {rng.choice(places)} and back.",
        f"{author}'s {rng.choice(['first', 'second', 'long-awaited', 'most personal'])} book has been translated "
        f"into {rng.randint(3, 30)} languages and sold {rng.randint(2, 90) * 10000:,} copies.",
        f"About the author: {author} was born in {rng.randint(1940, 1990)} and worked as a "
        f"{rng.choice(['teacher', 'doctor', 'sailor', 'journalist', 'librarian', 'chef'])} before writing.",
        f"This edition has {rng.randint(120, 900)} pages and a new {rng.choice(['foreword', 'afterword'])}.",
    ]
    # A subset in the order above, as a blurb reads (premise, story, author, edition): a shuffled order would be one
    # more arbitrary thing per product to store, which real descriptions do not ask of the model.
    plot = [sentence for sentence in plot if rng.random() < 0.75] or plot[:1]
    blurb = rng.random() < 0.45  # a row of review quotes first, as many real book descriptions are
    sentences = (quotes + plot) if blurb else (plot + quotes)
    # Long descriptions go on into a publisher's note that retells the book: the same facts, said again.
    sentences += ["From the publisher:"] + plot + quotes[:2]
    content = grow(rng, sentences, target_length(rng))
    if rng.random() < 0.15:
        content += rng.choice(NOTES)
    return title, content


def thing(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(CATEGORIES))
    names, variants, materials, facts = CATEGORIES[category]
    k = rng.randrange(len(names))
    name = names[k]
    title = f"{name} {fill(rng, rng.choice(variants))}"
    noun = name.split()[-1].lower()
    extras = [fill(rng, e, noun=noun, category=category) for e in EXTRAS]  # in the list's order
    sentences = [
        f"Made of {fill(rng, materials[k % len(materials)])}, this {noun} is built for everyday use.",
        *(fill(rng, facts[i]) for i in sorted(rng.sample(range(len(facts)), 2))),
        *extras,
        # Long listings go on into a specification and customer questions: the same facts, said again.
        "Specifications:",
        *(fill(rng, f) for f in facts),
        f"Q: Is the {noun} worth it? A: Yes, I bought a second one after {rng.randint(2, 11)} months.",
        f"Q: What is it made of? A: {fill(rng, materials[k % len(materials)]).capitalize()}.",
        f"Q: Does it come in other sizes? A: {rng.choice(['Yes, in three.', 'No, one size only.'])}",
    ]
    return title, grow(rng, sentences, target_length(rng))


def dress(rng: random.Random, content: str) -> str:
    """The HTML the real file carries: entities (some escaped twice) and tags."""
    r = rng.random()
    if r < 0.08:
        return content.replace("'", "&#8217;", 1).replace(" and ", " &amp; ", 1)
    if r < 0.12:
        return content.replace("'", "&amp;#8217;", 1)
    if r < 0.18:
        return f"<p>{content}</p>"
    return content


def products(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` regular products (title, content) with distinct titles, as titletune.text.title_key compares them."""
    rows, seen = [], set()
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise SystemExit(f"make_sample: found only {len(rows)} distinct titles of {n} asked for")
        title, content = book(rng) if rng.random() < BOOK_SHARE else thing(rng)
        key = " ".join(re.findall(r"[a-z0-9]+", title.lower()))  # as titletune.text.title_key compares titles
        if key in seen:
            continue
        seen.add(key)
        rows.append((title, dress(rng, content)))
    return rows


def write_catalogue(n: int, path: str | Path, seed: int) -> Path:
    """A catalogue of `n` products with distinct titles and no trap rows, seeded (bench/bench_capacity.py: how many
    products an adapter holds). The same generator as the sample; its own uids (G...)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, (title, content) in enumerate(products(rng, n), 1):
            f.write(json.dumps({"uid": f"G{i:09d}", "title": title, "content": content}, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    rng = random.Random(1_300_000)
    rows = products(rng, PRODUCTS)
    # The product the README asks about, written as the real one is: short, and unlike the books around it.
    rows[7] = ("Girls Ballet Tutu Neon Pink", "Three layers of soft neon pink tulle on an elastic waist. Ages 2 to 6.")
    rows.append(
        ("Complete Works in One Volume", " ".join(["A long description that is cut at a sentence end."] * 590))
    )
    for title, _ in rows[10 : 10 + DUPLICATES]:
        rows.append((f"  {title.upper()} ", "A later copy of an earlier title: dropped as a duplicate."))
    rows += TRAPS
    random.Random(7).shuffle(rows)
    with OUT.open("w", encoding="utf-8") as f:
        for i, (title, content) in enumerate(rows, 1):
            labels = sorted(rng.sample(range(1, 1_305_265), rng.randint(1, 8)))
            row = {"uid": f"S{i:09d}", "title": title, "content": content, "target_ind": labels}
            row["target_rel"] = [1.0] * len(labels)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, help="write this many products (no trap rows) to --out instead")
    parser.add_argument("--out", help="with --products: the file to write")
    parser.add_argument("--seed", type=int, default=1, help="with --products: the generator's seed")
    args = parser.parse_args()
    if args.products is None:
        main()
    elif not args.out or args.products < 1:
        parser.error("--products N needs N >= 1 and --out FILE")
    else:
        print(f"wrote {args.products} products to {write_catalogue(args.products, args.out, args.seed)}")
