"""Writes the bundled offline commonsense set (``commonsense_tiny/``) in the LLM-Adapters layout.

    python -m randlora.data.bundled.make_commonsense_tiny      # rewrites the JSON files in place

Every record is synthetic and written for this project: small fact tables per task, combined by a
seeded ``random.Random``, so the output is identical on every run. The records use the LLM-Adapters
fields (``instruction``, ``input``, ``output``, ``answer``) and the answer formats of the 8 paper tasks
(true/false, solution1/2, answer1-3, ending1-4, option1/2, answer1-5). Layout:

    commonsense_tiny/train.json                  # training records of all 8 tasks, shuffled
    commonsense_tiny/dataset/<task dir>/test.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "commonsense_tiny"
TRAIN_PER_TASK, TEST_PER_TASK = 50, 20

# ------------------------------------------------------------------------------------------ BoolQ
# name, kind, can fly, can swim, lays eggs
CREATURES = [
    ("sparrow", "bird", True, False, True), ("eagle", "bird", True, False, True),
    ("penguin", "bird", False, True, True), ("ostrich", "bird", False, False, True),
    ("duck", "bird", True, True, True), ("owl", "bird", True, False, True),
    ("dog", "mammal", False, True, False), ("cat", "mammal", False, False, False),
    ("whale", "mammal", False, True, False), ("bat", "mammal", True, False, False),
    ("horse", "mammal", False, True, False), ("cow", "mammal", False, False, False),
    ("salmon", "fish", False, True, True), ("shark", "fish", False, True, True),
    ("trout", "fish", False, True, True), ("snake", "reptile", False, True, True),
    ("turtle", "reptile", False, True, True), ("lizard", "reptile", False, False, True),
    ("frog", "amphibian", False, True, True), ("bee", "insect", True, False, True),
    ("ant", "insect", False, False, True), ("butterfly", "insect", True, False, True),
]
KINDS = sorted({c[1] for c in CREATURES})


def boolq(rng):
    qs = []
    for name, kind, fly, swim, eggs in CREATURES:
        art = "an" if name[0] in "aeiou" else "a"
        other = rng.choice([k for k in KINDS if k != kind])
        qs += [(f"is {art} {name} a kind of {kind}", True), (f"is {art} {name} a kind of {other}", False),
               (f"can {art} {name} fly", fly), (f"can {art} {name} swim", swim),
               (f"does {art} {name} lay eggs", eggs)]
    out = []
    for q, a in qs:
        ans = "true" if a else "false"
        out.append(record(f"Please answer the following question with true or false, question: {q}?\n\n"
                          "Answer format: true/false", ans))
    return out


# ------------------------------------------------------------------------------------------- PIQA
# goal, good tool, bad tools
GOALS = [
    ("dry your hands after washing them", "a clean towel", ["a bowl of soup", "a wet sponge", "a handful of sand"]),
    ("cut a sheet of paper in half", "a pair of scissors", ["a spoon", "a pillow", "a glass of water"]),
    ("keep soup warm for a trip", "an insulated flask", ["a paper bag", "an open plate", "a fishing net"]),
    ("light a dark room at night", "a lamp", ["a blanket", "a cup of coffee", "a closed box"]),
    ("tighten a loose screw", "a screwdriver", ["a banana", "a feather", "a sock"]),
    ("carry groceries home", "a sturdy bag", ["a sieve", "a candle", "a balloon"]),
    ("measure the length of a table", "a tape measure", ["a teapot", "a pillow", "a sandwich"]),
    ("clean a dusty shelf", "a damp cloth", ["a jar of honey", "a bag of flour", "a muddy boot"]),
    ("stay dry in the rain", "an umbrella", ["a paper hat", "a fishing net", "a sieve"]),
    ("boil water for tea", "a kettle on the stove", ["a plastic cup in the freezer", "a cardboard box",
                                                      "a basket"]),
    ("write a note to a friend", "a pen", ["a fork", "a wet noodle", "an ice cube"]),
    ("hang a picture on the wall", "a hammer and a nail", ["a slice of bread", "a rubber duck", "a sponge"]),
    ("keep milk fresh", "the refrigerator", ["a sunny window sill", "a warm oven", "the garden"]),
    ("sweep crumbs off the floor", "a broom", ["a spoon of jam", "a pillow", "a bottle of glue"]),
    ("open a locked door", "the right key", ["a banana peel", "a paper clip made of cheese", "a feather"]),
    ("cool down a hot drink", "a few ice cubes", ["a heated stone", "a candle flame", "more boiling water"]),
]


def piqa(rng):
    out = []
    for goal, good, bads in GOALS:
        for bad in bads:
            for first_good in (True, False):
                s1, s2 = (good, bad) if first_good else (bad, good)
                out.append(record(
                    f"Please choose the correct solution to the question: To {goal},\n\n"
                    f"Solution1: use {s1}.\n\nSolution2: use {s2}.\n\nAnswer format: solution1/solution2",
                    "solution1" if first_good else "solution2"))
    return out


# ------------------------------------------------------------------------------------------- SIQA
NAMES = ["Alex", "Sam", "Jordan", "Riley", "Casey", "Taylor", "Morgan", "Jamie", "Robin", "Kai", "Quinn",
         "Avery"]
# situation, how they feel afterwards, what they want next
SITUATIONS = [
    ("won the school chess tournament", "proud", "celebrate with friends"),
    ("lost their wallet on the bus", "worried", "call the bus company"),
    ("finished a long run in the heat", "tired", "drink some water"),
    ("got a puppy for their birthday", "happy", "play with the puppy"),
    ("forgot to study for the exam", "nervous", "study late tonight"),
    ("helped a neighbor carry heavy boxes", "helpful", "rest for a while"),
    ("burned the dinner they were cooking", "frustrated", "order a pizza"),
    ("received a letter from an old friend", "grateful", "write back soon"),
    ("was left out of the team photo", "sad", "ask to retake the photo"),
    ("spilled coffee on a new shirt", "annoyed", "wash the shirt"),
    ("heard a strange noise downstairs at night", "scared", "turn on the lights"),
    ("passed the driving test", "relieved", "drive to see a friend"),
]


def siqa(rng):
    out = []
    for i, (sit, feel, nxt) in enumerate(SITUATIONS):
        others = [s for j, s in enumerate(SITUATIONS) if j != i]
        for name in rng.sample(NAMES, 4):
            for q_kind in ("feel", "next"):
                picks = rng.sample(others, 2)
                if q_kind == "feel":
                    q, right, wrong = f"How would {name} feel afterwards?", feel, [p[1] for p in picks]
                else:
                    q, right, wrong = f"What will {name} want to do next?", nxt, [p[2] for p in picks]
                opts = wrong + [right]
                rng.shuffle(opts)
                k = opts.index(right) + 1
                body = "\n\n".join(f"Answer{j + 1}: {o}" for j, o in enumerate(opts))
                out.append(record(f"Please choose the correct answer to the question: {name} {sit}. {q}\n\n"
                                  f"{body}\n\nAnswer format: answer1/answer2/answer3", f"answer{k}"))
    return out


# -------------------------------------------------------------------------------------- HellaSwag
# activity start, fitting continuation
ACTIVITIES = [
    ("is washing a car in the driveway. They", "rinse the soap off with a hose."),
    ("stands at the edge of a swimming pool. She", "dives into the water and swims a lap."),
    ("cracks two eggs into a bowl. He", "whisks them with a fork until smooth."),
    ("sits down at the piano. They", "place their fingers on the keys and begin to play."),
    ("ties the laces of running shoes. She", "starts jogging along the park path."),
    ("holds a paint roller next to a wall. He", "rolls blue paint across the wall."),
    ("kneels in the garden with a small shovel. They", "dig a hole and plant a flower."),
    ("picks up a guitar and a pick. She", "strums a few chords and tunes a string."),
    ("puts a bowling ball on the lane. He", "rolls it toward the pins and knocks most down."),
    ("opens a book at the library table. They", "read quietly and take a few notes."),
    ("climbs onto a bicycle at the top of a hill. She", "rides down the road holding the brakes."),
    ("fills a bucket with warm soapy water. He", "mops the kitchen floor until it shines."),
]


def hellaswag(rng):
    out = []
    for i, (start, end) in enumerate(ACTIVITIES):
        others = [a[1] for j, a in enumerate(ACTIVITIES) if j != i]
        for name in rng.sample(NAMES, 6):
            opts = rng.sample(others, 3) + [end]
            rng.shuffle(opts)
            k = opts.index(end) + 1
            body = "\n\n".join(f"Ending{j + 1}: {o}" for j, o in enumerate(opts))
            out.append(record(f"Please choose the correct ending to complete the given sentence: "
                              f"A person named {name} {start}\n\n{body}\n\n"
                              "Answer format: ending1/ending2/ending3/ending4", f"ending{k}"))
    return out


# ------------------------------------------------------------------------------------- WinoGrande
# sentence with {a}, {b} and a blank; the word that makes the blank refer to {a}, and the one for {b}
WINO = [
    ("{a} could not lift the heavy box but {b} could, because _ was", "weaker", "stronger"),
    ("{a} ran the race much faster than {b}, because _ had trained", "every day", "very little"),
    ("{a} asked {b} for help with the math homework, because _ found it", "confusing", "easy"),
    ("{a} lent an umbrella to {b}, because _ had", "two of them", "none of their own"),
    ("{a} was shivering while {b} felt fine, because _ wore a", "thin shirt", "warm coat"),
    ("{a} finished the puzzle before {b}, because _ was", "patient", "distracted"),
    ("{a} gave the leftover cake to {b}, because _ was", "full", "hungry"),
    ("{a} woke up earlier than {b}, because _ went to bed", "early", "late"),
]


def winogrande(rng):
    out = []
    for sent, word_a, word_b in WINO:
        for _ in range(6):
            a, b = rng.sample(NAMES, 2)
            for refer_a in (True, False):
                word = word_a if refer_a else word_b
                text = sent.format(a=a, b=b) + f" {word}."
                swap = rng.random() < 0.5
                o1, o2 = (b, a) if swap else (a, b)
                right = a if refer_a else b
                k = 1 if o1 == right else 2
                out.append(record("Please choose the correct answer to fill in the blank to complete the given "
                                  f"sentence: {text}\n\nOption1: {o1}\n\nOption2: {o2}\n\n"
                                  "Answer format: option1/option2", f"option{k}"))
    return out


# ---------------------------------------------------------------------------- ARC-e / ARC-c / OBQA
ARC_EASY = [
    ("Which of these gives off its own light?", "the sun", ["the moon", "a mirror", "a rock"]),
    ("Which part of a plant takes in water from the soil?", "the roots", ["the flowers", "the seeds", "the fruit"]),
    ("What do people use to measure temperature?", "a thermometer", ["a ruler", "a scale", "a compass"]),
    ("Which of these is a liquid at room temperature?", "water", ["ice", "iron", "wood"]),
    ("Which sense do people use to hear a bell?", "hearing", ["smell", "taste", "touch"]),
    ("What do animals need to breathe?", "oxygen", ["sand", "sugar", "plastic"]),
    ("Which of these is a source of food for a rabbit?", "carrots", ["stones", "glass", "metal cans"]),
    ("What covers most of the surface of Earth?", "water", ["ice cream", "forests of candy", "sand dunes"]),
    ("Which tool helps people see very small things?", "a microscope", ["a hammer", "a spoon", "a broom"]),
    ("What happens to a puddle on a hot sunny day?", "it evaporates", ["it freezes", "it grows", "it glows"]),
]
ARC_CHALLENGE = [
    ("A student heats a pot of water on a stove. Which change happens first as the water warms?",
     "the water molecules move faster", ["the water turns to ice", "the pot becomes lighter",
                                         "the water loses all its mass", "the stove cools down"]),
    ("Why does a metal spoon feel colder than a wooden spoon in the same room?",
     "metal conducts heat away from the hand faster", ["metal is always below room temperature",
                                                       "wood makes its own heat", "metal absorbs light",
                                                       "wood is heavier than metal"]),
    ("Which change would most likely increase the number of rabbits in a meadow?",
     "fewer foxes living nearby", ["a long drought", "less grass growing", "more hawks hunting",
                                   "a harsh winter"]),
    ("A ball rolls more slowly on grass than on a wooden floor. What causes the difference?",
     "more friction on the grass", ["less gravity on the grass", "the ball is lighter on wood",
                                    "the floor pushes the ball", "grass has no friction"]),
    ("Which evidence best shows that a chemical change has happened?", "a new gas forms bubbles",
     ["the object changes shape", "ice melts into water", "sugar dissolves in tea", "paper is cut in half"]),
    ("Why do we see the moon change shape during a month?",
     "we see different parts of its lit side", ["the moon grows and shrinks", "clouds cover part of it",
                                                "Earth's shadow always covers it", "the moon stops orbiting"]),
    ("Which action best conserves water at home?", "fixing a leaking faucet",
     ["taking longer showers", "watering the lawn at noon", "running half-empty dishwashers",
      "leaving the hose running"]),
    ("What is the main reason days are longer in summer than in winter?",
     "the tilt of Earth's axis", ["Earth is closer to the sun", "the sun burns hotter",
                                  "the moon blocks less light", "Earth spins more slowly"]),
]
OBQA = [
    ("Which object would most likely conduct electricity?", "a copper wire",
     ["a rubber band", "a wooden stick", "a plastic cup"]),
    ("A plant placed in a dark closet for weeks will most likely", "turn pale and weak",
     ["grow faster", "produce more fruit", "turn bright green"]),
    ("Which of these would help a seed begin to grow?", "water and warmth",
     ["salt and ice", "darkness and cold", "oil and sand"]),
    ("An animal that eats only plants is called", "an herbivore", ["a carnivore", "a predator", "a scavenger"]),
    ("Sound travels fastest through", "a solid such as steel", ["empty space", "a vacuum jar", "thin air"]),
    ("What will happen to a magnet placed near iron nails?", "it attracts the nails",
     ["it melts the nails", "it repels the nails", "it changes the nails into copper"]),
    ("Which is a renewable source of energy?", "wind", ["coal", "oil", "natural gas"]),
    ("Rain that falls on a mountain will usually", "flow downhill into streams",
     ["flow uphill", "turn into sand", "stay on the peak forever"]),
    ("A person who wants to see stars clearly should go", "far from city lights",
     ["into a bright mall", "under a street lamp", "inside a closed room"]),
    ("Which of these best keeps a house warm in winter?", "good insulation in the walls",
     ["open windows", "a fan blowing cold air", "thin glass roofs"]),
]


def multiple_choice(rng, table, repeats, five_max=False):
    out = []
    for q, right, wrongs in table:
        for _ in range(repeats):
            k_wrong = 3 if not five_max else rng.choice([3, 4])
            opts = rng.sample(wrongs, min(k_wrong, len(wrongs))) + [right]
            rng.shuffle(opts)
            k = opts.index(right) + 1
            body = "\n\n".join(f"Answer{j + 1}: {o}" for j, o in enumerate(opts))
            fmt = "/".join(f"answer{j + 1}" for j in range(len(opts)))
            out.append(record(f"Please choose the correct answer to the question: {q}\n\n{body}\n\n"
                              f"Answer format: {fmt}", f"answer{k}"))
    return out


# ----------------------------------------------------------------------------------------- common
def record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


TASKS = [  # (LLM-Adapters directory, generator)
    ("boolq", boolq),
    ("piqa", piqa),
    ("social_i_qa", siqa),
    ("hellaswag", hellaswag),
    ("winogrande", winogrande),
    ("ARC-Easy", lambda rng: multiple_choice(rng, ARC_EASY, 10)),
    ("ARC-Challenge", lambda rng: multiple_choice(rng, ARC_CHALLENGE, 10, five_max=True)),
    ("openbookqa", lambda rng: multiple_choice(rng, OBQA, 10)),
]


def build(seed: int = 0):
    train, tests = [], {}
    for i, (dirname, gen) in enumerate(TASKS):
        rng = random.Random(seed * 1000 + i)
        recs, seen = [], set()
        for r in gen(rng):  # drop duplicate prompts so train and test never share one
            if r["instruction"] not in seen:
                seen.add(r["instruction"])
                recs.append(r)
        rng.shuffle(recs)
        need = TRAIN_PER_TASK + TEST_PER_TASK
        if len(recs) < need:
            raise RuntimeError(f"{dirname}: only {len(recs)} distinct records, need {need}")
        tests[dirname] = recs[:TEST_PER_TASK]
        train += recs[TEST_PER_TASK:need]
    random.Random(seed).shuffle(train)
    return train, tests


def _dump(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def main():
    train, tests = build()
    _dump(OUT / "train.json", train)
    for dirname, recs in tests.items():
        _dump(OUT / "dataset" / dirname / "test.json", recs)
    total = sum(p.stat().st_size for p in OUT.rglob("*.json"))
    print(f"wrote {len(train)} training and {sum(map(len, tests.values()))} test records "
          f"({total / 1024:.0f} KB) under {OUT}")


if __name__ == "__main__":
    main()
