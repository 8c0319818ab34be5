"""An offline prompt set for self-distillation: chat requests of the kinds users send.

Templates × fillers, shuffled with a seed; a fixed share is held out (by a hash of the text, so the
split does not depend on the seed or the order) to measure acceptance on prompts the draft never saw.
"""

from __future__ import annotations

import hashlib
import itertools
import random

COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Norway",
             "Peru", "Spain", "Germany", "Australia", "China", "Greece", "Turkey", "Vietnam", "Chile", "Poland",
             "Argentina", "Ireland", "Thailand", "Morocco", "Sweden", "Indonesia", "Portugal", "Nigeria", "Iceland",
             "South Korea", "New Zealand", "Colombia", "Ethiopia", "Finland", "Cuba", "Nepal", "Austria",
             "the Philippines", "Ghana", "Switzerland"]
CONCEPTS = ["photosynthesis", "gravity", "inflation", "machine learning", "the water cycle", "democracy",
            "a black hole", "compound interest", "evolution", "climate change", "the internet", "vaccines",
            "electricity", "recursion", "supply and demand", "the immune system", "plate tectonics", "DNA",
            "a neural network", "the stock market", "renewable energy", "the moon's phases", "an algorithm",
            "blockchain", "the greenhouse effect", "probability", "a rainbow", "sleep", "memory", "friction",
            "the French Revolution", "a volcano", "an earthquake", "the solar system", "a calorie", "taxes",
            "a credit score", "the Pythagorean theorem", "a prime number", "the speed of light", "photography",
            "an ecosystem", "antibiotics", "a carbon footprint", "a database", "encryption", "a cloud server",
            "cellular respiration", "the Renaissance", "the scientific method", "a tsunami", "an eclipse",
            "magnetism", "a hurricane", "a fraction", "the printing press", "a budget", "opportunity cost",
            "an operating system", "the food chain"]
TOPICS = ["the ocean", "autumn", "a cat", "friendship", "the city at night", "coffee", "mountains", "rain",
          "a lighthouse", "the stars", "a garden", "winter mornings", "a library", "trains", "the sea breeze",
          "a quiet forest", "music", "childhood", "the desert", "a rainy Sunday",
          "a snowy village", "an old bridge", "the first day of spring", "a thunderstorm", "a bakery at dawn",
          "the mountains at sunset", "a lost key", "a busy market", "a sailboat", "the river", "an old photograph",
          "a campfire", "the last train home", "a field of sunflowers", "a robot learning to paint",
          "a letter from a friend", "the summer holidays", "a sleepy dog", "an empty beach", "the full moon"]
ACTIVITIES = ["staying focused while studying", "sleeping better", "learning a new language", "saving money",
              "starting to run", "cooking healthy meals", "public speaking", "writing a resume", "reducing stress",
              "keeping a plant alive", "working from home", "making friends in a new city", "reading more books",
              "preparing for a job interview", "learning to code", "traveling on a budget", "drinking more water",
              "organizing a small kitchen", "taking better photos", "managing time",
              "learning to play the guitar", "eating less sugar", "waking up early", "studying for an exam",
              "starting a small business", "writing a novel", "keeping a journal", "staying motivated",
              "learning to swim", "decluttering my home", "planning a wedding", "raising a puppy",
              "speaking with confidence", "memorizing facts", "negotiating a salary", "gardening on a balcony",
              "building muscle", "meditating", "giving feedback at work", "learning math as an adult"]
PAIRS = [("a virus", "a bacterium"), ("weather", "climate"), ("a list", "a tuple in Python"), ("RAM", "storage"),
         ("an alligator", "a crocodile"), ("speed", "velocity"), ("a lake", "a pond"), ("HTTP", "HTTPS"),
         ("a comet", "an asteroid"), ("baking soda", "baking powder"), ("a frog", "a toad"),
         ("socialism", "capitalism"), ("an atom", "a molecule"), ("a simile", "a metaphor"),
         ("TCP", "UDP"), ("a democracy", "a monarchy"), ("mass", "weight"), ("a CPU", "a GPU"),
         ("a crocodile", "a lizard"), ("a hurricane", "a tornado"), ("an ocean", "a sea"), ("a violin", "a viola"),
         ("a function", "a method"), ("latitude", "longitude"), ("a rabbit", "a hare"), ("a star", "a planet"),
         ("an app", "a website"), ("bread flour", "cake flour"), ("a loan", "a grant"), ("heat", "temperature")]
CODE_TASKS = ["reverses a string", "checks whether a number is prime", "returns the factorial of n",
              "counts the vowels in a string", "finds the largest number in a list", "sorts a list of names",
              "computes the Fibonacci numbers up to n", "removes duplicates from a list",
              "checks whether a word is a palindrome", "converts Celsius to Fahrenheit",
              "sums the even numbers in a list", "reads a file and counts its lines",
              "merges two dictionaries", "returns the average of a list of numbers",
              "capitalizes every word in a sentence",
              "finds the second largest number in a list", "counts how often each word appears in a text",
              "checks whether two strings are anagrams", "converts a number to binary", "flattens a nested list",
              "returns the n-th prime number", "validates an email address", "shuffles a deck of cards",
              "computes the greatest common divisor of two numbers", "reverses the words in a sentence"]
WORDS = ["serendipity", "ephemeral", "resilience", "ubiquitous", "empathy", "paradigm", "nostalgia", "entropy",
         "metaphor", "algorithm", "sustainability", "irony", "bias", "momentum", "hypothesis",
         "curiosity", "melancholy", "integrity", "ambiguous", "catalyst", "benevolent", "pragmatic", "eloquent",
         "frugal", "tenacious", "meticulous", "candid", "gregarious", "inevitable", "profound", "diligent",
         "whimsical", "vulnerable", "obsolete", "innovation"]
PEOPLE = ["Albert Einstein", "Marie Curie", "Isaac Newton", "Leonardo da Vinci", "William Shakespeare",
          "Ada Lovelace", "Nelson Mandela", "Charles Darwin", "Cleopatra", "Galileo Galilei", "Mozart",
          "Alan Turing", "Jane Austen", "Nikola Tesla", "Mahatma Gandhi",
          "Frida Kahlo", "Abraham Lincoln", "Confucius", "Aristotle", "Ludwig van Beethoven", "Rosa Parks",
          "Martin Luther King Jr.", "Napoleon Bonaparte", "Vincent van Gogh", "Florence Nightingale",
          "Thomas Edison", "Julius Caesar", "Amelia Earhart", "Pablo Picasso", "Stephen Hawking"]
OBJECTS = ["a bicycle", "a refrigerator", "a microwave oven", "a compass", "GPS", "a solar panel", "a camera",
           "a battery", "a thermostat", "a telescope", "a printer", "a smartphone", "an elevator", "a wind turbine",
           "a light bulb", "a submarine", "a helicopter", "a clock", "a search engine", "a credit card",
           "a washing machine", "a piano", "a rocket", "a dam", "a 3D printer"]
ANIMALS = ["elephants", "dolphins", "penguins", "owls", "honey bees", "wolves", "octopuses", "koalas", "sharks",
           "butterflies", "camels", "polar bears", "parrots", "ants", "giraffes", "bats", "turtles", "foxes",
           "whales", "hedgehogs"]
FOODS = ["pasta", "rice", "an omelette", "pancakes", "a vegetable soup", "bread", "a salad", "chili", "tofu",
         "salmon", "a curry", "lentils", "roast chicken", "a smoothie", "oatmeal", "a pizza", "dumplings",
         "a chocolate cake", "guacamole", "a stir-fry", "hummus", "french toast", "a burrito", "risotto", "cookies"]
JOBS = ["nurse", "software engineer", "teacher", "pilot", "chef", "architect", "firefighter", "librarian",
        "data scientist", "electrician", "journalist", "veterinarian", "lawyer", "farmer", "pharmacist",
        "graphic designer", "accountant", "park ranger", "translator", "dentist", "mechanic", "photographer",
        "marine biologist", "police officer", "carpenter"]
SPORTS = ["soccer", "basketball", "tennis", "chess", "cricket", "volleyball", "baseball", "golf", "rugby",
          "table tennis", "badminton", "ice hockey", "swimming", "cycling", "marathon running"]
PROBLEMS = ["a leaky faucet", "a slow computer", "a squeaky door", "a phone that will not charge", "a clogged drain",
            "a flat bicycle tire", "a wobbly table", "weak Wi-Fi at home", "a stuck zipper", "a dead car battery",
            "a frozen laptop", "a scratched pan", "a noisy fridge", "a tangled necklace", "a foggy bathroom mirror",
            "a printer that jams", "a cracked phone screen", "a drafty window", "a smelly sponge", "a dull knife"]
PASSAGES = [
    "The Amazon rainforest covers much of the Amazon basin of South America. It is home to millions of species "
    "of insects, plants, birds and other animals, and it produces a large share of the world's oxygen.",
    "The Great Wall of China is a series of fortifications built across the northern borders of ancient Chinese "
    "states. Construction began in the 7th century BC and continued for centuries.",
    "Honey bees live in colonies with a single queen, thousands of female workers and a few hundred male drones. "
    "Workers collect nectar and pollen and turn nectar into honey stored in wax combs.",
    "The printing press, developed by Johannes Gutenberg around 1440, made books cheaper and faster to produce, "
    "which helped spread literacy and new ideas across Europe.",
    "Volcanoes form where molten rock, called magma, rises to the surface. When pressure builds up, the magma "
    "erupts as lava, ash and gas, which can change the landscape and the climate.",
    "Regular exercise strengthens the heart and lungs, improves mood, and lowers the risk of many diseases. "
    "Adults are advised to get at least 150 minutes of moderate activity every week.",
    "The Moon is Earth's only natural satellite. Its gravity causes the ocean tides, and it always shows the "
    "same face to Earth because its rotation matches its orbit.",
    "Recycling turns waste such as paper, glass and plastic into new products. It saves energy and raw "
    "materials and reduces the amount of rubbish sent to landfills.",
]

TEMPLATES: list[tuple[str, list]] = [
    ("What is the capital of {}?", COUNTRIES),
    ("Tell me three interesting facts about {}.", COUNTRIES),
    ("What language do people speak in {}?", COUNTRIES),
    ("Explain {} in simple terms.", CONCEPTS),
    ("What is {}?", CONCEPTS),
    ("Explain {} to a ten-year-old.", CONCEPTS),
    ("Why is {} important?", CONCEPTS),
    ("Write a short poem about {}.", TOPICS),
    ("Write a haiku about {}.", TOPICS),
    ("Write a short story about {} in three sentences.", TOPICS),
    ("Describe {} in a few sentences.", TOPICS),
    ("Give me three tips for {}.", ACTIVITIES),
    ("How can I get better at {}?", ACTIVITIES),
    ("What are the benefits of {}?", ACTIVITIES),
    ("What is the difference between {} and {}?", PAIRS),
    ("Write a Python function that {}.", CODE_TASKS),
    ("How would I write code that {}? Explain briefly.", CODE_TASKS),
    ("What does the word \"{}\" mean?", WORDS),
    ("Use the word \"{}\" in a sentence.", WORDS),
    ("How does {} work?", OBJECTS),
    ("What is the history of {}?", OBJECTS),
    ("Tell me about {}.", ANIMALS),
    ("What do {} eat?", ANIMALS),
    ("Where do {} live?", ANIMALS),
    ("Who was {}?", PEOPLE),
    ("What is {} famous for?", PEOPLE),
    ("Summarize this text in one sentence:\n{}", PASSAGES),
    ("Give this text a title:\n{}", PASSAGES),
    ("List the main points of this text:\n{}", PASSAGES),
    ("Rewrite this text in simpler words:\n{}", PASSAGES),
    ("What is {} plus {}?", [(a, b) for a, b in itertools.product(range(3, 60, 7), range(2, 40, 9))]),
    ("What is {} times {}?", [(a, b) for a, b in itertools.product(range(2, 13, 2), range(3, 15, 3))]),
    ("What are the main exports of {}?", COUNTRIES),
    ("Plan a three-day trip to {}.", COUNTRIES),
    ("What food is {} known for?", COUNTRIES),
    ("Give an example of {} in everyday life.", CONCEPTS),
    ("What are common misconceptions about {}?", CONCEPTS),
    ("Write a limerick about {}.", TOPICS),
    ("Write a short dialogue between two friends about {}.", TOPICS),
    ("What are the pros and cons of {}?", ACTIVITIES),
    ("Make a one-week plan for {}.", ACTIVITIES),
    ("Which is better, {} or {}?", PAIRS),
    ("Write a JavaScript function that {}.", CODE_TASKS),
    ("What are synonyms for \"{}\"?", WORDS),
    ("Who invented {}?", OBJECTS),
    ("How do {} communicate?", ANIMALS),
    ("Give me a fun fact about {}.", ANIMALS),
    ("Write a short biography of {}.", PEOPLE),
    ("What can we learn from {}?", PEOPLE),
    ("How do I cook {}?", FOODS),
    ("Is {} healthy?", FOODS),
    ("Give me a simple recipe for {}.", FOODS),
    ("What does a {} do?", JOBS),
    ("How do I become a {}?", JOBS),
    ("What skills does a {} need?", JOBS),
    ("Explain the rules of {}.", SPORTS),
    ("How can a beginner get started with {}?", SPORTS),
    ("How do I fix {}?", PROBLEMS),
    ("Write three quiz questions about this text:\n{}", PASSAGES),
    ("Explain this text to a child:\n{}", PASSAGES),
    ("What is {} minus {}?", [(a, b) for a, b in itertools.product(range(40, 99, 11), range(3, 38, 8))]),
    ("What is {} divided by {}?", [(a * b, b) for a, b in itertools.product(range(2, 12, 3), range(2, 10, 2))]),
]
GENERIC = [
    "Hello! How are you today?", "What can you help me with?", "Tell me a joke.", "What should I cook for dinner?",
    "Write a thank-you note to a friend who helped me move.", "Write an email asking my manager for a day off.",
    "Suggest a name for a small bakery.", "What are some good habits for a healthy life?",
    "How do I make a cup of tea?", "Plan a one-day trip to the beach.", "What is the meaning of life?",
    "Give me a motivational quote and explain it.", "How does a car engine work?", "Why is the sky blue?",
    "How many days are in a leap year?", "What are the primary colors?", "Recommend three classic novels.",
    "How do airplanes stay in the air?", "What is the tallest mountain in the world?", "Who wrote Hamlet?",
    "Write a birthday message for my sister.", "What is a good name for a pet goldfish?",
    "How do I stay warm in winter?", "Give me ideas for a rainy weekend.", "What is a good breakfast for energy?",
    "How do I apologize to a friend?", "Write a short speech for a school graduation.", "How do rockets reach space?",
    "What is the best way to learn history?", "Write a limerick about a cat.", "How do I change a flat tire?",
    "What are the seven wonders of the world?", "Describe your ideal weekend.", "How does the heart pump blood?",
    "Write a product description for a reusable water bottle.", "What are good questions to ask in an interview?",
    "Explain the rules of chess briefly.", "Why do leaves change color in autumn?", "How is glass made?",
    "Write a short bedtime story for a child."]


def build_prompts(seed: int = 0) -> list[str]:
    """Every prompt of the set, shuffled with `seed`."""
    prompts = list(GENERIC)
    for template, fillers in TEMPLATES:
        prompts += [template.format(*(f if isinstance(f, tuple) else (f,))) for f in fillers]
    random.Random(seed).shuffle(prompts)
    return prompts


def is_held_out(prompt: str, fraction: float = 0.05) -> bool:
    """A stable share of prompts that training never sees."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def split_prompts(prompts: list[str], fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train, held_out)."""
    held = [p for p in prompts if is_held_out(p, fraction)]
    return [p for p in prompts if not is_held_out(p, fraction)], held
