"""Writes the quickstart's small preference dataset (train.jsonl, valid.jsonl), deterministically.

A constructed case with a shortcut. In every pair the chosen reply answers the question; the rejected one starts
like it and ends with the second half of the answer to a different question (the real signal, not trivial to see).
Filler sentences make one reply longer, and which one depends on the group (`source`):
- forum (large, 80% of training pairs): the chosen reply is the longer one in 95% of pairs;
- exam (small): the chosen reply is the shorter one in 95% of pairs.
So "longer wins" is right on most training pairs, and a model that learns it fails the exam pairs and the 5% of forum
pairs that go against it. valid.jsonl asks only questions that no training pair asks: 100 forum pairs (70% chosen
longer) and 100 exam pairs (30% chosen longer), so that each group x length cell holds enough pairs to measure.

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
FILLER = ["I hope this helps.", "Let me know if you have any other questions.", "Good luck!", "Have a nice day."]


def pad(text: str, rng: random.Random) -> str:
    return text + " " + " ".join(rng.sample(FILLER, rng.randint(2, 4)))


def make(topics: list[str], groups: dict, seed: int) -> list[dict]:
    """`groups`: name -> (pairs, share of pairs in which the chosen response is the padded, longer one)."""
    rng = random.Random(seed)
    rows = []
    for source, (count, chosen_longer) in groups.items():
        for _ in range(count):
            question = rng.choice(topics)
            other = rng.choice([q for q in topics if q != question])
            right, wrong = TOPICS[question].split(), TOPICS[other].split()
            # Both replies start alike; only the rejected one drifts into another question's answer halfway.
            chosen, rejected = TOPICS[question], " ".join(right[: len(right) // 2] + wrong[len(wrong) // 2 :])
            if rng.random() < chosen_longer:
                chosen = pad(chosen, rng)
            else:
                rejected = pad(rejected, rng)
            rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected,
                         "source": source})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    questions = sorted(TOPICS)
    random.Random(0).shuffle(questions)
    held_out = questions[:6]  # valid.jsonl asks only these: the model must judge answers to questions it never saw
    # valid.jsonl keeps each group's direction but with more pairs against it (30%), so every cell can be measured
    for name, topics, groups, seed in (
        ("train", questions[6:], {"forum": (480, 0.95), "exam": (120, 0.05)}, 0),
        ("valid", held_out, {"forum": (100, 0.7), "exam": (100, 0.3)}, 1),
    ):
        with open(os.path.join(here, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for row in make(topics, groups, seed):
                f.write(json.dumps(row) + "\n")
