"""Writes the quickstart's small preference dataset (train.jsonl, valid.jsonl), deterministically.

Three groups of deliberately unequal size, in the explicit-prompt format with a `source` column:
- helpful (largest): the chosen reply answers the question, the rejected one answers a different question;
- harmless: the chosen reply helps politely, the rejected one insults the user;
- honest (smallest): the chosen reply states a true fact, the rejected one a false one.
A polite filler sentence is appended to either side at random, so response length says nothing about quality.

    python hf_balanced_reward/quickstart_data/generate.py
"""

import json
import os
import random

TOPICS = {
    "How do I cook pasta?": "Boil salted water, add the pasta and cook it for the time on the packet, then drain it.",
    "How can I fix a flat bicycle tyre?": "Remove the wheel, find the hole in the inner tube, patch it or fit a new tube, then pump it up.",
    "What is a good way to start learning Python?": "Install Python, follow a beginner tutorial and write small programs every day.",
    "How do I take care of a new kitten?": "Give the kitten kitten food, fresh water, a litter tray and a visit to the vet for vaccines.",
    "How can I save money each month?": "Write a budget, track your spending and move a fixed amount to savings on payday.",
    "How do I grow tomatoes at home?": "Plant tomatoes in a sunny spot, water them regularly and tie the stems to a stake.",
    "How can I sleep better at night?": "Keep a regular bedtime, avoid screens before bed and keep your bedroom dark and cool.",
    "How do I write a cover letter?": "Address the hiring manager, explain why you fit the role and end with a short call to action.",
    "How do I clean a cast iron pan?": "Rinse it with hot water, scrub off food, dry it fully and rub in a thin layer of oil.",
    "What should I pack for a day hike?": "Bring water, snacks, a map, sunscreen, a rain jacket and comfortable boots.",
    "How can I improve my running endurance?": "Run slowly more often, add a little distance each week and include one long run.",
    "How do I change a car's engine oil?": "Drain the old oil, replace the oil filter, then refill with the grade in the manual.",
    "How do I make a cup of green tea?": "Heat water to about eighty degrees, pour it over the leaves and steep for two minutes.",
    "How can I learn to play the guitar?": "Learn a few basic chords, practise changing between them and play simple songs daily.",
    "How do I remove a coffee stain from a shirt?": "Blot the stain, rinse it with cold water and rub in a little detergent before washing.",
    "How do I prepare for a job interview?": "Research the company, practise common questions and prepare examples of your work.",
    "How can I keep my houseplants alive?": "Check the light each plant needs, water only when the soil is dry and use pots with drainage.",
    "How do I bake bread at home?": "Mix flour, water, yeast and salt, knead the dough, let it rise and bake it in a hot oven.",
    "How can I reduce stress at work?": "Take short breaks, plan your tasks for the day and talk to your manager about your workload.",
    "How do I back up my computer files?": "Copy your files to an external drive or a cloud service and schedule automatic backups.",
    "How do I train my dog to sit?": "Hold a treat above the dog's nose, move it back until the dog sits, then praise and reward it.",
    "How do I paint a room?": "Cover the floor, tape the edges, apply a primer and then two thin coats of paint.",
    "How can I learn a new language faster?": "Practise a little every day, speak with native speakers and learn the most common words first.",
    "How do I make a simple salad dressing?": "Whisk three parts olive oil with one part vinegar, a pinch of salt and some mustard.",
}
REQUESTS = [
    "Can you help me with my homework?", "Could you explain how taxes work?", "Can you check my essay for mistakes?",
    "Can you recommend a good book?", "Could you help me plan a birthday party?", "Can you explain photosynthesis?",
    "Can you help me write an email to my landlord?", "Could you suggest a healthy breakfast?",
    "Can you help me understand fractions?", "Could you give me tips for public speaking?",
    "Can you help me choose a laptop?", "Could you explain what a mortgage is?",
]
POLITE = [
    "Of course, I would be glad to help. Let's go through it together step by step.",
    "Happy to help! Here is a clear explanation to get you started.",
    "Sure, that is a great question. I will walk you through it.",
    "Certainly. Let me give you a few friendly suggestions.",
]
RUDE = [
    "Figure it out yourself, I am not your servant.",
    "That is a stupid question and you are wasting my time.",
    "Ugh, nobody cares. Go away and stop bothering me.",
    "Are you really too dumb to do this on your own?",
]
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Sweden": "Stockholm", "Poland": "Warsaw", "Austria": "Vienna",
}
FILLER = ["I hope this helps.", "Let me know if you have any other questions.", "Good luck!", "Have a nice day."]


def pad(text: str, rng: random.Random) -> str:
    return text + " " + " ".join(rng.sample(FILLER, rng.randint(1, 3)))


def helpful(rng):
    question = rng.choice(list(TOPICS))
    other = rng.choice([q for q in TOPICS if q != question])
    return question, TOPICS[question], TOPICS[other]


def harmless(rng):
    return rng.choice(REQUESTS), rng.choice(POLITE), rng.choice(RUDE)


def honest(rng):
    country = rng.choice(list(CAPITALS))
    wrong = rng.choice([c for k, c in CAPITALS.items() if k != country])
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.", f"The capital of {country} is {wrong}."


def make(sizes: dict, seed: int) -> list[dict]:
    rng = random.Random(seed)
    makers = {"helpful": helpful, "harmless": harmless, "honest": honest}
    rows = []
    for source, count in sizes.items():
        for _ in range(count):
            question, chosen, rejected = makers[source](rng)
            if rng.random() < 0.5:
                chosen = pad(chosen, rng)
            else:
                rejected = pad(rejected, rng)
            rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected, "source": source})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, sizes, seed in (("train", {"helpful": 360, "harmless": 170, "honest": 70}, 0),
                              ("valid", {"helpful": 90, "harmless": 60, "honest": 50}, 1)):
        with open(os.path.join(here, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for row in make(sizes, seed):
                f.write(json.dumps(row) + "\n")
